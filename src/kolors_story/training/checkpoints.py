"""Checkpoints that make an interrupted run continue exactly where it stopped.

A checkpoint holds the LoRA tensors, optimizer, LR-scheduler and fp16 loss-scaler state, the
generator state, the pending batch order, the step, and the loss and validation history. It loads
onto the CPU whatever device wrote it (the optimizer moves its state to the parameters' device),
so a run resumes on another GPU index, another host or the CPU. It is written to a temporary
folder and renamed, so a kill during the write leaves the previous checkpoint intact.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from kolors_story.files import ensure_space, share_as_umask_allows

log = logging.getLogger(__name__)

LORA_FILE = "lora.safetensors"
STATE_FILE = "state.pt"


def checkpoint_dir(root: Path, step: int) -> Path:
    return Path(root) / f"step-{step:06d}"


def list_checkpoints(root: Path, resumable: bool = True) -> list[Path]:
    """Complete checkpoints, oldest first (a temp folder from an interrupted write is ignored).
    resumable=False also lists those whose optimizer state was pruned (LoRA only)."""
    if not Path(root).is_dir():
        return []
    need = STATE_FILE if resumable else LORA_FILE
    return sorted(p for p in Path(root).glob("step-??????") if (p / need).is_file())


def save_checkpoint(root: Path, step: int, lora: dict[str, torch.Tensor], state: dict) -> Path:
    final = checkpoint_dir(root, step)
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    lora_bytes = sum(t.numel() * t.element_size() for t in lora.values())
    # AdamW keeps two fp32 moments per LoRA parameter; the rest of the state is small
    ensure_space(tmp, 3 * lora_bytes + (1 << 20), f"the checkpoint of step {step}")
    save_file({k: v.detach().cpu().contiguous() for k, v in lora.items()}, tmp / LORA_FILE)
    torch.save(state, tmp / STATE_FILE)
    share_as_umask_allows(tmp)  # safetensors wrote its file 0600
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return final


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    return load_file(Path(path) / LORA_FILE), torch.load(Path(path) / STATE_FILE, map_location="cpu",
                                                         weights_only=True)


def prune_states(root: Path, keep_last: int = 1) -> None:
    """Optimizer states are only needed to resume: keep them for the newest checkpoints only.
    LoRA files stay, so the best checkpoint can still be picked at the end."""
    for path in list_checkpoints(root)[:-keep_last]:
        (path / STATE_FILE).unlink()


def lora_of(path: Path) -> Path:
    return Path(path) / LORA_FILE


def load_checkpoint_lora(root: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(checkpoint_dir(root, step) / LORA_FILE)
