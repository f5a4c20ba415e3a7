import logging
from pathlib import Path

from kolors_story.data.demo_data import build_demo_dataset
from kolors_story.host.rule_runner import run_rule


def main(snakemake):
    counts = build_demo_dataset(Path(snakemake.output[0]), seed=snakemake.params.seed)
    logging.info("demo dataset: %s", counts)


run_rule(main, snakemake)
