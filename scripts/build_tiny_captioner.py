from pathlib import Path

from kolors_story.host.rule_runner import run_rule
from kolors_story.models.random_blip import build_tiny_blip


def main(snakemake):
    build_tiny_blip(Path(snakemake.output[0]), seed=snakemake.params.seed)


run_rule(main, snakemake, seal_outputs=False)  # a model folder, like the other tiny models
