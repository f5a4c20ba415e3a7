import json
import logging
from pathlib import Path

from kolors_story.models import check_aesthetic_dir, check_kolors_dir, describe_model
from kolors_story.rule_runner import run_rule

CHECKS = {"kolors": check_kolors_dir, "aesthetic": check_aesthetic_dir}


def main(snakemake):
    name, path = snakemake.wildcards.model_name, Path(snakemake.input[0])
    CHECKS[name](path, snakemake.params.config_key)
    summary = {"name": name, "ref": snakemake.params.ref, **describe_model(path)}
    Path(snakemake.output[0]).write_text(json.dumps(summary, indent=2), encoding="utf-8")
    logging.info("model %s at %s: layout complete", name, path)


run_rule(main, snakemake)
