"""Seed the captions cache from a run's record, so that reproducing a run in a fresh folder never
calls a captioner (its captions are in results/<run>/data/captions.jsonl). The caption_images job
does it itself for every run under results/ (writing.captions.seed_from_results) before it
captions anything; by hand, for a record kept elsewhere:

    kolors-story-captions-cache results/<run> [--cache resources/cache/captions]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kolors_story.errors import UserError
from kolors_story.writing.captions import RECORDS, read_records, seed_cache
from kolors_story.writing.reply_cache import ReplyCache

CACHE = Path("resources/cache/captions")  # rules/paths.smk: CACHE/captions


def records_file(where: Path) -> Path:
    """A run folder's captions.jsonl, or the file itself; UserError naming the path when neither."""
    path = where / RECORDS if where.is_dir() else where
    if not path.is_file():
        raise UserError(f"{path}: no captions record here; give results/<run> of a run whose caption.backend "
                        "was data_juicer or openai (it writes data/captions.jsonl)")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="results/<run> (or its data/captions.jsonl)")
    parser.add_argument("--cache", type=Path, default=CACHE, help=f"the captions cache (default {CACHE})")
    args = parser.parse_args(argv)
    try:
        path = records_file(args.run)
        records = read_records(path)
    except (UserError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    added = seed_cache(records, ReplyCache(args.cache))
    print(f"{added} caption(s) from {path} added to {args.cache} ({len(records)} images in the record)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
