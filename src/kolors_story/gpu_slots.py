"""One GPU per job on hosts with several: GPU jobs that Snakemake runs side by side
(`--resources gpu=N`) each take a GPU no other job holds, instead of all landing on the first.

A GPU is held by an exclusive lock on a file named after the GPU's UUID (the same physical GPU
whatever CUDA_VISIBLE_DEVICES says); the lock goes with the process, so a killed job frees it.
"""

from __future__ import annotations

import fcntl
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import IO

log = logging.getLogger(__name__)

LOCK_DIR = Path(tempfile.gettempdir()) / "kolors-story-gpu-locks"
_HELD: list[IO] = []  # open lock files of this process: closing one would free its GPU


def claim_slot(names: list[str], lock_dir: Path = LOCK_DIR, poll_s: float = 0.5) -> tuple[int, IO]:
    """Index of the first of `names` no other holder has locked, and the open file that holds it.
    Waits while every one is taken (more parallel GPU jobs than GPUs)."""
    lock_dir.mkdir(parents=True, exist_ok=True)
    waited = False
    while True:
        for index, name in enumerate(names):
            handle = open(lock_dir / f"{name}.lock", "w")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return index, handle
            except BlockingIOError:
                handle.close()
        if not waited:
            log.info("all %d GPUs are held by other jobs; waiting for one", len(names))
            waited = True
        time.sleep(poll_s)


def claim_slots(names: list[str], n: int, lock_dir: Path = LOCK_DIR, poll_s: float = 0.5) -> tuple[list[int], list[IO]]:
    """Indices of n of `names` that no other holder has locked, and their open lock files; waits
    (holding none) until n are free at once, so two multi-GPU jobs never deadlock on half each."""
    if n > len(names):
        raise ValueError(f"{n} GPUs asked for, {len(names)} visible")
    lock_dir.mkdir(parents=True, exist_ok=True)
    waited = False
    while True:
        held: list[tuple[int, IO]] = []
        for index, name in enumerate(names):
            handle = open(lock_dir / f"{name}.lock", "w")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                held.append((index, handle))
            except BlockingIOError:
                handle.close()
            if len(held) == n:
                return [i for i, _ in held], [h for _, h in held]
        for _, handle in held:
            handle.close()
        if not waited:
            log.info("waiting for %d of %d GPUs to be free of other jobs", n, len(names))
            waited = True
        time.sleep(poll_s)


def visible_devices(count: int) -> list[str]:
    """The ids CUDA_VISIBLE_DEVICES gives this process's GPUs 0..count-1 (e.g. SLURM's), else 0..count-1."""
    given = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    return given[:count] if len(given) >= count else [str(i) for i in range(count)]


def hold_free_gpus(n: int) -> str | None:
    """Claim n GPUs no other job holds, for the life of this process (a multi-process training's
    ranks), and return the CUDA_VISIBLE_DEVICES value that gives its children exactly those;
    None without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return None
    count = torch.cuda.device_count()
    names = [f"gpu-{torch.cuda.get_device_properties(i).uuid}" for i in range(count)]
    indices, handles = claim_slots(names, n)
    _HELD.extend(handles)
    chosen = ",".join(visible_devices(count)[i] for i in indices)
    log.info("training processes get GPUs %s (CUDA_VISIBLE_DEVICES), free of other jobs", chosen)
    return chosen


def use_free_gpu() -> int | None:
    """With several visible GPUs, make a free one the current CUDA device of this process (so
    `torch.device("cuda")` means it) and return its index; None with fewer than two GPUs."""
    import torch

    if not torch.cuda.is_available() or torch.cuda.device_count() < 2:
        return None
    names = [f"gpu-{torch.cuda.get_device_properties(i).uuid}" for i in range(torch.cuda.device_count())]
    index, handle = claim_slot(names)
    _HELD.append(handle)
    torch.cuda.set_device(index)
    log.info("using GPU %d of %d (free of other jobs)", index, len(names))
    return index
