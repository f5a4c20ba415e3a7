"""The kohya/ComfyUI LoRA file: ComfyUI's key rule at full size, stock diffusers and DiffSynth 1.1.9
reading it, and import of every spelling ComfyUI's SDXL key map accepts (docs/lora-formats.md)."""

import logging
import re

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from kolors_story.errors import UserError
from kolors_story.models.kolors_configs import full_size_unet, unet_skeleton
from kolors_story.models.lora import kohya_format
from kolors_story.models.lora.any_format import convert_lora, read_lora
from kolors_story.models.lora.diffsynth_format import diffsynth_key_map
from kolors_story.models.lora.diffusers_format import write_diffusers_lora
from kolors_story.models.lora.kohya_format import write_comfyui_lora
from kolors_story.models.lora.weights import LoraWeights, lora_able_modules
from kolors_story.models.random_kolors import build_unet
from kolors_story.run_files import COMFYUI_LORA_NAME, LORA_WEIGHT_NAME
from kolors_story.training import TrainSettings, add_lora, save_lora

ATTENTION = re.compile(r"\.attn[12]\.(to_q|to_k|to_v|to_out\.0)$")


def random_weights(unet, rank: int, alpha: float, seed: int) -> LoraWeights:
    """A LoRA on every attention projection of `unet` (meta or real), random A and B."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, layer in unet.named_modules():
        if ATTENTION.search(name):
            state[f"{name}.lora_A.weight"] = torch.randn(rank, layer.in_features, generator=gen) * 0.1
            state[f"{name}.lora_B.weight"] = torch.randn(layer.out_features, rank, generator=gen) * 0.1
    return LoraWeights(state, rank, alpha, target_modules=("to_k", "to_out.0", "to_q", "to_v"))


def comfyui_delta(file: dict[str, torch.Tensor], base: str) -> torch.Tensor:
    """ComfyUI's `calculate_weight` for a "lora" patch: up @ down * alpha / rank (rank = down's
    first dimension), 1.0 without an .alpha key."""
    up, down = file[f"{base}.lora_up.weight"], file[f"{base}.lora_down.weight"]
    alpha = file[f"{base}.alpha"].item() / down.shape[0] if f"{base}.alpha" in file else 1.0
    return (up.flatten(1) @ down.flatten(1)) * alpha


def diffusers_delta(file: dict[str, torch.Tensor], module: str) -> torch.Tensor:
    """Our diffusers file's update at its stored strength (lora_alpha = r: scale 1)."""
    return file[f"unet.{module}.lora.up.weight"] @ file[f"unet.{module}.lora.down.weight"]


@pytest.fixture(scope="module")
def full_size(tmp_path_factory):
    """Both files of a rank-4, alpha-2 LoRA (scale 0.5) on all 560 attention layers of the real
    Kolors UNet config (meta tensors: names and shapes only)."""
    unet = full_size_unet()
    weights = random_weights(unet, rank=4, alpha=2.0, seed=0)
    out = tmp_path_factory.mktemp("full")
    diffusers_file = write_diffusers_lora(weights, out)
    comfyui_file = write_comfyui_lora(weights, out / COMFYUI_LORA_NAME)
    return unet, weights, load_file(diffusers_file), load_file(comfyui_file)


def test_comfyui_file_follows_comfyuis_rule_for_every_full_size_layer(full_size):
    """ComfyUI (comfy/lora.py model_lora_keys_unet, 41444b5) maps `lora_unet_` + each diffusers
    UNet weight name (dots as underscores) onto the model; its loader reads lora_up/lora_down and
    .alpha. Every key of our file must be one of those names, every layer must be there."""
    unet, weights, diffusers_file, comfyui_file = full_size
    comfy_names = {"lora_unet_" + k[: -len(".weight")].replace(".", "_"): k[: -len(".weight")]
                   for k in unet.state_dict() if k.endswith(".weight")}
    bases = {k.rsplit(".", 2 if k.endswith(".weight") else 1)[0] for k in comfyui_file}
    assert len(weights.modules) == 560 and len(bases) == 560 and len(comfyui_file) == 3 * 560
    assert bases <= comfy_names.keys()
    for base in sorted(bases):
        module = comfy_names[base]
        assert {f"{base}.lora_up.weight", f"{base}.lora_down.weight", f"{base}.alpha"} <= comfyui_file.keys()
        assert comfyui_file[f"{base}.alpha"].item() == 4.0
        # the scale 0.5 is folded into up (and our diffusers file's up): the same update, exactly
        assert torch.equal(comfyui_delta(comfyui_file, base), diffusers_delta(diffusers_file, module))
    expected = weights.state["mid_block.attentions.0.transformer_blocks.9.attn2.to_out.0.lora_B.weight"] * 0.5
    base = "lora_unet_mid_block_attentions_0_transformer_blocks_9_attn2_to_out_0"
    assert torch.equal(comfyui_file[f"{base}.lora_up.weight"], expected)


def test_sgm_names_are_the_ones_diffsynth_maps_to_the_same_parameter():
    """kohya's SGM spelling (lora_unet_input_blocks_4_1_...) of every LoRA-able layer of the
    full-size UNet, checked against DiffSynth's own two converters: from_civitai(SGM name) and
    from_diffusers(diffusers name) must give the same DiffSynth parameter."""
    from diffsynth.models.sdxl_unet import SDXLUNetStateDictConverter

    unet = full_size_unet()
    modules = list(lora_able_modules(unet))
    sgm = kohya_format.sgm_names(modules, unet.config)
    assert set(modules) - set(sgm) == {"encoder_hid_proj"}  # Kolors' text projection: not in SGM's SDXL
    assert sgm["down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"] == \
        "input_blocks.4.1.transformer_blocks.0.attn1.to_q"
    ds_of_diffusers = diffsynth_key_map(list(unet.state_dict()))
    civitai = {f"model.diffusion_model.{s}.weight": torch.empty(0) for s in sgm.values()}
    ds_of_sgm = SDXLUNetStateDictConverter().from_civitai(civitai)
    ds_of_sgm = ds_of_sgm[0] if isinstance(ds_of_sgm, tuple) else ds_of_sgm
    assert len(ds_of_sgm) == len(sgm)
    by_sgm = dict(zip(civitai, ds_of_sgm))  # from_civitai renames key by key, in order
    for module, name in sgm.items():
        assert by_sgm[f"model.diffusion_model.{name}.weight"] == ds_of_diffusers[f"{module}.weight"], module


def test_diffsynth_loader_maps_every_key_onto_its_kolors_unet(full_size, monkeypatch):
    """DiffSynth 1.1.9's SDXLLoRAFromCivitai (what ModelManager.load_lora tries for lora_unet_
    files) on its own full-size Kolors UNet (meta device): it recognises the file, and every one of
    the 560 updates lands on a parameter of that UNet with our diffusers file's values (at its
    default lora_alpha=1.0; it ignores .alpha, so the folded scale is what makes it right).
    Its converter moves tensors to "cuda" unconditionally: on this GPU-less machine "cuda" is
    redirected to the CPU, nothing else of the loader changes."""
    from diffsynth.models.lora import SDXLLoRAFromCivitai
    from diffsynth.models.sdxl_unet import SDXLUNet

    to = torch.Tensor.to
    monkeypatch.setattr(torch.Tensor, "to", lambda self, *a, **k: to(
        self, *("cpu" if x == "cuda" else x for x in a), **{n: "cpu" if v == "cuda" else v for n, v in k.items()}))
    unet, weights, diffusers_file, comfyui_file = full_size
    with torch.device("meta"):
        ds_unet = SDXLUNet(is_kolors=True)
    loader = SDXLLoRAFromCivitai()
    assert loader.match(ds_unet, comfyui_file) == ("lora_unet_", "diffusers")
    merged = loader.convert_state_dict(comfyui_file, lora_prefix="lora_unet_", alpha=1.0)
    merged = SDXLUNet.state_dict_converter().from_diffusers(merged)
    merged = merged[0] if isinstance(merged, tuple) else merged
    ds_params = dict(ds_unet.named_parameters())
    assert len(merged) == 560 and set(merged) <= set(ds_params)
    to_ds = diffsynth_key_map(list(unet.state_dict()))
    for module in weights.modules:
        update = merged[to_ds[f"{module}.weight"]]
        assert update.shape == ds_params[to_ds[f"{module}.weight"]].shape
        # DiffSynth multiplies in fp16: equal up to fp16 rounding
        torch.testing.assert_close(update.float(), diffusers_delta(diffusers_file, module), rtol=2e-2, atol=2e-3)


# ---------------------------------------------------------------- the tiny Kolors, rendered
def tiny_pipeline(tiny_kolors):
    from diffusers import KolorsPipeline

    return KolorsPipeline.from_pretrained(str(tiny_kolors), variant="fp16", torch_dtype=torch.float32)


def render(pipe) -> np.ndarray:
    return pipe("水墨画，山水", height=32, width=32, num_inference_steps=3, guidance_scale=4.0,
                generator=torch.Generator().manual_seed(0), output_type="np").images[0]


@pytest.fixture(scope="module")
def trained(tiny_kolors, tmp_path_factory):
    """A trainer-made LoRA on the tiny Kolors UNet (rank 4, alpha 2), its diffusers file, our
    ComfyUI file and the image the diffusers file renders with the stock loader."""
    pipe = tiny_pipeline(tiny_kolors)
    add_lora(pipe.unet, TrainSettings(rank=4, alpha=2.0))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in pipe.unet.named_parameters():
            if ".lora_B." in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.5)
    out = tmp_path_factory.mktemp("trained")
    diffusers_file = save_lora(pipe.unet, out)
    weights = read_lora(diffusers_file, build_unet(0))
    comfyui_file = write_comfyui_lora(weights, out / COMFYUI_LORA_NAME)
    stock = tiny_pipeline(tiny_kolors)
    stock.load_lora_weights(str(out), weight_name=LORA_WEIGHT_NAME, adapter_name="style")
    return diffusers_file, comfyui_file, render(stock)


def test_stock_diffusers_renders_the_comfyui_file_as_our_diffusers_file(trained, tiny_kolors):
    diffusers_file, comfyui_file, expected = trained
    assert np.abs(expected - render(tiny_pipeline(tiny_kolors))).max() > 1e-3  # the LoRA matters
    pipe = tiny_pipeline(tiny_kolors)
    pipe.load_lora_weights(str(comfyui_file.parent), weight_name=comfyui_file.name, adapter_name="style")
    config = pipe.unet.peft_config["style"]
    assert config.r == 4 and config.lora_alpha == 4  # diffusers' kohya conversion read .alpha
    assert np.array_equal(render(pipe), expected)
    with safe_open(str(comfyui_file), framework="pt") as f:
        assert f.metadata() == {"ss_network_alpha": "4", "ss_network_dim": "4", "ss_network_module": "networks.lora"}


def test_our_comfyui_file_imported_renders_the_panel_of_our_diffusers_file(trained, tiny_kolors, tmp_path):
    """Round trip through train.use_lora's path (convert_lora, as rule import_lora runs it)."""
    diffusers_file, comfyui_file, expected = trained
    weights = convert_lora(comfyui_file, tiny_kolors, diffusers_dir=tmp_path)
    assert (weights.source_format, weights.rank, weights.scale) == ("kohya", 4, 1.0)
    again, original = load_file(tmp_path / LORA_WEIGHT_NAME), load_file(diffusers_file)
    assert again.keys() == original.keys() and all(torch.equal(again[k], original[k]) for k in original)
    pipe = tiny_pipeline(tiny_kolors)
    pipe.load_lora_weights(str(tmp_path), weight_name=LORA_WEIGHT_NAME, adapter_name="style")
    assert np.array_equal(render(pipe), expected)


# ---------------------------------------------------------------- import: every spelling
def respelled(file: dict[str, torch.Tensor], unet, spelling: str) -> dict[str, torch.Tensor]:
    """Our kohya file in another spelling ComfyUI reads (alpha folded: scale 1, so dropping .alpha
    keeps the strength)."""
    sgm = kohya_format.sgm_names(list(lora_able_modules(unet)), unet.config)
    by_flat = {kohya_format.flat(m): m for m in sgm}
    out = {}
    for key, tensor in file.items():
        base, suffix = key.split(".", 1)
        module = by_flat[base[len("lora_unet_"):]]
        if spelling == "sgm_AB":  # kohya SGM names, peft suffixes, no .alpha
            if suffix != "alpha":
                half = "A" if "down" in suffix else "B"
                out[f"lora_unet_{kohya_format.flat(sgm[module])}.lora_{half}.weight"] = tensor
        elif spelling == "comfyui":  # ComfyUI's own LoraSave: diffusion_model.<SGM>, fp16, no alpha
            if suffix != "alpha":
                out[f"diffusion_model.{sgm[module]}.{suffix}"] = tensor.half()
        elif spelling == "processor":  # diffusers' old attention-processor names
            if suffix != "alpha":
                old = module.replace(".to_", ".processor.to_").removesuffix(".0")
                out[f"unet.{old}_lora.{'down' if 'down' in suffix else 'up'}.weight"] = tensor
    return out


@pytest.mark.parametrize("spelling, source, exact", [("sgm_AB", "kohya", True), ("comfyui", "comfyui", False),
                                                     ("processor", "processor", True)])
def test_every_spelling_comfyui_reads_imports_as_the_same_lora(trained, spelling, source, exact, tmp_path):
    diffusers_file, comfyui_file, _ = trained
    unet = build_unet(0)
    path = tmp_path / "other.safetensors"
    save_file(respelled(load_file(comfyui_file), unet, spelling), path)
    weights = read_lora(path, unet)
    expected = read_lora(diffusers_file, unet)
    assert weights.source_format == source and weights.scale == 1.0 and weights.modules == expected.modules
    for key, value in expected.state.items():
        if exact:
            assert torch.equal(weights.state[key], value), key
        else:
            torch.testing.assert_close(weights.state[key], value, rtol=1e-3, atol=1e-4)  # fp16 in the file


def test_alpha_scales_each_layer_and_text_encoder_keys_are_reported(trained, tmp_path, caplog):
    diffusers_file, comfyui_file, _ = trained
    file = load_file(comfyui_file)
    base = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
    file[f"{base}.alpha"] = torch.tensor(1.0)  # rank 4: this layer at 1/4
    file["lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"] = torch.zeros(4, 8)
    file["lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight"] = torch.zeros(8, 4)
    save_file(file, tmp_path / "te.safetensors")
    with caplog.at_level(logging.WARNING):
        weights = read_lora(tmp_path / "te.safetensors", build_unet(0))
    assert weights.skipped == ("lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight",
                               "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight")
    assert "2 text-encoder keys skipped" in caplog.text and "lora_te_text_model" in caplog.text
    module = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    assert torch.equal(weights.state[f"{module}.lora_B.weight"], file[f"{base}.lora_up.weight"] * 0.25)

    only_te = {k: v for k, v in file.items() if k.startswith("lora_te_")}
    save_file(only_te, tmp_path / "only_te.safetensors")
    with pytest.raises(UserError, match="only text-encoder keys"):
        read_lora(tmp_path / "only_te.safetensors", build_unet(0))


def test_keys_that_map_onto_no_layer_are_refused_naming_them_and_the_format(trained, tmp_path):
    _, comfyui_file, _ = trained
    file = load_file(comfyui_file)
    file["lora_unet_down_blocks_7_attentions_0_proj_in.lora_down.weight"] = torch.zeros(4, 8)
    file["lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.dora_scale"] = torch.zeros(1, 8)
    save_file(file, tmp_path / "bad.safetensors")
    with pytest.raises(UserError) as err:
        read_lora(tmp_path / "bad.safetensors", build_unet(0))
    message = str(err.value)
    assert "kohya (lora_unet_" in message and "down_blocks_7_attentions_0_proj_in.lora_down.weight" in message
    assert "attn1_to_q.dora_scale" in message

    # an SDXL-sized LoRA: the names fit, the shapes do not
    file = load_file(comfyui_file)
    file[f"{base_of(file)}.lora_down.weight"] = torch.zeros(4, 640)
    save_file(file, tmp_path / "sdxl.safetensors")
    with pytest.raises(UserError, match="shapes that do not fit") as err:
        read_lora(tmp_path / "sdxl.safetensors", build_unet(0))
    assert base_of(file) in str(err.value)


def base_of(file: dict) -> str:
    return next(k for k in sorted(file) if k.endswith(".alpha"))[: -len(".alpha")]


def test_init_lora_starts_training_from_a_kohya_file(trained):
    diffusers_file, comfyui_file, _ = trained
    from_kohya, from_diffusers = build_unet(0), build_unet(0)
    add_lora(from_kohya, TrainSettings(rank=16, init_lora=str(comfyui_file)))
    add_lora(from_diffusers, TrainSettings(rank=16, init_lora=str(diffusers_file)))
    a, b = dict(from_kohya.named_parameters()), dict(from_diffusers.named_parameters())
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert from_kohya.peft_config["default"].r == 4


def test_the_train_jobs_early_check_reads_on_the_meta_skeleton_as_on_the_unet(trained, tiny_kolors, tmp_path):
    """scripts/train_lora.py checks train.init_lora on unet_skeleton (meta, no weights loaded)
    before the trainer loads anything: the same layers read, the same refusal."""
    _, comfyui_file, _ = trained
    skeleton = unet_skeleton(tiny_kolors)
    assert sorted(read_lora(comfyui_file, skeleton).state) == sorted(
        read_lora(comfyui_file, build_unet(0)).state)
    file = load_file(comfyui_file)
    file["lora_unet_down_blocks_7_attentions_0_proj_in.lora_down.weight"] = torch.zeros(4, 8)
    save_file(file, tmp_path / "bad.safetensors")
    with pytest.raises(UserError, match="down_blocks_7_attentions_0_proj_in"):
        read_lora(tmp_path / "bad.safetensors", skeleton)
