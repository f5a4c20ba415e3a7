"""The tools that lived in this package once: `python -m kolors_story.host.<tool>` (old docs, old
scripts, a model card published before the move) exits 2 naming the command that replaced it,
instead of running nothing or failing with a bare ImportError."""

from __future__ import annotations

import sys
from typing import NoReturn

# the old module -> the command that replaced it (pyproject.toml's [project.scripts])
MOVED = {
    "captions_cache": "kolors-story-captions-cache",
    "gpu_check": "kolors-story-gpu-check",
    "reproduce": "kolors-story-reproduce",
    "wheelhouse": "kolors-story-wheelhouse",
    "write_prompts": "kolors-story-write-prompts",
}


def message(tool: str) -> str:
    return (f"kolors_story.host.{tool} moved: run `{MOVED[tool]}` (or `python -m kolors_story.tools.{tool}`) "
            "with the same arguments")


def moved(name: str, tool: str) -> NoReturn:
    """Run as a command (`name` is "__main__"): the message on stderr, exit 2. Imported: ImportError
    with the same message, so old code that imported the module learns where its names went."""
    if name == "__main__":
        print(message(tool), file=sys.stderr)
        sys.exit(2)
    raise ImportError(message(tool))
