"""Content-keyed caches of text embeddings and VAE latents on disk.

A caption is encoded once per text encoder, an image once per VAE, size, crop and flip; changing
one caption re-encodes one caption. Keys hash the content (caption text, image bytes), and each
model gets its own namespace from a fingerprint of its files, so a different model never reads
another's entries. Each entry carries the sha256 of its data in its safetensors metadata: an
entry found cut, flipped or unreadable is dropped, logged and made again.
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
import socket
from pathlib import Path

import torch
from safetensors.torch import load, save_file

from kolors_story.files import (
    SAFETENSORS_METADATA, ensure_space, read_safetensors_header, safetensors_header_bytes, share_as_umask_allows,
)

log = logging.getLogger(__name__)

_DIGEST = "data_sha256"


def _add_digest(path: Path) -> None:
    """Rewrite a fresh safetensors file with the sha256 of its data section in its metadata (the
    data bytes stay as save_file laid them out; only the header grows)."""
    raw = path.read_bytes()
    header = read_safetensors_header(raw)
    data = raw[header.data_start:]
    fields = {**header.fields, SAFETENSORS_METADATA: {**header.metadata, _DIGEST: hashlib.sha256(data).hexdigest()}}
    path.write_bytes(safetensors_header_bytes(fields) + data)


def _writer_id() -> str:
    """Who writes: host and process. PIDs repeat across the nodes of a cluster sharing one cache."""
    return f"{socket.gethostname()}-{os.getpid()}"


class TensorCache:
    """A folder of safetensors files, one per key; writes are atomic (rename), also when processes
    on several hosts fill the same entry at once on a shared filesystem: each writes its own
    temporary file (host, PID and a random part in the name) beside the entry, then renames it
    over the entry; a reader sees the old file or a complete new one, never a partial one."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.hits = self.misses = 0

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.safetensors"

    @staticmethod
    def key(*parts: object) -> str:
        return hashlib.sha256("\x1f".join(map(str, parts)).encode()).hexdigest()

    def has(self, key: str) -> bool:
        """Whether an entry exists (unread: `get` may still find it damaged)."""
        return self._path(key).is_file()

    def get(self, key: str) -> dict[str, torch.Tensor] | None:
        path = self._path(key)
        if path.is_file():
            tensors = self._read(path)
            if tensors is not None:
                self.hits += 1
                return tensors
        self.misses += 1
        return None

    def _read(self, path: Path) -> dict[str, torch.Tensor] | None:
        """An entry's tensors, or None after dropping an entry that is not what was written."""
        raw = path.read_bytes()
        try:
            header = read_safetensors_header(raw)
            want = header.metadata.get(_DIGEST)
            if want is not None and hashlib.sha256(raw[header.data_start:]).hexdigest() != want:
                raise ValueError("its data does not match the sha256 it was written with")
            return load(raw)
        except Exception as exc:  # noqa: BLE001 (a cut file fails in its header, safetensors or the digest)
            log.warning("cache entry %s is damaged (%s: %s); dropped, making it again", path,
                        type(exc).__name__, str(exc)[:120])
            path.unlink(missing_ok=True)
            return None

    def put(self, key: str, tensors: dict[str, torch.Tensor]) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        ensure_space(path.parent, sum(t.numel() * t.element_size() for t in tensors.values()),
                     f"a cache entry under {self.root}")
        tmp = path.with_name(f"{path.name}.tmp-{_writer_id()}-{secrets.token_hex(4)}")
        try:
            save_file(tensors, tmp)
            _add_digest(tmp)
            share_as_umask_allows(tmp)  # safetensors wrote it 0600: other users of the cache read it too
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
