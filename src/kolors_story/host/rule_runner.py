"""What every scripts/<stage>.py shares: logging to the rule's log file, clean user errors, one line
for a full disk or a Ctrl-C, and seals: inputs checked before the job, outputs sealed after it."""

from __future__ import annotations

import errno
import logging
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kolors_story import seals
from kolors_story.errors import UserError
from kolors_story.files import no_space_message
from kolors_story.host.memory_peak import AnonymousPeak, resident_high_water_gib


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


def run_rule(main: Callable[[Any], None], snakemake: Any, seal_outputs: bool = True) -> None:
    """Run a rule's main(snakemake). Every sealed input (kolors_story.seals) is checked first; after
    main, every output is sealed (seal_outputs=False for model folders: 16 GB is not re-hashed per
    job). A UserError ends the job with its message, not a traceback; a full disk or a Ctrl-C with
    one line; any other exception writes its full traceback to the rule's log and one line naming
    the rule, the error and the log to the console. A job that declares `resources: gpu=1` takes a
    GPU no other job holds, any user's (waiting while all are held), and sees only that one
    (host.gpu_slots.use_free_gpu), before anything starts CUDA."""
    log_path = snakemake.log[0] if snakemake.log else None
    setup_logging(log_path)
    log = logging.getLogger(snakemake.rule)
    anonymous = AnonymousPeak().start()
    try:
        _limit_threads(snakemake.threads)
        if getattr(snakemake.resources, "gpu", 0) == 1:
            from kolors_story.host.gpu_slots import use_free_gpu

            use_free_gpu()
        _verify_inputs(snakemake.input, log)
        main(snakemake)
        if seal_outputs:
            for path in snakemake.output:
                seals.seal(Path(path), snakemake.rule)
        log_peak_memory(log, anonymous)
    except UserError as err:
        log.error("%s", err)
        sys.exit(1)
    except KeyboardInterrupt:
        log.error("rule %s interrupted; its unfinished outputs are removed and a rerun starts it again",
                  snakemake.rule)
        sys.exit(130)
    except (OSError, RuntimeError) as err:
        if (message := _disk_full(err, snakemake.output)) is None:
            _report_crash(snakemake.rule, err, log_path)
        else:
            log.error("rule %s failed: %s", snakemake.rule, message)
        sys.exit(1)
    except Exception as err:  # noqa: BLE001 (every failure must reach the log, whatever its type)
        _report_crash(snakemake.rule, err, log_path)
        sys.exit(1)


# The log lines bench/rehearsal.py reads (Snakemake's benchmark polls every 30 s: it misses peaks).
PEAK_RSS = "peak RSS"
PEAK_ANONYMOUS = "peak anonymous memory"


def log_peak_memory(log: logging.Logger, anonymous: AnonymousPeak) -> None:
    """The job's peak resident memory (the kernel's high-water mark, memory-mapped weight files
    included) and its sampled peak of anonymous memory (what it really holds)."""
    mine, child = resident_high_water_gib()
    log.info("%s %.3f GiB (largest child process %.3f GiB)", PEAK_RSS, mine, child)
    log.info("%s %.3f GiB (sampled; memory-mapped files not counted)", PEAK_ANONYMOUS, anonymous.stop())


def _verify_inputs(inputs: Any, log: logging.Logger) -> None:
    """Fail before any work when an input is not what its job sealed (or a cut .safetensors)."""
    checked = 0
    for path in map(Path, inputs):
        if seals.seal_path(path).is_file() or path.suffix == ".safetensors":
            seals.verify(path)
            checked += 1
    if checked:
        log.info("%d input artifact(s) match their seals", checked)


# torch.save and safetensors report a full disk without saying so (PyTorch's zip writer:
# "[enforce fail at inline_container.cc:...] . unexpected pos 40763 vs 40720").
_FULL_DISK = re.compile(r"No space left on device|unexpected pos \d+ vs \d+|file write failed")


def _disk_full(err: BaseException, outputs: Any) -> str | None:
    """The one line for an error that a full disk caused, or None for any other error."""
    if not (getattr(err, "errno", None) == errno.ENOSPC or _FULL_DISK.search(str(err))):
        return None
    where = Path(next(iter(outputs), "."))
    return no_space_message(where, need=None, what=f"{type(err).__name__}: {str(err).splitlines()[0][:120]}")


def _report_crash(rule: str, err: Exception, log_path: str | None) -> None:
    log = logging.getLogger(rule)
    summary = f"{type(err).__name__}: {err}".splitlines()[0][:300]
    if not log_path:  # nowhere else to put it
        log.exception("rule %s failed: %s", rule, summary)
        return
    log.error("rule %s failed: %s", rule, summary, exc_info=err, extra={FILE_ONLY: True})
    print(f"rule {rule} failed: {summary} (full traceback in {log_path})", file=sys.stderr)
