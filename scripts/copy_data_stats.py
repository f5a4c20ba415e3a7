from pathlib import Path

from kolors_story.files import write_json
from kolors_story.data.filtering import read_filter_stats, relocate_dropped
from kolors_story.host.rule_runner import run_rule


def main(snakemake):
    source, target = Path(snakemake.input.stats), Path(snakemake.output.stats)
    stats = relocate_dropped(read_filter_stats(source), source.parent, target.parent)
    write_json(stats, target)  # the dropped images' paths, relative to the copy's folder
    Path(snakemake.output.dropped).write_bytes(Path(snakemake.input.dropped).read_bytes())


run_rule(main, snakemake)
