"""What every scripts/<stage>.py shares: logging to the rule's log file and clean user errors."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import Any

from kolors_story.errors import UserError


def setup_logging(log_path: str | None) -> None:
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_path:
        handlers.append(logging.FileHandler(log_path, mode="w", encoding="utf-8"))
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        handlers=handlers,
        force=True,
    )


def _limit_threads(threads: int) -> None:
    """Use the job's `threads:`, not every core: parallel jobs that each spin up all cores
    oversubscribe the CPU and run many times slower (measured on 2 cores)."""
    import torch

    torch.set_num_threads(max(1, int(threads)))


def run_rule(main: Callable[[Any], None], snakemake: Any) -> None:
    """Run a rule's main(snakemake); a UserError ends the job with its message, not a traceback.
    A job that declares `resources: gpu=1` takes a GPU no other job holds (hosts with several)."""
    setup_logging(snakemake.log[0] if snakemake.log else None)
    _limit_threads(snakemake.threads)
    if getattr(snakemake.resources, "gpu", 0) == 1:
        from kolors_story.gpu_slots import use_free_gpu

        use_free_gpu()
    try:
        main(snakemake)
    except UserError as err:
        logging.getLogger(snakemake.rule).error("%s", err)
        sys.exit(1)
