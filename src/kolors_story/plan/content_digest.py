"""The content of a local input a config names (a dataset folder, a model folder, a LoRA file), as
one digest that the rules give their jobs as a param: Snakemake reruns a job whose params changed
(its `params` rerun trigger), so an edited, added, removed or renamed file reruns exactly the
chain that reads it, and a folder whose files only got new times (touch, a copy, a checkout)
reruns nothing.

The digest hashes each file's relative name and sha256. Hashing a folder of images on every
`snakemake` call would cost seconds, so each file's sha256 is kept in a cache keyed by the file's
identity (device, inode, size, mtime and ctime in ns, as kolors_story.seals trusts a checked
file): a rerun stats every file and hashes only those whose identity changed. Any write,
truncation or replacement changes ctime, which nothing can set back. A file changed less than
SETTLED_S before it is hashed is not cached (a coarse clock could give two changes one ctime).

Hidden names (starting with '.': .DS_Store, .git, ModelScope's .msc/.mv records) are not tracked,
as the dataset reader skips them. Links to folders are followed once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path

from kolors_story.files import sha256_file
from kolors_story.seals import SETTLED_S, file_identity

log = logging.getLogger(__name__)

FORMAT = 1
CACHE_FOLDER = "resources/cache/content"  # the workflow's cache of per-file hashes (relative to its folder)
Listing = dict[str, str]  # relative name (/-separated) -> sha256
LOUD_BYTES = 1 << 30  # hashing more than this at once is said in the log (a model folder's first plan)


def walk(root: Path) -> list[str]:
    """Relative names of every file under `root` (itself, if a file), hidden names left out."""
    if not root.is_dir():
        return [""]
    names, seen, pending = [], {root.resolve()}, [root]
    while pending:
        directory = pending.pop()
        with os.scandir(directory) as entries:
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                path = Path(entry.path)
                if entry.is_dir():
                    if path.resolve() not in seen:
                        seen.add(path.resolve())
                        pending.append(path)
                elif entry.is_file():
                    names.append(path.relative_to(root).as_posix())
    return sorted(names)


class DigestCache:
    """sha256 per file identity, one JSON file per input under `folder` (resources/cache/content)."""

    def __init__(self, folder: Path, root: Path):
        key = hashlib.sha256(os.path.abspath(root).encode()).hexdigest()[:16]
        self.path = Path(folder) / f"{key}.json"
        self.entries: dict[str, list] = {}
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            if data.get("format") == FORMAT:
                self.entries = data["files"]
        except (OSError, ValueError, KeyError):
            pass  # no cache yet, or a damaged one: hash again
        self.changed = False

    def sha256(self, name: str, path: Path) -> str:
        identity, started = file_identity(path), time.time()
        known = self.entries.get(name)
        if known and known[:-1] == identity:
            return known[-1]
        digest = sha256_file(path)
        if started - identity[4] / 1e9 >= SETTLED_S and file_identity(path) == identity:
            self.entries[name] = [*identity, digest]
            self.changed = True
        return digest

    def save(self, names: list[str]) -> None:
        """Keep the entries of `names` only, written atomically (concurrent planners may race)."""
        kept = {name: self.entries[name] for name in names if name in self.entries}
        if not self.changed and len(kept) == len(self.entries):
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"format": FORMAT, "files": kept}), encoding="utf-8")
        os.replace(tmp, self.path)


def listing(root: Path, cache_folder: Path) -> Listing:
    """Every tracked file of `root` (a folder or a file) with its sha256, through the cache."""
    root = Path(root)
    names = walk(root)
    cache = DigestCache(cache_folder, root)
    unknown = sum(os.path.getsize(root / n) for n in names if n not in cache.entries)
    if unknown >= LOUD_BYTES:
        log.warning("hashing %s (%.1f GB new or changed): once; later plans reuse the hashes", root, unknown / 1e9)
    files = {name: cache.sha256(name, root / name if name else root) for name in names}
    cache.save(names)
    return files


def digest(files: Listing) -> str:
    """One sha256 over the names and contents: what a job's param carries."""
    h = hashlib.sha256()
    for name in sorted(files):
        h.update(f"{name}\0{files[name]}\n".encode())
    return h.hexdigest()


def changes(before: Listing, now: Listing, shown: int = 5) -> str:
    """What changed, in words: 'a.txt edited; b.jpg added; 2 removed (c.jpg, d.jpg)'; '' if nothing."""
    groups = {"edited": sorted(n for n in now if n in before and now[n] != before[n]),
              "added": sorted(n for n in now if n not in before),
              "removed": sorted(n for n in before if n not in now)}
    parts = []
    for what, names in groups.items():
        if names:
            more = f", +{len(names) - shown} more" if len(names) > shown else ""
            parts.append(f"{len(names)} {what} ({', '.join(names[:shown])}{more})")
    return "; ".join(parts)
