"""One GPU per job on hosts with several: GPU jobs that Snakemake runs side by side
(`--resources gpu=N`) each take a GPU no other job holds, instead of all landing on the first;
a multi-process training takes its N GPUs at once and gives its ranks exactly those.

A GPU is held by an exclusive lock on a file named after the GPU's UUID (the same physical GPU
whatever CUDA_VISIBLE_DEVICES says); the lock goes with the process, so a killed job frees it.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

log = logging.getLogger(__name__)

LOCK_DIR = Path(tempfile.gettempdir()) / "kolors-story-gpu-locks"
_HELD: dict[str, IO] = {}  # GPU name -> open lock file this process holds (closing it frees the GPU)


def claim_slot(names: list[str], lock_dir: Path | None = None, poll_s: float = 0.5) -> tuple[int, IO]:
    """Index of the first of `names` no other holder has locked, and the open file that holds it.
    Waits while every one is taken (more parallel GPU jobs than GPUs)."""
    lock_dir = Path(lock_dir or LOCK_DIR)  # looked up at call time (tests point it elsewhere)
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


def claim_slots(
    names: list[str], n: int, lock_dir: Path | None = None, poll_s: float = 0.5
) -> tuple[list[int], list[IO]]:
    """Indices of n of `names` that no other holder has locked, and their open lock files; waits
    (holding none) until n are free at once, so two multi-GPU jobs never deadlock on half each."""
    if n > len(names):
        raise ValueError(f"{n} GPUs asked for, {len(names)} visible")
    if n <= 0:
        return [], []
    lock_dir = Path(lock_dir or LOCK_DIR)  # looked up at call time (tests point it elsewhere)
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


def cuda_gpu_names() -> list[str]:
    """Lock names of this process's visible CUDA GPUs, by UUID; [] without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return []
    return [f"gpu-{torch.cuda.get_device_properties(i).uuid}" for i in range(torch.cuda.device_count())]


@contextlib.contextmanager
def hold_free_gpus(n: int) -> Iterator[str | None]:
    """Hold n GPUs no other job holds while the block runs (a multi-process training's ranks) and
    yield the CUDA_VISIBLE_DEVICES value that gives its children exactly those; None without CUDA.
    A GPU this process already holds (rule_runner's one-GPU claim, when Snakemake capped the job's
    gpu=N at --resources gpu=1) counts as one of them: locking it again would wait on ourselves."""
    names = cuda_gpu_names()
    if not names:
        yield None
        return
    mine = [i for i, name in enumerate(names) if name in _HELD][:n]
    others = [i for i in range(len(names)) if i not in mine]
    picked, handles = claim_slots([names[i] for i in others], n - len(mine))
    try:
        chosen = ",".join(visible_devices(len(names))[i] for i in sorted(mine + [others[j] for j in picked]))
        log.info("training processes get GPUs %s (CUDA_VISIBLE_DEVICES), free of other jobs", chosen)
        yield chosen
    finally:
        for handle in handles:
            handle.close()


def use_free_gpu() -> int | None:
    """With several visible GPUs, make a free one the current CUDA device of this process (so
    `torch.device("cuda")` means it) and return its index; None with fewer than two GPUs."""
    names = cuda_gpu_names()
    if len(names) < 2:
        return None
    import torch

    index, handle = claim_slot(names)
    _HELD[names[index]] = handle
    torch.cuda.set_device(index)
    log.info("using GPU %d of %d (free of other jobs)", index, len(names))
    return index
