"""Comparing two results/ trees: every file byte for byte except the ones that record time.

One definition for every test that checks that a run reproduces (a fresh folder, a SLURM cluster).
"""

from __future__ import annotations

import json
from pathlib import Path

TIMING_PARTS = {"logs", "benchmarks"}  # folders of logs and Snakemake benchmark files
TIMED_JSON = ("seconds", "created", "timings")  # keys of the JSON files below that hold wall clock
TIMED_FILES = {"timings.png"}  # the GPU jobs' wall-clock seconds drawn
TIMED_JSON_FILES = ("training_summary.json", "manifest.json")  # with TIMED_JSON keys
SEAL = ".seal.json"  # kolors_story.seals.SUFFIX


def is_timing(rel: str) -> bool:
    """Logs, benchmarks, the timings chart and a training job's work/ folder (its checkpoints keep
    the loss log with seconds) differ between two runs of the same config."""
    parts = rel.split("/")
    name = parts[-1].removeprefix(".").removesuffix(SEAL)  # a timed file's seal holds its digest: timed too
    if parts[-1].endswith(SEAL) and (name in TIMED_COLUMNS or name in TIMED_JSON_FILES):
        return True
    return (bool(TIMING_PARTS & set(parts)) or name in TIMED_FILES
            or ("lora" in parts and "work" in parts))


TIMED_COLUMNS = {"loss.csv": "seconds"}  # CSV files with a column of seconds (by its header)


def comparable(path: Path) -> bytes:
    """The file's bytes, with the timing column or keys of the files that carry some taken out."""
    if path.name in TIMED_COLUMNS:
        rows = [line.split(b",") for line in path.read_bytes().splitlines()]
        column = TIMED_COLUMNS[path.name].encode()
        if rows and column in rows[0]:
            i = rows[0].index(column)
            rows = [row[:i] + row[i + 1:] for row in rows]
        return b"\n".join(b",".join(row) for row in rows)
    if path.name in TIMED_JSON_FILES:
        data = json.loads(path.read_text(encoding="utf-8"))
        for key in TIMED_JSON:
            data.pop(key, None)
        return json.dumps(data, sort_keys=True).encode()
    return path.read_bytes()


def result_files(root: Path) -> list[str]:
    """Every file under `root` but the timing ones, as sorted relative paths."""
    return sorted(rel for rel in (str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
                  if not is_timing(rel))


def differing(first: Path, second: Path, files: list[str]) -> list[str]:
    """The files (relative paths) whose comparable bytes differ, or that one side lacks."""
    return [rel for rel in files if not (first / rel).is_file() or not (second / rel).is_file()
            or comparable(first / rel) != comparable(second / rel)]


def compare(first: Path, second: Path) -> dict[str, list[str]]:
    """Files only in one results/ folder, and files in both whose comparable bytes differ."""
    a, b = set(result_files(first)), set(result_files(second))
    return {"only_in_first": sorted(a - b), "only_in_second": sorted(b - a),
            "differ": differing(first, second, sorted(a & b))}
