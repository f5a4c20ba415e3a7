"""A job's peak memory, as the rehearsal's verdict needs it: the kernel's high-water mark of the
resident set counts the memory-mapped weight files a model is read from (clean file pages the
kernel can drop at any time), so a model loaded from fp16 files into fp32 peaks at both. The
anonymous part (what the job really holds: tensors, the allocator, Python) has no high-water mark
in /proc, so a daemon thread samples it."""

from __future__ import annotations

import resource
import threading
from pathlib import Path

GIB_PER_KIB = 1 / 2**20
STATUS = Path("/proc/self/status")


def status_kib(field: str) -> int | None:
    """A KiB figure of /proc/self/status (VmRSS, VmHWM, RssAnon, RssFile...); None where absent."""
    try:
        for line in STATUS.read_text(encoding="ascii").splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _anonymous_kib() -> int:
    return status_kib("RssAnon") or 0


class AnonymousPeak:
    """The largest anonymous resident memory of this process seen since start(), sampled every
    `interval_s` (a /proc read: negligible next to a model job). 0 where /proc has no RssAnon."""

    def __init__(self, interval_s: float = 0.2):
        self.interval_s, self.peak_kib = interval_s, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="anonymous-memory-peak", daemon=True)

    def start(self) -> "AnonymousPeak":
        if STATUS.is_file():
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_kib = max(self.peak_kib, _anonymous_kib())
            self._stop.wait(self.interval_s)

    def stop(self) -> float:
        """Stops sampling; the peak in GiB (the current value included)."""
        self._stop.set()
        if STATUS.is_file():
            self.peak_kib = max(self.peak_kib, _anonymous_kib())
        return self.peak_kib * GIB_PER_KIB


def resident_high_water_gib() -> tuple[float, float]:
    """The kernel's peak resident set (file pages included) of this process and of its largest
    child process (a multi-process training's ranks), GiB."""
    mine = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    child = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return mine * GIB_PER_KIB, child * GIB_PER_KIB
