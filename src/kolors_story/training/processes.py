"""Data-parallel training: one process per GPU, started by `accelerate launch`.

Every process draws the random numbers of *all* processes' micro-batches from the run's one
generator and keeps its own share. So the generator, the batch order and every checkpoint are the
same on all processes (rank 0 writes them, any process count can read them back), and N processes
with gradient accumulation A follow exactly the draws of one process with accumulation N*A. The
LoRA gradients and the step's loss are averaged with one all-reduce per optimizer step; the frozen
UNet needs no DistributedDataParallel wrapper.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta

import torch

from kolors_story.models import devices
from kolors_story.errors import UserError


# Ranks > 0 wait in a barrier while rank 0 fills the caches (every caption through ChatGLM, every
# image through the VAE): on a real dataset that outlasts the default 10-minute collective timeout.
BARRIER_TIMEOUT_ENV = "KOLORS_STORY_BARRIER_TIMEOUT_S"
DEFAULT_BARRIER_TIMEOUT = timedelta(hours=2)


def barrier_timeout() -> timedelta:
    """How long a rank waits in a collective ($KOLORS_STORY_BARRIER_TIMEOUT_S seconds, default 2 h)."""
    value = os.environ.get(BARRIER_TIMEOUT_ENV, "").strip()
    if not value:
        return DEFAULT_BARRIER_TIMEOUT
    try:
        timeout = timedelta(seconds=float(value))
    except (ValueError, OverflowError):  # not a number, NaN, inf
        timeout = timedelta(0)
    if timeout <= timedelta(0):
        raise UserError(f"{BARRIER_TIMEOUT_ENV}={value!r} is not a number of seconds > 0; unset it for "
                        f"the default ({DEFAULT_BARRIER_TIMEOUT}) or set e.g. {BARRIER_TIMEOUT_ENV}=14400.")
    return timeout


@dataclass(frozen=True)
class Processes:
    rank: int
    world: int
    device: torch.device

    @classmethod
    def start(cls, device: torch.device | None = None) -> "Processes":
        """This process's place in the launch; a plain `python` run is a world of one."""
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return cls(0, 1, device or devices.pick_device())
        from accelerate import PartialState

        # cpu=True on a host without CUDA gives the gloo backend (multi-process CPU runs, tests).
        state = PartialState(cpu=not torch.cuda.is_available(), timeout=barrier_timeout())
        return cls(state.process_index, state.num_processes, torch.device(state.device))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    @contextlib.contextmanager
    def main_first(self) -> Iterator[None]:
        """Rank 0 runs the block first (it fills the on-disk caches), then the others (they read)."""
        if not self.is_main:
            self.barrier()
        yield
        if self.is_main:
            self.barrier()

    def average(self, params: list[torch.nn.Parameter], loss: float) -> float:
        """Average the parameters' gradients and the loss over all processes (one all-reduce);
        returns the mean loss. Every process then takes the same optimizer step."""
        if self.world == 1:
            return loss
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1).float() for g in grads] + [torch.tensor([loss], device=grads[0].device)])
        torch.distributed.all_reduce(flat)
        flat /= self.world
        offset = 0
        for p, g in zip(params, grads):
            p.grad = flat[offset:offset + g.numel()].view_as(g).to(g.dtype)
            offset += g.numel()
        return float(flat[-1])


# Resolved at import: exit_with_parent also runs between fork and exec (Popen's preexec_fn), where
# loading a library could deadlock on a lock another thread held at the fork.
_PRCTL = ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None


def exit_with_parent(sig: int = signal.SIGKILL) -> None:
    """Have the kernel send `sig` to this process when its parent dies (Linux; elsewhere a no-op).
    torchrun starts each rank in its own session, so a SIGKILLed launcher (a killed Snakemake job)
    would otherwise leave the ranks training, and writing checkpoints, beside the rerun."""
    if _PRCTL is None:
        return
    parent = os.getppid()
    _PRCTL(1, sig)  # 1 = PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent died before the request took effect
        os.kill(os.getpid(), sig)
