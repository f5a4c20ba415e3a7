"""Scene prompts from the story outline, by a language model (kolors_story.writing):

    export DASHSCOPE_API_KEY=sk-...               # or the variable prompt_writer.api_key_env names
    kolors-story-write-prompts config.yaml [more.yaml ...] [--out FILE]

reads story.outline, story.prompt_rules and prompt_writer from the config files (merged in order,
as Snakemake's --configfile does), asks the model, checks every prompt, and writes
`results/<run>/prompts.yaml` (its `scenes` paste under story.scenes as they are; a scene with its
own prompt keeps it) and beside it `prompt_writer.jsonl`, every request and raw reply. Replies are
cached by request under resources/cache/llm/: the same outline and settings never ask again.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kolors_story.errors import UserError
from kolors_story.plan.config import load_schema, validate_outline
from kolors_story.plan.config_files import load_strict
from kolors_story.plan.sweep import deep_merge
from kolors_story.run_files import TRANSCRIPT_FILE
from kolors_story.writing.llm_client import ChatSettings
from kolors_story.writing.reply_cache import ReplyCache
from kolors_story.writing.scene_prompts import write_scenes_file

SCHEMA = Path("schemas/config.schema.yaml")
CACHE = Path("resources/cache/llm")


def read_config(paths: list[Path], schema: Path = SCHEMA) -> dict:
    config: dict = {}
    for path in paths:
        if not Path(path).is_file():
            raise UserError(f"{path}: no such config file")
        config = deep_merge(config, load_strict(Path(path)) or {})
    return validate_outline(config, load_schema(schema))


def run(paths: list[Path], out: Path | None, cache: Path | None) -> Path:
    config = read_config(paths)
    out = out or Path("results") / config["run"] / "prompts.yaml"
    settings = ChatSettings(**config["prompt_writer"])
    write_scenes_file(config["story"], config["story"]["prompt_rules"], settings, ReplyCache(cache), out,
                      out.parent / TRANSCRIPT_FILE)
    print(f"scene prompts -> {out}; paste its scenes under story.scenes (and delete story.outline), or "
          "let the workflow render them: it writes the same file when story.outline is given")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("configs", nargs="*", type=Path, default=[Path("config.yaml")], help="config files, merged in order")
    parser.add_argument("--out", type=Path, help="the prompts file (default results/<run>/prompts.yaml)")
    parser.add_argument("--cache", type=Path, default=CACHE, help=f"reply cache folder (default {CACHE})")
    parser.add_argument("--no-cache", action="store_true", help="ask the model even for a request asked before")
    args = parser.parse_args(argv)
    try:
        run(args.configs, args.out, None if args.no_cache else args.cache)
    except UserError as err:
        print(f"write_prompts: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
