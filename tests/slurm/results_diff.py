"""Which files differ between two results/ folders, leaving out what holds wall-clock time.

The one list of what may differ between two runs of the same config (here: the demo through SLURM
and the demo run locally). Files are matched by name and folder names anywhere under results/, so
the comparison does not depend on the layout (results/<run>/, results/<variant>/, shared stores).
"""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath

# Folders whose files are timings or timing-laden by nature: anywhere in the path.
TIMING_DIRS = ("logs", "benchmarks")
# A "work" folder below a "lora" folder holds training checkpoints (their loss log has seconds).
CHECKPOINT_DIR = ("lora", "work")
# CSV files with a column of seconds, by file name -> column name (from the header).
TIMING_COLUMNS = {"loss.csv": "seconds"}
# JSON files with timing keys at the top level, by file name -> keys.
TIMING_KEYS = {"training_summary.json": ("seconds",), "manifest.json": ("created", "timings")}


def excluded(rel: str) -> bool:
    """True for a file (path relative to results/) that holds nothing but timings."""
    parts = PurePosixPath(rel).parts[:-1]
    if any(p in TIMING_DIRS for p in parts):
        return True
    parent, child = CHECKPOINT_DIR
    return parent in parts and child in parts[parts.index(parent) + 1:]


def comparable(path: Path) -> bytes:
    """The file's bytes, with its timing column or keys (if its name has any) taken out."""
    name = path.name
    if name in TIMING_COLUMNS:
        lines = [line.split(b",") for line in path.read_bytes().splitlines()]
        column = TIMING_COLUMNS[name].encode()
        if lines and column in lines[0]:
            index = lines[0].index(column)
            lines = [row[:index] + row[index + 1:] for row in lines]
        return b"\n".join(b",".join(row) for row in lines)
    if name in TIMING_KEYS:
        data = json.loads(path.read_text(encoding="utf-8"))
        for key in TIMING_KEYS[name]:
            data.pop(key, None)
        return json.dumps(data, sort_keys=True).encode()
    return path.read_bytes()


def files(results: Path) -> set[str]:
    return {p.relative_to(results).as_posix() for p in results.rglob("*") if p.is_file()}


def compare(first: Path, second: Path) -> dict[str, list[str]]:
    """Files only in one folder, and files in both whose comparable bytes differ (timings aside)."""
    a = {rel for rel in files(first) if not excluded(rel)}
    b = {rel for rel in files(second) if not excluded(rel)}
    return {
        "only_in_first": sorted(a - b),
        "only_in_second": sorted(b - a),
        "differ": sorted(rel for rel in a & b if comparable(first / rel) != comparable(second / rel)),
    }
