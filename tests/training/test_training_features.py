"""Trainer features on the tiny Kolors: caches, buckets, objective, resume after a kill, NaN stop,
validation with best-checkpoint pick."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from kolors_fixtures import write_training_folder
from safetensors.torch import load_file

from kolors_story.models.random_aesthetic import build_tiny_aesthetic_predictor
from kolors_story.training import TrainingDiverged, TrainJob, TrainSettings, train_lora
from kolors_story.training import checkpoints as ckpt
from kolors_story.training.data import BatchOrder, Example, assign_sizes, make_buckets
from kolors_story.training.objective import diffusion_loss, snr

BASE = dict(resolution=32, precision="fp32", rank=4, alpha=4, learning_rate=5e-3)


def cache_files(root: Path, kind: str) -> set[str]:
    return {p.name for p in (root / kind).rglob("*.safetensors")}


def same_lora(a: Path, b: Path) -> bool:
    first, second = load_file(a), load_file(b)
    return first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


# ---------------------------------------------------------------- caches
def test_changing_one_caption_reencodes_one_caption_and_no_image(tiny_kolors, tmp_path):
    captions = ["二次元", "水墨画", "山水", "二次元"]
    data = write_training_folder(tmp_path / "data", [(40, 40)] * 4, captions)
    cache = tmp_path / "cache"
    settings = TrainSettings(steps=1, **BASE)
    train_lora(TrainJob(tiny_kolors, data, tmp_path / "a", cache_dir=cache), settings)
    texts, latents = cache_files(cache, "text"), cache_files(cache, "latents")
    assert len(texts) == 3 and len(latents) == 4
    captions[2] = "山水，月夜"
    write_training_folder(tmp_path / "data", [(40, 40)] * 4, captions)
    train_lora(TrainJob(tiny_kolors, data, tmp_path / "b", cache_dir=cache), settings)
    assert len(cache_files(cache, "text") - texts) == 1
    assert cache_files(cache, "latents") == latents


def test_text_cache_keeps_embeddings_of_each_encoder_dtype_apart(tiny_kolors, tmp_path):
    from kolors_story.models.kolors_folder import KolorsFolder
    from kolors_story.training.encoding import encode_texts

    cpu, tiny_kolors = torch.device("cpu"), KolorsFolder(tiny_kolors)
    fp32 = encode_texts(tiny_kolors, ["水墨画"], tmp_path, cpu, torch.float32)
    assert len(cache_files(tmp_path, "text")) == 1
    bf16 = encode_texts(tiny_kolors, ["水墨画"], tmp_path, cpu, torch.bfloat16)
    assert len(cache_files(tmp_path, "text")) == 2
    assert not torch.equal(fp32["水墨画"][0], bf16["水墨画"][0])
    again = encode_texts(tiny_kolors, ["水墨画"], tmp_path, cpu, torch.float32)
    assert len(cache_files(tmp_path, "text")) == 2 and torch.equal(again["水墨画"][0], fp32["水墨画"][0])


def test_cached_run_equals_uncached_run(tiny_kolors, training_folder, tmp_path):
    settings = TrainSettings(steps=3, random_flip=True, **BASE)
    cold = train_lora(TrainJob(tiny_kolors, training_folder, tmp_path / "cold", cache_dir=tmp_path / "c"),
                      settings)
    warm = train_lora(TrainJob(tiny_kolors, training_folder, tmp_path / "warm", cache_dir=tmp_path / "c"),
                      settings)
    assert same_lora(cold.lora_file, warm.lora_file)


# ---------------------------------------------------------------- buckets
def test_buckets_are_multiples_of_the_step_and_about_the_target_area():
    buckets = make_buckets(1024, 64)
    assert (1024, 1024) in buckets and (768, 1344) in buckets
    for h, w in buckets:
        assert h % 64 == 0 and w % 64 == 0 and 0.5 <= w / h <= 2.0
        assert 0.85 < h * w / 1024**2 < 1.15


def test_bucketing_groups_batches_by_size_and_trains(tiny_kolors, tmp_path):
    sizes = [(64, 32), (64, 32), (32, 64), (32, 64), (48, 48), (48, 48)]
    data = write_training_folder(tmp_path / "data", sizes, ["水墨画"] * 6)
    settings = TrainSettings(steps=4, batch_size=2, bucketing=True, bucket_step=16, **{**BASE, "resolution": 64})
    examples = [Example(data / "train" / f"{i}.jpg", "x") for i in range(6)]
    assign_sizes(examples, settings)
    sizes_hw = [ex.target_size for ex in examples]
    assert sizes_hw[0] == (48, 96) and sizes_hw[2] == (96, 48) and sizes_hw[4] == (64, 64)
    order, gen = BatchOrder(examples, 2), torch.Generator().manual_seed(0)
    for _ in range(9):
        batch = order.next(gen)
        assert len({examples[i].target_size for i in batch}) == 1
    result = train_lora(TrainJob(tiny_kolors, data, tmp_path / "out"), settings)
    assert len(result.losses) == 4


# ---------------------------------------------------------------- objective
def test_min_snr_weighting_damps_low_noise_steps():
    from diffusers import DDPMScheduler

    from kolors_story.models.kolors_configs import KOLORS_SCHEDULER

    sched = DDPMScheduler(num_train_timesteps=1100, beta_start=0.00085, beta_end=0.014,
                          beta_schedule="scaled_linear")
    assert KOLORS_SCHEDULER["num_train_timesteps"] == sched.config.num_train_timesteps
    pred, noise = torch.ones(2, 4, 2, 2), torch.zeros(2, 4, 2, 2)
    t = torch.tensor([10, 1000])
    plain = diffusion_loss(pred, noise, t, sched.alphas_cumprod, None)
    weighted = diffusion_loss(pred, noise, t, sched.alphas_cumprod, 5.0)
    s = snr(sched.alphas_cumprod, t)
    assert s[0] > 5 > s[1]  # low noise at t=10, high noise at t=1000
    expected = (5.0 / s[0] + 1.0) / 2
    assert plain.item() == 1.0 and weighted.item() == pytest.approx(expected.item(), rel=1e-6)


def test_gradient_accumulation_noise_offset_and_min_snr_train(tiny_kolors, training_folder, tmp_path):
    settings = TrainSettings(steps=2, gradient_accumulation=2, noise_offset=0.05, min_snr_gamma=5.0,
                             lr_warmup_steps=2, **BASE)
    result = train_lora(TrainJob(tiny_kolors, training_folder, tmp_path), settings)
    assert [r["lr"] for r in result.losses] == pytest.approx([2.5e-3, 5e-3])


# ---------------------------------------------------------------- resume
def run_training(model: Path, data: Path, out: Path, settings: dict) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "kolors_story.training", "--model", str(model), "--dataset", str(data),
           "--out", str(out), "--settings", json.dumps(settings), "--cache-dir", str(out.parent / "cache")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_killed_training_resumes_to_bitwise_the_uninterrupted_lora(tiny_kolors, training_folder, tmp_path):
    settings = dict(steps=40, checkpoint_every=5, random_flip=True, **BASE)
    interrupted = tmp_path / "interrupted"
    proc = run_training(tiny_kolors, training_folder, interrupted, settings)
    deadline = time.monotonic() + 240
    while not ckpt.list_checkpoints(next(iter((interrupted / "work").glob("*")), interrupted / "none")):
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (interrupted / "pytorch_lora_weights.safetensors").exists(), "finished before the kill"
    done = ckpt.list_checkpoints(next((interrupted / "work").glob("*")))
    assert done and int(done[-1].name.split("-")[1]) < 40

    resumed = run_training(tiny_kolors, training_folder, interrupted, settings)
    log = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, log
    assert "resuming from checkpoint" in log

    straight = train_lora(TrainJob(tiny_kolors, training_folder, tmp_path / "straight", cache_dir=tmp_path / "cache2"),
                          TrainSettings(**settings))
    assert same_lora(interrupted / "pytorch_lora_weights.safetensors", straight.lora_file)


def test_other_settings_never_resume_foreign_checkpoints(tiny_kolors, training_folder, tmp_path):
    first = train_lora(TrainJob(tiny_kolors, training_folder, tmp_path), TrainSettings(steps=2, **BASE))
    second = train_lora(TrainJob(tiny_kolors, training_folder, tmp_path), TrainSettings(steps=3, **BASE))
    assert first.resumed_from == 0 and second.resumed_from == 0
    assert len(list((tmp_path / "work").iterdir())) == 2


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tiny_kolors, training_folder, tmp_path):
    settings = TrainSettings(steps=10, checkpoint_every=1, **{**BASE, "learning_rate": 1e30}, max_grad_norm=1e30)
    with pytest.raises(TrainingDiverged, match=r"loss became (nan|inf) at step (\d+)") as err:
        train_lora(TrainJob(tiny_kolors, training_folder, tmp_path), settings)
    step = int(str(err.value).split(" at step ")[1].split(";")[0])
    kept = ckpt.list_checkpoints(next((tmp_path / "work").iterdir()), resumable=False)
    assert kept and int(kept[-1].name.split("-")[1]) == step - 1
    assert all(torch.isfinite(t).all() for t in load_file(ckpt.lora_of(kept[-1])).values())
    assert not (tmp_path / "pytorch_lora_weights.safetensors").exists()


# ---------------------------------------------------------------- validation
def test_validation_scores_each_checkpoint_and_picks_the_best(tiny_kolors, training_folder, tmp_path):
    aesthetic = build_tiny_aesthetic_predictor(tmp_path / "aesthetic")
    validation = {"every": 2, "pick_best": True, "size": 32, "steps": 2,
                  "prompts": [{"prompt": "水墨画", "seed": 0}, {"prompt": "山水", "negative_prompt": "丑陋", "seed": 1}]}
    settings = TrainSettings.from_dict({**BASE, "steps": 6, "learning_rate": 5e-2, "validation": validation})
    result = train_lora(TrainJob(tiny_kolors, training_folder, tmp_path / "out", aesthetic_dir=aesthetic),
                        settings)
    assert [v["step"] for v in result.validations] == [2, 4, 6]
    best = max(result.validations, key=lambda v: v["mean"])
    assert result.picked_step == best["step"]
    picked = load_file(ckpt.lora_of(ckpt.checkpoint_dir(next((tmp_path / "out/work").iterdir()), best["step"])))
    saved = load_file(result.lora_file)
    assert len(saved) == len(picked)
    sample = next(k for k in saved if k.endswith("attn1.to_q.lora.up.weight"))
    peft_key = sample.removeprefix("unet.").replace("lora.up", "lora_B")
    assert torch.equal(saved[sample], picked[peft_key])
    for v in result.validations:
        assert (tmp_path / f"out/validation/step-{v['step']:06d}.png").is_file()
