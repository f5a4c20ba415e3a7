import json
import logging
from pathlib import Path

from kolors_story.render.candidates_file import read_record
from kolors_story.outputs.publishing import build_bundle
from kolors_story.host.rule_runner import run_rule


def main(snakemake):
    records = [read_record(Path(folder)) for folder in snakemake.input.candidates]  # what each panel was rendered with
    scores = json.loads(Path(snakemake.input.scores).read_text(encoding="utf-8"))
    bundle = snakemake.params.bundle
    out = build_bundle(
        Path(snakemake.output[0]), Path(snakemake.input.lora), [Path(p) for p in snakemake.input.panels], records, scores,
        Path(snakemake.input.story), snakemake.params.base_model, bundle["title"],
        bundle["trigger_words"], snakemake.params.run, repo_id=snakemake.params.repo_id,
    )
    logging.info("bundle ready at %s", out)


run_rule(main, snakemake)
