"""bench/gpu_memory_estimate.py's smoke mode: every GPU phase of the default run is traced and set
against a 24 GiB card, so the benchmark cannot rot unnoticed (its figures come from the full run)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_the_memory_trace_covers_every_gpu_phase(tmp_path):
    out = tmp_path / "estimate.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench/gpu_memory_estimate.py"), "--smoke", "--out", str(out)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    estimate, traces = report["estimate"], report["traces"]
    phases = estimate["phases_with_margins"]
    assert set(phases) == {"text_encoding", "vae_encoding", "training", "validation", "scene_best_of_2",
                           "scene_best_of_2_unsliced_decode", "anchor", "scoring"}
    assert all(v > 0 for v in phases.values()) and isinstance(estimate["default_run_fits_card"], bool)
    assert phases["scene_best_of_2"] < phases["scene_best_of_2_unsliced_decode"]  # decoding one at a time
    assert "against a 24 GiB card" in proc.stdout and proc.stdout.count("headroom") == len(phases)
    # as the trainer does: latents by the fp32 VAE; validation's fp32 VAE and scorer on the GPU through the steps
    assert traces["vae_encode"]["weights"] >= 4 * report["params"]["vae"]
    valid = traces["validation"]
    assert valid["vae_weights"] >= 4 * report["params"]["vae"] and valid["scorer_weights"] > 0
    step = traces["unet_step"]["peak"] + valid["vae_weights"] + valid["scorer_weights"]
    assert phases["training"] == pytest.approx(step * 1.1 + 0.6 * 2**30)
