"""Every LoRA format in the bundle (config bundle.formats), and the card's file and strength per tool."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from kolors_story.errors import UserError
from kolors_story.models.lora.any_format import read_lora
from kolors_story.models.lora.diffsynth_format import write_diffsynth_lora
from kolors_story.models.lora.diffusers_format import write_diffusers_lora
from kolors_story.models.lora.kohya_format import write_comfyui_lora
from kolors_story.models.lora.weights import LoraWeights
from kolors_story.models.random_kolors import build_unet
from kolors_story.outputs.publishing import ModelCard, build_bundle
from kolors_story.plan.config import load_schema, validate_config
from kolors_story.run_files import COMFYUI_LORA_NAME, DIFFSYNTH_LORA_NAME
from test_publishing import make_inputs  # fake panels, records and scores (this folder is on sys.path)

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def run_loras(tmp_path_factory) -> dict[str, Path]:
    """A rank-8 LoRA of the tiny UNet in the three files a training writes to results/<run>/lora/."""
    unet = build_unet(0)
    gen = torch.Generator().manual_seed(0)
    state = {}
    for name, layer in unet.named_modules():
        if name.endswith((".to_q", ".to_v")):
            state[f"{name}.lora_A.weight"] = torch.randn(8, layer.in_features, generator=gen)
            state[f"{name}.lora_B.weight"] = torch.randn(layer.out_features, 8, generator=gen)
    weights = LoraWeights(state, 8, 4.0, target_modules=("to_q", "to_v"))
    out = tmp_path_factory.mktemp("lora")
    return {"lora": write_diffusers_lora(weights, out),
            "diffsynth": write_diffsynth_lora(weights, out / DIFFSYNTH_LORA_NAME, unet),
            "comfyui": write_comfyui_lora(weights, out / COMFYUI_LORA_NAME)}


def build(tmp_path: Path, run_loras: dict, formats: tuple[str, ...], repo_id: str | None) -> Path:
    inputs = make_inputs(tmp_path / "in")
    inputs["lora_file"] = run_loras["lora"]
    card = ModelCard("Ink LoRA", "Kwai-Kolors/Kolors-diffusers", "水墨画", "demo", repo_id)
    return build_bundle(tmp_path / "bundle", card=card, other_loras={f: run_loras[f] for f in formats}, **inputs)


def test_the_bundle_carries_every_format_and_the_card_says_file_and_strength_per_tool(tmp_path, run_loras):
    out = build(tmp_path, run_loras, ("diffsynth", "comfyui"), "someone/kolors-ink-lora")
    expected = {"diffusers": "pytorch_lora_weights.safetensors", "diffsynth": "diffsynth_lora.ckpt",
                "comfyui": "kolors-ink-lora_comfyui.safetensors"}  # ComfyUI lists LoRAs by file name
    for fmt, name in expected.items():
        source = run_loras["lora" if fmt == "diffusers" else fmt]
        assert (out / name).read_bytes() == source.read_bytes(), fmt
    assert json.loads((out / "prompts.json").read_text(encoding="utf-8"))["lora_files"] == expected

    card = (out / "README.md").read_text(encoding="utf-8")
    assert "## Files and strength, per tool" in card
    assert ("| ComfyUI with ComfyUI-Kolors-MZ | `kolors-ink-lora_comfyui.safetensors` (into `ComfyUI/models/loras/`)"
            in card) and "`LoraLoaderModelOnly`" in card and "`strength_model` 1.0" in card
    assert 'model_manager.load_lora("diffsynth_lora.ckpt", lora_alpha=1.0)' in card
    # the baseline's own LoraConfig(r=16, lora_alpha=2.0): this rank-8 file needs lora_alpha=8
    assert "`LoraConfig(r=8, lora_alpha=8)` (scale 1.0; lora_alpha=2 would apply 0.25 of the trained strength)" in card
    assert "adapter weight 1.0 (`set_adapters`); the panels used 0.8" in card


def test_each_formats_strength_in_the_card_is_what_its_file_applies(run_loras):
    """The card's 1.0 everywhere holds: the ComfyUI file's up @ down * alpha / rank and the
    DiffSynth file's B @ A (lora_alpha 1.0) equal the diffusers file's update at its own scale."""
    unet = build_unet(0)
    reference = read_lora(run_loras["lora"], unet)
    for fmt in ("diffsynth", "comfyui"):
        other = read_lora(run_loras[fmt], unet)  # DiffSynth at diffsynth_alpha None: scale 1
        assert other.scale == reference.scale == 1.0
        assert all(torch.equal(other.state[k], reference.state[k]) for k in reference.state), fmt


def test_bundle_formats_leaves_files_out_but_never_the_diffusers_one(tmp_path, run_loras):
    out = build(tmp_path, run_loras, ("comfyui",), None)
    assert sorted(p.name for p in out.iterdir() if p.suffix in (".ckpt", ".safetensors")) == [
        "demo_comfyui.safetensors", "pytorch_lora_weights.safetensors"]  # no repo: the run's name
    card = (out / "README.md").read_text(encoding="utf-8")
    assert "DiffSynth-Studio 1.1 |" not in card and "demo_comfyui.safetensors" in card

    schema = load_schema(ROOT / "schemas/config.schema.yaml")
    config = yaml.safe_load((ROOT / "config.yaml").read_text(encoding="utf-8"))
    assert validate_config(config, schema)["bundle"]["formats"] == ["diffusers", "diffsynth", "comfyui"]
    config["bundle"]["formats"] = ["diffsynth", "comfyui"]
    with pytest.raises(UserError, match="bundle.formats"):
        validate_config(config, schema)
    config["bundle"]["formats"] = ["diffusers", "safetensors"]
    with pytest.raises(UserError, match="bundle.formats"):
        validate_config(config, schema)


def test_a_missing_format_file_is_named(tmp_path, run_loras):
    with pytest.raises(UserError, match=r"LoRA weights \(comfyui\)"):
        build(tmp_path, dict(run_loras, comfyui=tmp_path / "gone.safetensors"), ("comfyui",), None)
