"""Each benchmark's --smoke mode on the test models' tiny widths: the code path of every
measurement runs and writes its report, so no benchmark rots unnoticed (the figures come from the
full runs; bench/gpu_memory_estimate.py has its own test, bench/job_fixed_cost.py runs in
tests/test_workflow.py beside the demo it needs)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def smoke(script: str, out: Path) -> tuple[dict, str]:
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / script), "--smoke", "--out", str(out)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return json.loads(out.read_text(encoding="utf-8")), proc.stdout


def test_scene_job_benchmark_times_best_of_n_and_consistency(tmp_path):
    result, _ = smoke("scene_job.py", tmp_path / "scene_job.json")
    best, consistency = result["best_of_n"], result["consistency"]
    assert best["unet_batch_batched"] == best["unet_batch_single"] * result["settings"]["candidates"]
    assert best["batched_s_per_image"] > 0 and best["single_s_per_image"] > 0
    assert consistency["anchor_tensors"] > 0 and consistency["with_s_per_image"] > 0


def test_train_caching_benchmark_compares_both_modes(tmp_path):
    result, stdout = smoke("train_caching.py", tmp_path / "train_caching.json")
    assert set(result["results"]) == {"cached", "recompute"}
    assert result["summary"]["time_ratio_measured"] > 0 and "ratio r/c" in stdout
