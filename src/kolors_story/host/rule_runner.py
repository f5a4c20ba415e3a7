"""What every scripts/<stage>.py shares: logging to the rule's log file and clean user errors."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import Any

from kolors_story.errors import UserError


FILE_ONLY = "file_only"  # a log record with this extra goes to the rule's log, not the console


def setup_logging(log_path: str | None) -> None:
    console = logging.StreamHandler(sys.stderr)
    console.addFilter(lambda record: not getattr(record, FILE_ONLY, False))
    handlers: list[logging.Handler] = [console]
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
    """Run a rule's main(snakemake). A UserError ends the job with its message, not a traceback;
    any other exception writes its full traceback to the rule's log and one line naming the rule,
    the error and the log to the console. A job that declares `resources: gpu=1` takes a GPU no
    other job holds (hosts with several)."""
    log_path = snakemake.log[0] if snakemake.log else None
    setup_logging(log_path)
    _limit_threads(snakemake.threads)
    if getattr(snakemake.resources, "gpu", 0) == 1:
        from kolors_story.host.gpu_slots import use_free_gpu

        use_free_gpu()
    try:
        main(snakemake)
    except UserError as err:
        logging.getLogger(snakemake.rule).error("%s", err)
        sys.exit(1)
    except Exception as err:  # noqa: BLE001 (every failure must reach the log, whatever its type)
        _report_crash(snakemake.rule, err, log_path)
        sys.exit(1)


def _report_crash(rule: str, err: Exception, log_path: str | None) -> None:
    log = logging.getLogger(rule)
    summary = f"{type(err).__name__}: {err}".splitlines()[0][:300]
    if not log_path:  # nowhere else to put it
        log.exception("rule %s failed: %s", rule, summary)
        return
    log.error("rule %s failed: %s", rule, summary, exc_info=err, extra={FILE_ONLY: True})
    print(f"rule {rule} failed: {summary} (full traceback in {log_path})", file=sys.stderr)
