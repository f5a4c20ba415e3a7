"""The captioner's job: the filter's kept rows -> the same rows with their training text captioned,
a record per image (captions.jsonl) and the captions page."""

import json
import logging
from pathlib import Path

from kolors_story.data.rows import read_rows, write_rows
from kolors_story.host.rule_runner import run_rule
from kolors_story.outputs.captions_page import write_captions_page
from kolors_story.writing.captions import RECORDS, CaptionRun, CaptionSettings, captioner_for, seed_from_results
from kolors_story.writing.reply_cache import ReplyCache


def main(snakemake):
    params, out = snakemake.params, snakemake.output
    settings = CaptionSettings(**params.caption)
    rows = read_rows(Path(snakemake.input.rows))
    cache = ReplyCache(Path(params.cache_dir, params.model_content))  # a local model's weights: their own replies
    # results/shared/captions/<key>/captioned.jsonl -> results/: a run reproduced in a fresh folder
    # with its results/<run>/ finds its captions there and asks no captioner
    seeded = seed_from_results(Path(out.rows).parents[3], cache)
    if seeded:
        logging.info("%d caption(s) put into the cache from results/*/%s", seeded, RECORDS)
    run = CaptionRun(settings, captioner_for(settings), cache,
                     trigger=params.trigger, default_caption=params.default_caption)
    captioned, records = run.caption_rows(rows)
    write_rows(captioned, Path(out.rows))
    lines = [json.dumps(r.to_json(), ensure_ascii=False) for r in records]
    Path(out.record).write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    write_captions_page([r.to_json() for r in records], [Path(r["image"]) for r in rows], Path(out.page),
                        title=f"Captions: {settings.backend}, {settings.model}")
    logging.info("%d captions: %s; page %s", len(records), out.record, out.page)


run_rule(main, snakemake)
