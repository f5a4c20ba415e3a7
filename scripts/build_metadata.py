import logging
from pathlib import Path

from kolors_story.data.rows import read_rows
from kolors_story.data.training_folder import build_training_folder
from kolors_story.host.rule_runner import run_rule


def main(snakemake):
    csv_path = build_training_folder(read_rows(Path(snakemake.input.rows)), Path(snakemake.output[0]),
                                     truncate_long_captions=snakemake.params.truncate)
    logging.info("training metadata: %s", csv_path)


run_rule(main, snakemake)
