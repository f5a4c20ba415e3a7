import json
import logging
from pathlib import Path

from kolors_story.dataset import read_rows, write_rows
from kolors_story.filtering import filter_rows
from kolors_story.rule_runner import run_rule


def main(snakemake):
    rows = read_rows(Path(snakemake.input.rows))
    result = filter_rows(rows, snakemake.params.ops, Path(snakemake.params.work_dir), snakemake.params.num_proc)
    write_rows(result.kept, Path(snakemake.output.rows))
    Path(snakemake.output.stats).write_text(
        json.dumps(result.stats, indent=2, ensure_ascii=False), encoding="utf-8"
    )
    for op in result.stats["ops"]:
        logging.info("%-28s %5d -> %5d rows", op["op"], op["rows_in"], op["rows_out"])


run_rule(main, snakemake)
