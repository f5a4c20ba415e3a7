"""`python -m kolors_story.tools.gpu_check` at tiny size on the CPU: the full-size check's code path, its
JSON, and its promise to run on the GPU host: it runs here on a Python path that holds only the
host image's distributions and the wheelhouse's (tests/gpu_host), so a module the host lacks fails
this test exactly as it would fail there."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gpu_host.site import build_host_site, isolated_command
from test_gpu_check_report import REPORT_KEYS

from kolors_story.tools.gpu_check_report import Phase

ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "src"
RUN = """
import runpy, sys, json
sys.argv = ["gpu_check"] + json.loads({args!r})
runpy.run_module("kolors_story.tools.gpu_check", run_name="__main__")
"""


@pytest.fixture(scope="module")
def host_site(tmp_path_factory) -> Path:
    site, linked, _ = build_host_site(tmp_path_factory.mktemp("host_site"))
    assert {"torch", "diffusers", "transformers", "peft", "simple-aesthetics-predictor"} <= linked
    return site


def run_check(host_site: Path, args: list[str], cpu_bf16: bool = False) -> subprocess.CompletedProcess:
    from kolors_story.models.devices import CPU_BF16_ENV
    from kolors_story.models.random_kolors import kolors_tokenizer_dir

    # As on a GPU host without diffsynth: the tokenizer files come from a copy named by the variable.
    # bf16 on this CPU only when asked (forced where the CPU lacks it: slow but the same numerics).
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "KOLORS_TOKENIZER_DIR": str(kolors_tokenizer_dir()),
           CPU_BF16_ENV: "1" if cpu_bf16 else "0"}
    # In the project's folder, as make gpu-check runs it: the default run's config.yaml is there.
    return subprocess.run(isolated_command(host_site, SRC, RUN.format(args=json.dumps(args))),
                          capture_output=True, text=True, env=env, timeout=900, cwd=ROOT)


TINY = ["--size", "tiny", "--device", "cpu", "--train-steps", "3", "--resolution", "64", "--images", "2",
        "--sample-steps", "2", "--candidates", "2"]


@pytest.fixture(scope="module")
def checked(host_site, tmp_path_factory) -> tuple[dict, str, Path]:
    work = tmp_path_factory.mktemp("gpu_check")
    proc = run_check(host_site, [*TINY, "--work", str(work), "--out", str(work / "gpu_check.json")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((work / "gpu_check.json").read_text()), proc.stdout + proc.stderr, work


@pytest.fixture(scope="module")
def checked_bf16(host_site, tmp_path_factory) -> tuple[dict, str, Path]:
    """The full-size CPU rehearsal's settings at tiny size: bf16 generation and training, 2 steps."""
    work = tmp_path_factory.mktemp("gpu_check_bf16")
    args = [*TINY, "--train-steps", "2", "--precision", "bf16", "--train-precision", "bf16", "--work", str(work),
            "--out", str(work / "gpu_check.json")]
    proc = run_check(host_site, args, cpu_bf16=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((work / "gpu_check.json").read_text()), proc.stdout + proc.stderr, work


def test_the_host_site_lacks_what_the_host_lacks(host_site):
    proc = subprocess.run(isolated_command(host_site, SRC, "import jsonschema"), capture_output=True, text=True)
    assert proc.returncode != 0 and "No module named 'jsonschema'" in proc.stderr


def test_gpu_check_runs_every_phase_and_reports_the_numbers(checked):
    report, output, work = checked
    phases = report["phases"]
    for name in ("build_kolors", "build_aesthetic", "train_encode_captions_and_latents", "train_unet_disk_load",
                 "train_unet_to_gpu", "train", "chatglm_disk_load_to_gpu", "encode_texts", "write_embeddings_file",
                 "scene_unet_vae_disk_load", "scene_move_to_gpu", "scene_lora_load", "scene_lora_fuse",
                 "scene_render", "score", "anchor_job", "consistency_scene_job"):
        assert phases[name]["seconds"] > 0, name
    assert report["status"] == "complete" and "failed" not in report
    assert phases["train"]["steps"] == 3 and report["seconds_per_training_step"] > 0
    render = phases["scene_render"]
    assert render["images"] == 2 and render["vae_decode_calls"] >= 1 and 0 < render["vae_decode_seconds"] < render["seconds"]
    assert len(phases["score"]["scores"]) == 2
    assert phases["write_embeddings_file"]["mib"] > 0 and phases["scene_prompt_embeddings_from_file"]["seconds"] > 0
    # The defaults are the config's: generation in fp16 (fp32 on the CPU), training in bf16.
    assert report["settings"]["precision"] == "fp16" and report["settings"]["train_precision"] == "bf16"
    assert "s/training step" in output and (work / "panel.png").is_file() and (work / "consistency_panel.png").is_file()
    assert (work / "lora" / "pytorch_lora_weights.safetensors").is_file()
    # The full-size trace's estimates beside the measured peaks (the trace the package carries).
    assert report["estimates_source"].endswith("kolors_story/tools/gpu_memory_estimate.json"), report
    assert {"train", "encode_texts", "scene_render", "anchor_job", "score"} <= set(report["estimated_vs_measured_gib"])
    # Every phase the check names, under the name gpu_check.json has always had (the literal list above).
    assert set(phases) == {p.value for p in Phase} - {Phase.SCENE_COMPILE.value}  # that one with --compile only
    assert list(report) == REPORT_KEYS


TINY_LORA_LAYERS = 32  # to_q/k/v/out.0 of attn1 and attn2 in the tiny UNet's 4 transformer blocks


def assert_round_trip_holds(trip: dict, loaded_in: "torch.dtype") -> None:
    from kolors_story.tools import lora_round_trip as rt

    file, loaded = trip["weights"]["file_vs_trained"], trip["weights"]["loaded_vs_file"]
    assert trip["ok"] and trip["problems"] == [], trip["problems"]
    assert file["layers"] == loaded["layers"] == TINY_LORA_LAYERS and file["ok"] and loaded["ok"]
    # The file holds the trained update up to fp32 rounding; diffusers holds it in the pipeline's dtype.
    assert file["worst_error"] <= file["tolerance"] == rt.delta_tolerance(16) < 1e-5
    assert loaded["worst_error"] <= loaded["tolerance"] == rt.delta_tolerance(16, loaded_in)
    images = trip["images"]
    assert images["precision"] == "fp32" and images["lora_scale"] > 1  # two steps: scaled up
    assert images["lora_vs_no_lora_mean_abs"] >= rt.IMAGE_FLOOR
    assert images["fused_vs_unfused_mean_abs"] <= rt.ROUNDING_SHARE * images["lora_vs_no_lora_mean_abs"]


def test_the_lora_round_trip_holds_in_fp32(checked):
    import torch

    assert_round_trip_holds(checked[0]["phases"]["lora_round_trip"], torch.float32)
    assert checked[0]["phases"]["lora_round_trip"]["weights"]["loaded_vs_file"]["worst_error"] == 0.0


def test_the_lora_round_trip_holds_in_bf16_after_two_steps(checked_bf16):
    """What failed at full size in bf16 (every image difference ~0.0026, the LoRA's own effect
    included): the verdict holds, and diffusers really held the LoRA in bf16 (its rounding shows)."""
    import torch

    report, output, _ = checked_bf16
    assert report["settings"]["precision"] == "bf16" and report["phases"]["train"]["steps"] == 2
    trip = report["phases"]["lora_round_trip"]
    assert_round_trip_holds(trip, torch.bfloat16)
    assert trip["weights"]["loaded_vs_file"]["worst_error"] > 1e-4 and "LoRA round trip ok" in output


def test_training_validates_as_the_default_run_does(checked):
    """config.yaml validates every 100 steps with pick_best: the check's 3 steps validate every
    step (twice at least), at its size and sampling steps, and the round trip reads the picked
    checkpoint."""
    report, _, work = checked
    train = report["phases"]["train"]
    assert train["validation"] == {"every": 1, "size": 64, "steps": 2, "prompts": 2, "pick_best": True}
    assert [v["step"] for v in train["validations"]] == [1, 2, 3]
    best = max(train["validations"], key=lambda v: (v["mean"], -v["step"]))
    assert train["picked_step"] == best["step"]
    assert len(list((work / "lora" / "validation").glob("step-*.png"))) == 3


def test_validation_settings_follow_the_default_config(tmp_path, monkeypatch):
    from kolors_story.tools import gpu_check

    monkeypatch.chdir(ROOT)  # --config's default: config.yaml in the current folder
    full = gpu_check.validation_settings(gpu_check.parse_args(["--train-steps", "30"]))
    assert (full.every, full.size, full.steps, full.pick_best, len(full.prompts)) == (15, 512, 20, True, 2)
    long = gpu_check.validation_settings(gpu_check.parse_args(["--train-steps", "500", "--resolution", "256",
                                                               "--sample-steps", "2"]))
    assert (long.every, long.size, long.steps) == (100, 256, 2)
    off = tmp_path / "config.yaml"
    off.write_text("train:\n  validation: {every: 0}\n", encoding="utf-8")
    assert gpu_check.validation_settings(gpu_check.parse_args(["--config", str(off)])).every == 0
    with pytest.raises(FileNotFoundError, match="give --config"):
        gpu_check.validation_settings(gpu_check.parse_args(["--config", str(tmp_path / "nowhere.yaml")]))


def broken_copy(lora: Path, dest: Path, change) -> Path:
    """The saved LoRA file with its tensors changed by `change(dict)`, metadata kept."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(lora), framework="pt") as f:
        tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    change(tensors)
    dest.mkdir(parents=True, exist_ok=True)
    save_file(tensors, dest / lora.name, metadata=metadata)
    return dest / lora.name


@pytest.fixture(scope="module")
def round_trip_of(checked):
    """compare_round_trip in this process, on a scene pipeline that loaded `lora_file`."""
    import torch

    from kolors_story.tools import gpu_check
    from kolors_story.tools.lora_round_trip import compare_round_trip
    from kolors_story.render.scenes import SamplerSettings

    report, _, work = checked
    args = gpu_check.parse_args([*TINY, "--work", str(work)])
    settings = SamplerSettings(sampler=args.sampler, steps=args.sample_steps, guidance_scale=args.cfg,
                               precision=args.precision, candidates=1)
    phases = gpu_check.Phases(torch.device("cpu"), work / "unused.json", gpu_check.Header("cpu", {}, {}))
    trained = gpu_check.train_settings(args)
    adapter = gpu_check.trained_adapter(work / "lora" / "work", report["phases"]["train"]["picked_step"])

    def run(lora_file: Path, adapter: dict = adapter) -> dict:
        pipe, scene, embeds = gpu_check.scene_pipeline(args, phases, work / "kolors-tiny", lora_file, settings,
                                                       work / "embeddings.safetensors")
        render = lambda: gpu_check._float_image(pipe, scene, settings, embeds)  # noqa: E731
        return compare_round_trip(pipe, render, lora_file, adapter, trained.alpha / trained.rank)

    return run, work / "lora" / "pytorch_lora_weights.safetensors", adapter


LAYER = "mid_block.attentions.0.transformer_blocks.0.attn1"


def test_the_lora_owner_reads_a_diffusers_file_without_diffsynth(checked, monkeypatch):
    """The GPU host has no DiffSynth: read_lora gives the same tensors and alpha without it (only
    the DiffSynth names, which it cannot know there, are missing)."""
    import importlib.util

    from kolors_story.models.lora.any_format import read_lora
    from kolors_story.models.random_kolors import build_unet

    lora = checked[2] / "lora" / "pytorch_lora_weights.safetensors"
    full = read_lora(lora, build_unet(0))
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "diffsynth" else find_spec(name, *a))
    plain = read_lora(lora, build_unet(0))
    assert (plain.rank, plain.alpha, plain.target_modules) == (full.rank, full.alpha, full.target_modules)
    assert list(plain.state) == list(full.state) and all(plain.state[k].equal(full.state[k]) for k in full.state)
    assert full.diffsynth_names and not plain.diffsynth_names


def test_a_file_with_one_layer_zeroed_fails_naming_that_layer(round_trip_of, tmp_path):
    run, lora, _ = round_trip_of

    def zero_up(tensors):
        tensors[f"unet.{LAYER}.to_v.lora.up.weight"].zero_()

    trip = run(broken_copy(lora, tmp_path / "zeroed", zero_up))
    record = trip["weights"]["file_vs_trained"]
    assert not trip["ok"] and record["failing_layers"] == [f"{LAYER}.to_v"] and record["worst_layer"] == f"{LAYER}.to_v"
    assert record["worst_error"] > 1e3 * record["tolerance"]
    assert trip["weights"]["loaded_vs_file"]["ok"]  # diffusers loaded the broken file faithfully
    assert any(f"{LAYER}.to_v" in problem for problem in trip["problems"])


def test_a_file_with_swapped_layers_fails_naming_both(round_trip_of, tmp_path):
    run, lora, _ = round_trip_of

    def swap_q_k(tensors):
        for part in ("down", "up"):
            q, k = f"unet.{LAYER}.to_q.lora.{part}.weight", f"unet.{LAYER}.to_k.lora.{part}.weight"
            tensors[q], tensors[k] = tensors[k], tensors[q]

    trip = run(broken_copy(lora, tmp_path / "swapped", swap_q_k))
    record = trip["weights"]["file_vs_trained"]
    assert not trip["ok"] and sorted(record["failing_layers"]) == [f"{LAYER}.to_k", f"{LAYER}.to_q"]


def test_a_file_missing_a_layer_fails_naming_it(round_trip_of, tmp_path):
    run, lora, _ = round_trip_of

    def drop(tensors):
        for part in ("down", "up"):
            del tensors[f"unet.{LAYER}.to_out.0.lora.{part}.weight"]

    trip = run(broken_copy(lora, tmp_path / "dropped", drop))
    record = trip["weights"]["file_vs_trained"]
    assert not trip["ok"] and record["missing_layers"] == [f"{LAYER}.to_out.0"] and record["failing_count"] == 0


def test_a_file_that_is_not_the_trained_adapter_fails_in_every_layer(round_trip_of):
    """The trained tensors changed as a wrong alpha folding would change them: every layer differs."""
    run, lora, adapter = round_trip_of
    wrong = {k: v * 3 if "lora_B" in k else v for k, v in adapter.items()}
    trip = run(lora, wrong)
    assert not trip["ok"] and trip["weights"]["file_vs_trained"]["failing_count"] == TINY_LORA_LAYERS
    assert trip["images"]["ok"]  # the file itself renders consistently; it is not what was trained


def test_a_rerun_reuses_the_built_models(checked, host_site):
    _, _, work = checked
    out = work / "again.json"
    proc = run_check(host_site, [*TINY, "--work", str(work), "--out", str(out)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    phases = json.loads(out.read_text())["phases"]
    assert phases["build_kolors"]["reused"] and phases["build_aesthetic"]["reused"]


def test_a_failing_phase_leaves_the_finished_ones_and_its_traceback(host_site, tmp_path):
    # A LoRA rank the tiny UNet refuses? Simpler and real: a dataset image count of 0 fails in training.
    proc = run_check(host_site, [*TINY, "--images", "0", "--work", str(tmp_path), "--out", str(tmp_path / "g.json")])
    report = json.loads((tmp_path / "g.json").read_text())
    assert proc.returncode != 0 and report["status"] == "failed"
    assert "build_kolors" in report["phases"] and report["failed"]["phase"] not in report["phases"]
    assert "Traceback" in report["failed"]["traceback"] and report["failed"]["phase"] in proc.stderr


def test_gpu_check_builds_the_real_layout(checked):
    from kolors_story.models.kolors_folder import KolorsFolder

    _, _, work = checked
    folder = KolorsFolder(work / "kolors-tiny")
    assert folder.variant == "fp16" and folder.weights["text_encoder"].index == "model.safetensors.index.fp16.json"
    assert (work / "aesthetic-tiny" / "pytorch_model.bin").is_file()


def test_gpu_check_refuses_cleanly_without_a_gpu(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    proc = subprocess.run([sys.executable, "-m", "kolors_story.tools.gpu_check", "--work", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "no CUDA GPU visible" in proc.stderr
