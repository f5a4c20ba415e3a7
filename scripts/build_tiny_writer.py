from pathlib import Path

from kolors_story.host.rule_runner import run_rule
from kolors_story.models.random_qwen import build_random_qwen, qwen_tiktoken_file


def main(snakemake):
    build_random_qwen(Path(snakemake.output[0]), qwen_tiktoken_file(), seed=snakemake.params.seed)


run_rule(main, snakemake, seal_outputs=False)  # model folders: too large to hash per job
