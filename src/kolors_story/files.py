"""The file helpers every layer shares: a file's sha256, a JSON file as the project writes them,
free space checked before a large write (with the one message for a full disk), the mode a
shared results/ folder needs (share_as_umask_allows), and the one reader and writer of a
safetensors header (read_safetensors_header, safetensors_header_bytes)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
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


# ---------------------------------------------------------------- safetensors headers
# The format: an 8-byte little-endian length, that many bytes of JSON (each tensor's dtype, shape
# and data_offsets relative to the data section; "__metadata__": str -> str), then the data.
SAFETENSORS_METADATA = "__metadata__"


class NotSafetensors(ValueError):
    """Bytes that do not start with a safetensors header; the message says what is wrong."""


@dataclass(frozen=True)
class SafetensorsHeader:
    """A safetensors file's header: its JSON `fields` as stored (tensors and metadata, in file
    order) and `length`, the JSON's byte count with its padding."""

    fields: dict[str, Any]
    length: int

    @property
    def data_start(self) -> int:
        """Where the data section starts, counted from the file's first byte."""
        return 8 + self.length

    @property
    def metadata(self) -> dict[str, str]:
        return dict(self.fields.get(SAFETENSORS_METADATA) or {})

    def data_end(self) -> int:
        """Where the header says the data ends, counted from the file's first byte; KeyError,
        TypeError or IndexError for a tensor entry without data_offsets."""
        ends = (t["data_offsets"][1] for k, t in self.fields.items() if k != SAFETENSORS_METADATA)
        return self.data_start + max(ends, default=0)


def read_safetensors_header(source: Path | bytes) -> SafetensorsHeader:
    """The header of a safetensors file (only its head is read) or of its bytes; NotSafetensors
    when it is shorter than 8 bytes, names a length past its end, or is not a JSON object."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return _parse_header(len(source), bytes(source[:8]), lambda n: bytes(source[8:8 + n]))
    size = Path(source).stat().st_size
    with open(source, "rb") as handle:
        return _parse_header(size, handle.read(8), handle.read)


def _parse_header(size: int, head: bytes, read: Callable[[int], bytes]) -> SafetensorsHeader:
    """The header of a `size`-byte file given its first 8 bytes and a reader of what follows."""
    if len(head) < 8:
        raise NotSafetensors(f"unreadable header ({size}-byte file, shorter than its 8-byte length)")
    length = int.from_bytes(head, "little")
    if length > size - 8:  # checked before reading: a bogus length must not allocate it
        raise NotSafetensors(f"header of {length} bytes in a {size}-byte file")
    try:
        fields = json.loads(read(length))
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        raise NotSafetensors(f"unreadable header ({type(exc).__name__})") from exc
    if not isinstance(fields, dict):
        raise NotSafetensors(f"unreadable header (a JSON {type(fields).__name__}, not an object)")
    return SafetensorsHeader(fields, length)


def safetensors_header_bytes(fields: dict[str, Any]) -> bytes:
    """The 8-byte length and the header as safetensors writes it: compact JSON, UTF-8 unescaped,
    padded with spaces to a multiple of 8 bytes (the data stays 8-byte aligned)."""
    text = json.dumps(fields, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text
