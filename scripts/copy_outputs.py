"""Copy a shared job's outputs into a run's folder: input[i] -> output[i], files or folders."""

import logging
import shutil
from pathlib import Path

from kolors_story.host.rule_runner import run_rule


def main(snakemake):
    for source, target in zip(map(Path, snakemake.input), map(Path, snakemake.output)):
        if source.is_dir():
            shutil.rmtree(target, ignore_errors=True)  # a folder replaces the old copy whole
            shutil.copytree(source, target)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)
        logging.info("%s -> %s", source, target)


run_rule(main, snakemake)
