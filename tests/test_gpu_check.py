"""`python -m kolors_story.gpu_check` at tiny size on the CPU: the full-size check's code path, its
JSON, and its promise to import nothing but the GPU host's few packages."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# What an offline GPU host has or gets from `make wheelhouse`; the check must import nothing else
# heavy (the workflow's own tools are not there).
FORBIDDEN = ("snakemake", "data_juicer", "modelscope", "modelscope_hub", "diffsynth", "matplotlib", "ray", "imagededup")

RUN = """
import runpy, sys, json
forbidden = set(json.loads(sys.argv[2]))
sys.argv = ["gpu_check"] + json.loads(sys.argv[1])
try:
    runpy.run_module("kolors_story.gpu_check", run_name="__main__")
except SystemExit as done:
    code = done.code
bad = sorted({m.split(".")[0] for m in sys.modules} & forbidden)
print("FORBIDDEN_IMPORTS", json.dumps(bad))
sys.exit(code)
"""


@pytest.fixture(scope="module")
def checked(tmp_path_factory) -> tuple[dict, str, Path]:
    from kolors_story.tiny_kolors import kolors_tokenizer_dir

    work = tmp_path_factory.mktemp("gpu_check")
    args = ["--size", "tiny", "--device", "cpu", "--train-steps", "3", "--resolution", "64", "--images", "2",
            "--sample-steps", "2", "--candidates", "2", "--precision", "fp32", "--work", str(work),
            "--out", str(work / "gpu_check.json")]
    # As on a GPU host without diffsynth: the tokenizer files come from a copy named by the variable.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "KOLORS_TOKENIZER_DIR": str(kolors_tokenizer_dir())}
    proc = subprocess.run([sys.executable, "-c", RUN, json.dumps(args), json.dumps(FORBIDDEN)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((work / "gpu_check.json").read_text()), proc.stdout, work


def test_gpu_check_runs_every_phase_and_reports_the_numbers(checked):
    report, stdout, work = checked
    phases = report["phases"]
    for name in ("build_kolors", "build_aesthetic", "encode_captions_and_latents", "train_job_load_unet", "train",
                 "scene_job_encode_prompt", "scene_job_load_pipeline", "render", "score"):
        assert phases[name]["seconds"] > 0, name
    assert phases["train"]["steps"] == 3 and report["seconds_per_training_step"] > 0
    assert phases["render"]["images"] == 2 and report["seconds_per_image"] > 0
    assert len(phases["score"]["scores"]) == 2
    assert set(report["model_load_seconds"]) == {"train_job_unet", "scene_job_text_encoder_and_prompt",
                                                 "scene_job_pipeline"}
    assert "s/training step" in stdout and (work / "panel.png").is_file()
    assert (work / "lora" / "pytorch_lora_weights.safetensors").is_file()


def test_gpu_check_builds_the_real_layout(checked):
    from kolors_story.kolors_folder import KolorsFolder

    _, _, work = checked
    folder = KolorsFolder(work / "kolors-tiny")
    assert folder.variant == "fp16" and folder.weights["text_encoder"].index == "model.safetensors.index.fp16.json"
    assert (work / "aesthetic-tiny" / "pytorch_model.bin").is_file()


def test_gpu_check_imports_only_what_a_gpu_host_has(checked):
    _, stdout, _ = checked
    line = next(x for x in stdout.splitlines() if x.startswith("FORBIDDEN_IMPORTS"))
    assert json.loads(line.split(" ", 1)[1]) == []


def test_gpu_check_refuses_cleanly_without_a_gpu(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    proc = subprocess.run([sys.executable, "-m", "kolors_story.gpu_check", "--work", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "no CUDA GPU visible" in proc.stderr
