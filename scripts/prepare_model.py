import json
import logging
from pathlib import Path

from kolors_story.models.kolors_folder import KolorsFolder
from kolors_story.models.hub import check_aesthetic_dir, describe_model
from kolors_story.host.rule_runner import run_rule


def main(snakemake):
    name, path, key = snakemake.wildcards.model_name, Path(snakemake.input[0]), snakemake.params.config_key
    if name == "kolors":
        described = KolorsFolder(path, key).describe()
    else:
        check_aesthetic_dir(path, key)
        described = describe_model(path)
    summary = {"name": name, "ref": snakemake.params.ref, **described}
    Path(snakemake.output[0]).write_text(json.dumps(summary, indent=2), encoding="utf-8")
    logging.info("model %s at %s: layout complete", name, path)


run_rule(main, snakemake)
