"""LoRA tensors on disk, whatever their keys: read a safetensors file or a torch checkpoint (plain
tensors only), and keep the safetensors files written byte-stable."""

from __future__ import annotations

from pathlib import Path

import torch

from kolors_story.errors import UserError
from kolors_story.files import SAFETENSORS_METADATA, ensure_space, read_safetensors_header, safetensors_header_bytes

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


def load_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The file's tensors and (for safetensors) its metadata; UserError for anything else."""
    if not path.is_file():
        raise UserError(f"LoRA file {path} not found; check the path.")
    with open(path, "rb") as f:
        head = f.read(16)
    looks_safetensors = len(head) > 8 and head[8:9] == b"{"
    if path.suffix == ".safetensors" or (path.suffix not in PICKLE_SUFFIXES and looks_safetensors):
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
        except Exception as err:  # noqa: BLE001 - any parse failure is the file's fault
            raise UserError(f"LoRA file {path} is not a readable safetensors file ({err}).") from None
    return _load_checkpoint(path), {}


def _load_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a torch pickle, refusing anything but plain tensors (a LoRA from elsewhere
    must not run code on load)."""
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - UnpicklingError, zip errors, EOF, ...
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(
            f"LoRA file {path} could not be loaded as plain tensors (torch.load with "
            f"weights_only=True refused it: {first}). Only tensor checkpoints are accepted; "
            f"re-save it as a dict of tensors or as safetensors."
        ) from None
    if isinstance(raw, dict) and isinstance(raw.get("state_dict"), dict):
        raw = raw["state_dict"]  # a Lightning checkpoint saved without DiffSynth's hook
    if not isinstance(raw, dict):
        raise UserError(f"LoRA file {path} holds a {type(raw).__name__}, not a dict of tensors.")
    return {k: v for k, v in raw.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}


def make_room(folder: Path, state: dict[str, torch.Tensor], what: str) -> None:
    """Create `folder` and refuse, before writing, when its disk cannot hold `state`."""
    folder.mkdir(parents=True, exist_ok=True)
    ensure_space(folder, sum(t.numel() * t.element_size() for t in state.values()), what)


def sort_safetensors_metadata(path: Path) -> None:
    """Rewrite the header with its metadata keys sorted: safetensors (0.8) writes them from a
    Rust HashMap, in an order that changes from process to process. Tensor data is untouched
    (its offsets are relative to the end of the header)."""
    raw = path.read_bytes()
    header = read_safetensors_header(raw)
    fields = dict(header.fields)
    meta = fields.pop(SAFETENSORS_METADATA, None)
    ordered = ({SAFETENSORS_METADATA: dict(sorted(meta.items()))} if meta else {}) | fields
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(safetensors_header_bytes(ordered) + raw[header.data_start:])
    tmp.replace(path)


__all__ = ["PICKLE_SUFFIXES", "load_tensors", "make_room", "sort_safetensors_metadata"]
