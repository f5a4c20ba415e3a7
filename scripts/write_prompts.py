"""The prompt writer's job: story.outline -> scenes.yaml (story.scenes entries) + every request and reply."""

import logging
import shutil
from pathlib import Path

from kolors_story.host.rule_runner import run_rule
from kolors_story.writing.llm_client import ChatSettings
from kolors_story.writing.reply_cache import ReplyCache
from kolors_story.writing.scene_prompts import write_scenes_file


def main(snakemake):
    params, out = snakemake.params, snakemake.output
    kept = Path(snakemake.log[0]).with_suffix(".jsonl")  # a failed job's outputs are removed; this stays
    try:
        write_scenes_file(dict(params.story), params.rules, ChatSettings(**params.writer),
                          ReplyCache(Path(params.cache_dir, params.model_content)), Path(out.scenes), Path(out.transcript))
    finally:
        if Path(out.transcript).is_file():
            shutil.copyfile(out.transcript, kept)
            logging.info("every request and raw reply: %s", kept)


run_rule(main, snakemake)
