"""gpu_check.json's shape (kolors_story.tools.gpu_check_report), without running the check: the
sections written from the typed records keep the keys docs/gpu-host.md describes, the estimates
ship with the package, and every estimate a phase is compared with is in them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kolors_story.tools import gpu_check_report as report

# gpu_check.json's top level, in order: the header, the status, the phases, then the summary
REPORT_KEYS = ["device", "versions", "settings", "status", "phases", "seconds_per_training_step",
               "seconds_per_image", "model_load_seconds", "estimates", "estimated_vs_measured_gib",
               "estimates_source", "total_seconds"]
MODEL_LOAD_KEYS = ["train_job_unet_disk", "train_job_unet_to_gpu", "chatglm_disk_to_gpu", "scene_job_unet_vae_disk",
                   "scene_job_to_gpu", "scene_job_lora_load", "scene_job_lora_fuse"]


def measured_phases(out: Path) -> report.Phases:
    header = report.Header("cpu", {"torch": torch.__version__}, {"size": "tiny"})
    phases = report.Phases(torch.device("cpu"), out, header)
    for phase in report.Phase:
        with phases.measure(phase) as record:
            record["figure"] = phase.value
    return phases


def figures() -> report.Measured:
    train = report.TrainFigures(steps=3, precision="bf16", final_loss=0.1, seconds_per_step_median=0.5,
                                seconds_per_step_min=0.4, validation={}, validations=[], picked_step=3)
    render = report.RenderFigures(images=2, steps=2, guidance_scale=5.0, precision="fp32", vae_decode_seconds=0.1,
                                  vae_decode_calls=2, denoise_seconds=0.2, seconds_per_image=0.15,
                                  seconds_per_step=0.1)
    return report.Measured(train=train, render=render, round_trip={"ok": True, "problems": []})


def test_the_complete_report_keeps_its_shape(tmp_path):
    phases = measured_phases(tmp_path / "gpu_check.json")
    phases.write(report.summary(phases, figures(), report.ESTIMATES, total_seconds=12.5))
    written = json.loads((tmp_path / "gpu_check.json").read_text(encoding="utf-8"))
    assert list(written) == REPORT_KEYS and written["status"] == "complete"
    assert list(written["phases"]) == [p.value for p in report.Phase]
    assert written["phases"]["train"] == {"figure": "train", "seconds": written["phases"]["train"]["seconds"]}
    assert list(written["model_load_seconds"]) == MODEL_LOAD_KEYS
    summary = (written["seconds_per_training_step"], written["seconds_per_image"], written["total_seconds"])
    assert summary == (0.5, 0.15, 12.5)
    compared = written["estimated_vs_measured_gib"]
    assert set(compared) == {p.value for p in report.MEMORY_PAIRS}
    assert compared["train"] == {"estimated_gib": compared["train"]["estimated_gib"], "estimate_of": ["training"],
                                 "measured_reserved_gib": None}  # no CUDA here
    assert written["estimates"]["peak_phase"] == "text_encoding"
    assert written["estimates_source"].endswith("kolors_story/tools/gpu_memory_estimate.json")


def test_without_the_estimates_the_report_says_how_to_make_them(tmp_path):
    phases = measured_phases(tmp_path / "gpu_check.json")
    missing = tmp_path / "none.json"
    written = report.summary(phases, figures(), missing, total_seconds=1.0)
    assert written.estimates is None and written.estimated_vs_measured_gib is None
    assert written.estimates_source == f"not found: run bench/gpu_memory_estimate.py --out {missing}"


def test_a_failed_phase_is_named_with_its_traceback(tmp_path):
    phases = report.Phases(torch.device("cpu"), tmp_path / "g.json", report.Header("cpu", {}, {}))
    with pytest.raises(RuntimeError), phases.measure(report.Phase.TRAIN):
        raise RuntimeError("out of memory")
    written = json.loads((tmp_path / "g.json").read_text(encoding="utf-8"))
    assert written["status"] == "failed" and list(written["failed"]) == ["phase", "error", "traceback"]
    assert written["failed"]["phase"] == "train" and written["failed"]["error"] == "RuntimeError: out of memory"
    assert "Traceback" in written["failed"]["traceback"]


def test_the_estimates_ship_in_the_package_with_every_phase_compared():
    """The trace is package data (pyproject.toml), and each bench phase a gpu_check phase is held
    against is in it: a renamed bench phase would drop a comparison without a word."""
    estimate = json.loads(report.ESTIMATES.read_text(encoding="utf-8"))["estimate"]["phases_with_margins"]
    assert {name for names in report.MEMORY_PAIRS.values() for name in names} <= set(estimate)
