"""A Python path that holds only what the offline GPU host will have: the distributions of its image
(packages.txt beside this file) and the wheels `make wheelhouse` carries there, taken from this
environment file by file. Run with `python -I -S` and that path, a module the host lacks fails to
import exactly as it would there; no allow-list of module names is involved."""

from __future__ import annotations

import os
import re
import sys
from importlib import metadata
from pathlib import Path

from kolors_story.tools import wheelhouse

PACKAGES = Path(__file__).with_name("packages.txt")


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def host_distributions() -> set[str]:
    """The image's distributions plus the wheelhouse's (for the host's Python, 3.12)."""
    image = {_norm(line) for line in PACKAGES.read_text(encoding="utf-8").split("\n")
             if line.strip() and not line.startswith("#")}
    return image | set(wheelhouse.wanted("3.12"))


def build_host_site(dest: Path) -> tuple[Path, set[str], set[str]]:
    """Symlinks, one per installed file, of every host distribution installed here (their
    .dist-info too, for importlib.metadata's version checks). Returns the folder, the
    distributions linked and those the host has that this environment lacks."""
    wanted = host_distributions()
    linked: set[str] = set()
    for dist in metadata.distributions():
        name = _norm(dist.metadata["Name"])
        if name not in wanted or name in linked or not dist.files:
            continue
        root = Path(dist.locate_file(""))
        for file in dist.files:
            if file.parts[0] == ".." or "__pycache__" in file.parts:  # scripts outside site-packages
                continue
            target = dest / file
            if not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                os.symlink(root / file, target)
        linked.add(name)
    return dest, linked, wanted - linked


def isolated_command(site: Path, src: Path, code: str) -> list[str]:
    """`python -I -S` (no site-packages, no PYTHONPATH) with only the host site and the project's
    source on sys.path, running `code`."""
    prelude = f"import sys; sys.path[:0] = [{str(src)!r}, {str(site)!r}]\n"
    return [sys.executable, "-I", "-S", "-c", prelude + code]
