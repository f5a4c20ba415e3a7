"""The file helpers every layer shares: a file's sha256, a JSON file as the project writes them,
free space checked before a large write (with the one message for a full disk), and the mode a
shared results/ folder needs (share_as_umask_allows)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

from kolors_story.errors import UserError

_CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in chunks (datasets and weights can be large)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for chunk in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _umask() -> int:
    """The process's umask, read without changing it where Linux says it (os.umask can only set it,
    and setting it even briefly would race with another thread creating a file)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def share_as_umask_allows(path: Path) -> Path:
    """Give a file, or a folder and everything in it, the mode open() and mkdir() would have given
    it: 0666 / 0777 & ~umask. safetensors (0.8) creates its files 0600 and tempfile's mkstemp and
    mkdtemp 0600 / 0700, so without this a teammate sharing results/ (a group folder, a cluster's
    shared disk) cannot read embeddings, anchors, checkpoints or the bundle. Call it on what a
    writer made, before the os.replace that publishes it."""
    path, mask = Path(path), _umask()
    for item in [path, *(path.rglob("*") if path.is_dir() else ())]:
        if not item.is_symlink():
            os.chmod(item, (0o777 if item.is_dir() else 0o666) & ~mask)
    return path


def write_json(data: Any, path: Path, sort_keys: bool = False) -> Path:
    """Indented UTF-8 JSON (Chinese kept readable, a diff between runs stays small), parents made."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False, sort_keys=sort_keys) + "\n", encoding="utf-8")
    return path


def _mount_point(path: Path) -> Path:
    """The filesystem a path is (or would be) on: its nearest existing folder's mount point."""
    path = _existing(path)
    while not os.path.ismount(path):
        path = path.parent
    return path


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def no_space_message(path: Path, need: int | None, what: str) -> str:
    """One line for a full disk: the filesystem, what was (to be) written, needed and free space."""
    mount = _mount_point(path)
    free = shutil.disk_usage(_existing(path)).free
    needed = f"{_size(need)} needed, " if need is not None else ""
    return (f"no space left on {mount} ({what}): {needed}{_size(free)} free; free some space there "
            "(or move resources/ and results/ to a larger disk) and rerun: finished outputs are kept")


def _existing(path: Path) -> Path:
    path = Path(path).absolute()
    while not path.exists():
        path = path.parent
    return path


class NoSpace(UserError):
    """Not enough free space for what a job is about to write."""


def ensure_space(path: Path, need: int, what: str, margin: float = 1.1) -> None:
    """Refuse to start writing `need` bytes under `path` when its filesystem has less free (with a
    10% margin): a clear line now instead of a half-written file and a cryptic error later."""
    if shutil.disk_usage(_existing(path)).free < need * margin:
        raise NoSpace(no_space_message(path, int(need * margin), what))
