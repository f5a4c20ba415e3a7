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


def test_rehearsal_runs_every_rule_of_a_default_run_through_snakemake(tmp_path):
    """bench/rehearsal.py --smoke: the full-size rehearsal's tiny twin (make rehearsal runs it at
    full size), each job's time and peak memory tabled beside the weights it holds."""
    out = tmp_path / "rehearsal.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "rehearsal.py"), "--smoke", "--work", str(tmp_path),
                           "--out", str(out)], capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text(encoding="utf-8"))
    jobs = {row["job"].split("/")[0]: row for row in report["jobs"]}
    assert {"download_dataset", "filter_dataset", "build_metadata", "prepare_model", "encode_texts", "train_lora",
            "render_anchor", "generate_scene", "score_images", "compose_story", "bundle", "manifest"} <= set(jobs)
    assert all(row["seconds"] > 0 and row["peak_rss_gib"] >= row["peak_anonymous_gib"] > 0
               for row in report["jobs"]), report["jobs"]
    assert jobs["encode_texts"]["weights_gib"] > 0 and jobs["train_lora"]["weights_gib"] > jobs["render_anchor"]["weights_gib"]
    assert report["ok"] and "| train_lora/" in out.with_suffix(".md").read_text(encoding="utf-8")
    # The verdict can fail: the same rows with one job's log claiming it held more than weights + 3 GiB.
    sys.path.insert(0, str(ROOT / "bench"))
    import rehearsal

    train_log = next((tmp_path / "flow" / "results" / "shared" / "logs" / "train_lora").glob("*.log"))
    with open(train_log, "a", encoding="utf-8") as f:
        f.write(f"x INFO train_lora: {rehearsal.PEAK_ANONYMOUS} 9.500 GiB (sampled)\n")
    params = rehearsal.model_bytes(tmp_path / "models-tiny" / "kolors", tmp_path / "models-tiny" / "aesthetic")
    rows = {r.job.split("/")[0]: r for r in rehearsal.read_jobs(tmp_path / "flow" / "results", params, report["precision"])}
    assert not rows["train_lora"].ok and rows["train_lora"].peak_anonymous_gib == 9.5 and rows["encode_texts"].ok


def test_plan_rerun_benchmark_times_a_rerun_plan_over_a_local_folder(tmp_path):
    """bench/plan_rerun.py --smoke: the rerun-planning benchmark of content-tracked datasets."""
    out = tmp_path / "plan_rerun.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "plan_rerun.py"), "--smoke", "--work", str(tmp_path / "w"),
                           "--out", str(out)], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text(encoding="utf-8"))
    assert report["edit_named_and_planned"] and report["images"] == 200
    assert all(seconds > 0 for seconds in report["plan_s"].values()) and "vs baseline" in proc.stdout
