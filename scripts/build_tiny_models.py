from pathlib import Path

from kolors_story.host.rule_runner import run_rule
from kolors_story.models.random_kolors import build_tiny_kolors
from kolors_story.models.random_aesthetic import build_tiny_aesthetic_predictor


def main(snakemake):
    build_tiny_kolors(Path(snakemake.output.kolors), seed=snakemake.params.seed)
    build_tiny_aesthetic_predictor(Path(snakemake.output.aesthetic), seed=snakemake.params.seed)


run_rule(main, snakemake, seal_outputs=False)  # model folders: too large to hash per job
