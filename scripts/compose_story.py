from pathlib import Path

from kolors_story.rule_runner import run_rule
from kolors_story.story_layout import compose_story


def main(snakemake):
    layout = snakemake.params.layout
    compose_story([Path(p) for p in snakemake.input], Path(snakemake.output[0]),
                  layout["columns"], layout["rows"], layout["gap"])


run_rule(main, snakemake)
