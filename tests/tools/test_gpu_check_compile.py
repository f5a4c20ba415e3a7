"""`python -m kolors_story.tools.gpu_check --size tiny --device cpu --compile` on the GPU host's Python
path (tests/gpu_host): the compiled scene, anchor and consistency scene run on the CPU, with the
cheap aot_eager backend (generate.compile_backend), and the LoRA round trip still renders eagerly."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from gpu_host.site import build_host_site, isolated_command

SRC = Path(__file__).resolve().parents[2] / "src"
RUN = """
import runpy, sys, json
sys.argv = ["gpu_check"] + json.loads({args!r})
runpy.run_module("kolors_story.tools.gpu_check", run_name="__main__")
"""
ARGS = ["--size", "tiny", "--device", "cpu", "--train-steps", "2", "--resolution", "64", "--images", "2",
        "--sample-steps", "2", "--candidates", "2", "--compile", "--compile-backend", "aot_eager"]


def test_gpu_check_compiles_the_unet_on_the_cpu(tmp_path):
    from kolors_story.models.random_kolors import kolors_tokenizer_dir

    site, _, _ = build_host_site(tmp_path / "site")
    out = tmp_path / "work" / "gpu_check.json"
    args = [*ARGS, "--work", str(tmp_path / "work"), "--out", str(out)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "KOLORS_TOKENIZER_DIR": str(kolors_tokenizer_dir())}
    proc = subprocess.run(isolated_command(site, SRC, RUN.format(args=json.dumps(args))), capture_output=True,
                          text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    phases = report["phases"]
    assert report["status"] == "complete" and report["settings"]["compile_backend"] == "aot_eager"
    assert phases["scene_compile_and_warm_up"]["seconds"] > 0 and phases["scene_render"]["images"] == 2
    assert phases["lora_round_trip"]["ok"]
    assert {"anchor_job", "consistency_scene_job"} <= set(phases)
    assert "torch.compile of the UNet (aot_eager)" in proc.stderr
