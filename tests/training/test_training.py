"""LoRA training on the tiny Kolors: deterministic, diffusers-format, alpha preserved."""

import csv

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from kolors_story.errors import UserError
from kolors_story.render.scenes import SamplerSettings, Scene, load_pipeline, load_style_lora, render
from kolors_story.training import TrainJob, TrainSettings, train_lora, write_loss_log

FAST = dict(steps=6, resolution=32, precision="fp32", learning_rate=5e-3, rank=4, alpha=2,
            gradient_checkpointing=True, random_flip=True)


@pytest.fixture(scope="module")
def trained(tiny_kolors, training_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora")
    return train_lora(TrainJob(tiny_kolors, training_folder, out), TrainSettings(**FAST))


def test_same_seed_gives_bitwise_the_same_lora(trained, tiny_kolors, training_folder, tmp_path):
    again = train_lora(TrainJob(tiny_kolors, training_folder, tmp_path), TrainSettings(**FAST))
    first, second = load_file(trained.lora_file), load_file(again.lora_file)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert [r["loss"] for r in trained.losses] == [r["loss"] for r in again.losses]


def test_other_seed_gives_another_lora(trained, tiny_kolors, training_folder, tmp_path):
    other = train_lora(TrainJob(tiny_kolors, training_folder, tmp_path), TrainSettings(**{**FAST, "seed": 1}))
    first, second = load_file(trained.lora_file), load_file(other.lora_file)
    assert any(not torch.equal(first[k], second[k]) for k in first)


def test_lora_file_is_diffusers_format_on_attention_projections(trained):
    state = load_file(trained.lora_file)
    assert all(k.startswith("unet.") for k in state)
    assert any(k.endswith("attn1.to_q.lora.down.weight") for k in state)
    assert any(".to_out.0.lora.up.weight" in k for k in state)
    assert all(v.dtype == torch.float32 for v in state.values())
    # 4 transformer blocks (1 down, 1 mid, 2 up) x 2 attentions x 4 targets x (down, up)
    assert len(state) == 4 * 2 * 4 * 2


def test_stock_pipeline_loads_lora_with_its_alpha_and_it_changes_the_image(trained, tiny_kolors):
    settings = SamplerSettings(steps=3, precision="fp32")
    scene = Scene("x", "古风，水墨画，少女", "", seed=3, width=32, height=32)
    pipe = load_pipeline(tiny_kolors, settings, torch.device("cpu"))
    base = np.asarray(render(pipe, scene, settings)[0])
    load_style_lora(pipe, trained.lora_file, 1.0)
    config = pipe.unet.peft_config["style"]
    assert (config.r, config.lora_alpha) == (4, 4)  # alpha/rank (2/4) is folded into lora.up
    styled = np.asarray(render(pipe, scene, settings)[0])
    assert np.abs(styled.astype(int) - base.astype(int)).max() > 0
    pipe.set_adapters(["style"], [0.0])
    assert np.array_equal(np.asarray(render(pipe, scene, settings)[0]), base)


def test_random_crop_trains_through_the_vae_each_step(tiny_kolors, training_folder, tmp_path):
    result = train_lora(TrainJob(tiny_kolors, training_folder, tmp_path),
                        TrainSettings(**{**FAST, "crop": "random", "steps": 2}))
    assert result.lora_file.is_file() and len(result.losses) == 2


def test_loss_log_csv_and_plot(trained, tmp_path):
    write_loss_log(trained.losses, tmp_path / "loss.csv", tmp_path / "loss.png")
    with open(tmp_path / "loss.csv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == list(range(1, FAST["steps"] + 1))
    assert all(np.isfinite(float(r["loss"])) for r in rows)
    assert (tmp_path / "loss.png").read_bytes()[:4] == b"\x89PNG"


def test_missing_metadata_is_a_clear_error(tiny_kolors, tmp_path):
    with pytest.raises(UserError, match="metadata.csv not found"):
        train_lora(TrainJob(tiny_kolors, tmp_path, tmp_path / "out"), TrainSettings(**FAST))


def test_unknown_setting_is_refused():
    with pytest.raises(UserError, match="unknown setting"):
        TrainSettings.from_dict({"rank": 4, "ranks": 8})
