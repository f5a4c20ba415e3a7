from pathlib import Path

from kolors_story.models.hub import download_model
from kolors_story.host.rule_runner import run_rule


def main(snakemake):
    download_model(snakemake.params.model_id, Path(snakemake.output[0]), snakemake.params.config_key,
                   needed=snakemake.params.needed)


run_rule(main, snakemake, seal_outputs=False)  # model folders: too large to hash per job
