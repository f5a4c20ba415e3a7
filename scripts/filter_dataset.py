import json
import logging
from pathlib import Path

from kolors_story.data.rows import read_rows, write_rows
from kolors_story.files import write_json
from kolors_story.data.filtering import filter_rows, relocate_dropped
from kolors_story.outputs.report_figures import draw_dropped_sheet
from kolors_story.host.rule_runner import run_rule


def main(snakemake):
    rows = read_rows(Path(snakemake.input.rows))
    result = filter_rows(rows, snakemake.params.ops, Path(snakemake.params.work_dir), snakemake.params.num_proc)
    write_rows(result.kept, Path(snakemake.output.rows))
    stats_path = Path(snakemake.output.stats)
    # What the download stage made of every input file, so one file tells where each image went.
    download = json.loads(Path(snakemake.input.download_stats).read_text(encoding="utf-8"))
    stats = relocate_dropped({**result.stats, "download": download}, Path.cwd(), stats_path.parent)
    write_json(stats, stats_path)
    draw_dropped_sheet(stats, stats_path.parent, Path(snakemake.output.dropped))
    for op in result.stats["ops"]:
        logging.info("%-28s %5d -> %5d rows", op["op"], op["rows_in"], op["rows_out"])


run_rule(main, snakemake)
