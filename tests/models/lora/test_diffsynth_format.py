"""LoRA interop: the trainer's diffusers files <-> DiffSynth-Studio 1.1 (the challenge baseline)."""

import json
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from kolors_story.errors import UserError
from kolors_story.models.kolors_configs import full_size_unet
from kolors_story.models.lora.any_format import convert_lora, read_lora
from kolors_story.models.lora.diffsynth_format import diffsynth_key_map, write_diffsynth_lora
from kolors_story.models.lora.diffusers_format import write_diffusers_lora
from kolors_story.models.lora.weights import apply_to_unet
from kolors_story.models.random_kolors import TEXT_WIDTH, build_unet
from kolors_story.run_files import LORA_WEIGHT_NAME
from kolors_story.training import TrainSettings, add_lora, save_lora

ROOT = Path(__file__).resolve().parents[3]
TARGET = re.compile(r"\.attn[12]\.(to_q|to_k|to_v|to_out\.0)\.weight$")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """On 2 shared cores torch's intra-op threads spin against each other (a tiny UNet forward
    took ~1.3 s with 2 threads under load, ~15 ms with 1)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def unet_output(unet) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    sample = torch.randn(1, 4, 8, 8, generator=gen)
    text = torch.randn(1, 5, TEXT_WIDTH, generator=gen)
    cond = {"text_embeds": torch.randn(1, TEXT_WIDTH, generator=gen),
            "time_ids": torch.tensor([[32.0, 32, 0, 0, 32, 32]])}
    with torch.no_grad():
        return unet(sample, 500, encoder_hidden_states=text, added_cond_kwargs=cond).sample


def diffsynth_lora(unet, rank: int, seed: int, make=torch.randn) -> dict[str, torch.Tensor]:
    """What DiffSynth's trainer saves: peft tensors under DiffSynth's own UNet names, in its
    UNet's parameter order (layers by block number)."""
    names = diffsynth_key_map(list(unet.state_dict()))
    params = unet.state_dict()
    targets = sorted((k for k in params if TARGET.search(k)), key=lambda k: int(names[k].split(".")[1]))
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for key in targets:
        name = names[key][: -len(".weight")]
        out_features, in_features = params[key].shape
        state[f"{name}.lora_A.default.weight"] = make(rank, in_features, generator=gen) * 0.3
        state[f"{name}.lora_B.default.weight"] = make(out_features, rank, generator=gen) * 0.3
    return state


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A trainer-made LoRA (rank 4, alpha 2: scale 0.5) with non-zero lora_B, and its UNet."""
    unet = build_unet(0)
    add_lora(unet, TrainSettings(rank=4, alpha=2.0))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if ".lora_B." in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.5)
    return unet, save_lora(unet, tmp_path_factory.mktemp("trained"))


def test_diffusers_to_diffsynth_and_back_keeps_the_unet_output(trained, tmp_path):
    unet, lora_file = trained
    weights = read_lora(lora_file, build_unet(0))
    # the published file has alpha/rank (2/4) folded into B and says alpha = rank
    assert (weights.source_format, weights.rank, weights.alpha) == ("diffusers", 4, 4.0)
    key = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_v.lora_B.weight"
    trained_b = unet.get_submodule(key[: -len(".lora_B.weight")]).lora_B["default"].weight
    assert torch.equal(weights.state[key], trained_b.detach() * 0.5)

    ckpt = write_diffsynth_lora(weights, tmp_path / "epoch=0-step=500.ckpt")
    raw = torch.load(ckpt, weights_only=True)
    assert "blocks.7.transformer_blocks.0.attn1.to_out.lora_B.default.weight" in raw
    imported = read_lora(ckpt, build_unet(0))  # no diffsynth_alpha: DiffSynth's scale 1
    assert (imported.source_format, imported.rank, imported.alpha) == ("diffsynth", 4, 4.0)
    assert torch.equal(imported.state[key], weights.state[key])

    back = read_lora(write_diffusers_lora(imported, tmp_path / "back"), build_unet(0))
    fresh = build_unet(0)
    base = unet_output(fresh)
    apply_to_unet(back, fresh)
    expected = unet_output(unet)
    assert (expected - base).abs().max() > 1e-3  # the LoRA matters
    torch.testing.assert_close(unet_output(fresh), expected, rtol=1e-5, atol=1e-6)


def test_diffsynth_to_diffusers_and_back_gives_identical_tensors(tmp_path):
    unet = build_unet(0)
    original = diffsynth_lora(unet, rank=2, seed=3)
    torch.save(original, tmp_path / "epoch=0-step=500.ckpt")
    weights = read_lora(tmp_path / "epoch=0-step=500.ckpt", unet)
    assert weights.source_format == "diffsynth" and weights.scale == 1.0
    diffusers_file = write_diffusers_lora(weights, tmp_path / "diffusers")
    assert all(k.startswith("unet.") and ".lora." in k for k in load_file(diffusers_file))
    again = read_lora(diffusers_file, unet)
    out = torch.load(write_diffsynth_lora(again, tmp_path / "again.ckpt"), weights_only=True)
    assert list(out) == list(original)
    assert all(torch.equal(out[k], original[k]) for k in original)

    # a Lightning checkpoint that kept its "state_dict" wrapper reads the same
    torch.save({"state_dict": original, "epoch": 0, "global_step": 500}, tmp_path / "wrapped.ckpt")
    wrapped = read_lora(tmp_path / "wrapped.ckpt", unet)
    assert all(torch.equal(wrapped.state[k], weights.state[k]) for k in weights.state)


class DiffSynthView:
    """The UNet under DiffSynth's parameter names, as DiffSynth's LoRA loader sees its models."""

    def __init__(self, unet):
        self.unet = unet
        self.names = diffsynth_key_map(list(unet.state_dict()))

    def named_parameters(self):
        return [(self.names[k], v) for k, v in self.unet.state_dict().items()]

    def state_dict(self):
        return {self.names[k]: v.clone() for k, v in self.unet.state_dict().items()}

    def load_state_dict(self, state):
        back = {v: k for k, v in self.names.items()}
        self.unet.load_state_dict({back[k]: v for k, v in state.items()})


def test_converted_diffsynth_lora_loads_in_stock_pipeline_at_diffsynth_scale(tiny_kolors, tmp_path):
    from diffsynth.models.lora import GeneralLoRAFromPeft
    from diffusers import KolorsPipeline

    pipe = KolorsPipeline.from_pretrained(str(tiny_kolors), variant="fp16")  # stock loader, real layout

    def render():
        return pipe("水墨画，山水", height=32, width=32, num_inference_steps=3, guidance_scale=4.0,
                    generator=torch.Generator().manual_seed(0), output_type="np").images[0]

    base = render()
    state = diffsynth_lora(pipe.unet, rank=4, seed=5)
    torch.save(state, tmp_path / "epoch=0-step=500.ckpt")
    weights = read_lora(tmp_path / "epoch=0-step=500.ckpt", pipe.unet)
    out_dir = tmp_path / "converted"
    write_diffusers_lora(weights, out_dir)

    pipe.load_lora_weights(str(out_dir), weight_name=LORA_WEIGHT_NAME, adapter_name="style")
    config = pipe.unet.peft_config["style"]
    assert (config.r, config.lora_alpha) == (4, 4)
    styled = render()
    assert np.abs(styled - base).max() > 1e-3

    # DiffSynth's own loader (ModelManager.load_lora default lora_alpha=1.0) merged into the UNet
    pipe.unload_lora_weights()
    assert np.array_equal(render(), base)
    view = DiffSynthView(pipe.unet)
    loader = GeneralLoRAFromPeft()
    assert loader.match(view, state) is not None
    loader.load(view, state, alpha=1.0)
    np.testing.assert_allclose(render(), styled, atol=2e-4)


# ---------------------------------------------------------------- strength that survives every loader
def randomize_lora_b(unet, seed: int) -> None:
    """Trained-looking adapter: lora_B is zero at init, so give it seeded values."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if ".lora_B." in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.5)


def tiny_pipeline(tiny_kolors):
    from diffusers import KolorsPipeline

    # fp32 throughout, so only folding can make the loaded LoRA differ from the trained one
    return KolorsPipeline.from_pretrained(str(tiny_kolors), variant="fp16", torch_dtype=torch.float32)


def render_np(pipe) -> np.ndarray:
    return pipe("水墨画，山水", height=32, width=32, num_inference_steps=3, guidance_scale=4.0,
                generator=torch.Generator().manual_seed(0), output_type="np").images[0]


def loaded_with_stock_loader(tiny_kolors, folder):
    pipe = tiny_pipeline(tiny_kolors)
    pipe.load_lora_weights(str(folder), weight_name=LORA_WEIGHT_NAME, adapter_name="style")
    return pipe


@pytest.mark.parametrize("alpha, bitwise", [(2.0, True), (3.0, False)])
def test_published_lora_gives_the_same_image_with_or_without_its_metadata(tiny_kolors, tmp_path, alpha, bitwise):
    """Rank 4: alpha 2 is scale 0.5, a power of two, so B * 0.5 is exact and (0.5 B) A x equals
    0.5 (B A x) bit for bit: bitwise. Alpha 3 (0.75) rounds B once in fp32: allclose."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    reference = tiny_pipeline(tiny_kolors)
    add_lora(reference.unet, TrainSettings(rank=4, alpha=alpha))
    randomize_lora_b(reference.unet, seed=1)
    expected_image, expected_unet = render_np(reference), unet_output(reference.unet)  # peft at alpha/rank
    saved = save_lora(reference.unet, tmp_path / "saved")
    stripped = tmp_path / "stripped" / LORA_WEIGHT_NAME
    stripped.parent.mkdir()
    save_file(load_file(saved), stripped)  # the same tensors, no metadata
    with safe_open(str(stripped), framework="pt") as f:
        assert not f.metadata()

    base = render_np(tiny_pipeline(tiny_kolors))
    assert np.abs(expected_image - base).max() > 1e-3  # the LoRA matters
    for folder in (saved.parent, stripped.parent):
        pipe = loaded_with_stock_loader(tiny_kolors, folder)
        config = pipe.unet.peft_config["style"]
        assert (config.r, config.lora_alpha) == (4, 4)  # metadata or diffusers' default alpha = r
        image, out = render_np(pipe), unet_output(pipe.unet)
        if bitwise:
            assert np.array_equal(image, expected_image) and torch.equal(out, expected_unet)
        else:
            np.testing.assert_allclose(image, expected_image, rtol=0, atol=1e-5)
            torch.testing.assert_close(out, expected_unet, rtol=1e-5, atol=1e-6)

    # control: the unfolded tensors without metadata load at scale 1, not alpha/rank
    unfolded = convert_state_dict_to_diffusers(get_peft_model_state_dict(reference.unet))
    (tmp_path / "unfolded").mkdir()
    save_file({f"unet.{k}": v.contiguous() for k, v in unfolded.items()},
              tmp_path / "unfolded" / LORA_WEIGHT_NAME)
    wrong = render_np(loaded_with_stock_loader(tiny_kolors, tmp_path / "unfolded"))
    assert np.abs(wrong - expected_image).max() > 1e-3


def test_folding_leaves_the_adapter_and_its_checkpoint_state_alone(trained, tmp_path):
    """Checkpoints store lora_state (peft tensors at alpha/rank); only the published file is folded."""
    from kolors_story.training.lora_adapter import lora_state

    unet, _ = trained
    state = lora_state(unet)
    published = load_file(save_lora(unet, tmp_path))
    after = lora_state(unet)
    assert after.keys() == state.keys() and all(torch.equal(after[k], state[k]) for k in state)
    assert unet.peft_config["default"].lora_alpha == 2.0
    for key, value in state.items():
        name = "unet." + key.replace(".lora_A.", ".lora.down.").replace(".lora_B.", ".lora.up.")
        assert torch.equal(published[name], value * 0.5 if ".lora_B." in key else value)


def test_our_importers_read_the_trained_strength_from_the_published_file(trained):
    unet, lora_file = trained
    expected = unet_output(unet)
    read_back = build_unet(0)
    apply_to_unet(read_lora(lora_file, read_back), read_back)
    started = build_unet(0)
    add_lora(started, TrainSettings(rank=16, alpha=8.0, init_lora=str(lora_file)))  # the file's rank wins
    assert started.peft_config["default"].r == 4
    for other in (read_back, started):
        assert torch.equal(unet_output(other), expected)  # scale 0.5: exact, see above


def diffsynth_merged_output(state: dict[str, torch.Tensor], scale: float) -> torch.Tensor:
    """What DiffSynth's own loader gives: ModelManager.load_lora(path, lora_alpha=scale) merges
    scale * B @ A into the UNet's weights."""
    from diffsynth.models.lora import GeneralLoRAFromPeft

    unet = build_unet(0)
    GeneralLoRAFromPeft().load(DiffSynthView(unet), state, alpha=scale)
    return unet_output(unet)


@pytest.mark.parametrize("setting, scale", [(None, 1.0), (2.0, 0.5), (1.0, 0.25)])
def test_imported_diffsynth_lora_is_applied_at_the_configured_alpha(setting, scale, tiny_kolors, tmp_path):
    state = diffsynth_lora(build_unet(0), rank=4, seed=5)
    ckpt = tmp_path / "epoch=0-step=500.ckpt"
    torch.save(state, ckpt)

    # train.use_lora: rule import_lora runs convert_lora with train.diffsynth_alpha
    weights = convert_lora(ckpt, tiny_kolors, diffusers_dir=tmp_path / "diffusers",
                                   diffsynth_file=tmp_path / "diffsynth_lora.ckpt", diffsynth_alpha=setting)
    assert (weights.rank, weights.scale) == (4, scale)
    written = tmp_path / "diffusers" / LORA_WEIGHT_NAME
    imported = build_unet(0)
    apply_to_unet(read_lora(written, imported), imported)
    expected = diffsynth_merged_output(state, scale)
    torch.testing.assert_close(unet_output(imported), expected, rtol=1e-4, atol=1e-5)
    assert (expected - diffsynth_merged_output(state, 2 * scale)).abs().max() > 1e-3  # the scale matters
    # the exported .ckpt, at DiffSynth's default lora_alpha=1.0, applies the same strength
    exported = torch.load(tmp_path / "diffsynth_lora.ckpt", weights_only=True)
    torch.testing.assert_close(diffsynth_merged_output(exported, 1.0), expected, rtol=1e-4, atol=1e-5)

    # train.init_lora: the trainer starts from it at the same alpha
    started = build_unet(0)
    add_lora(started, TrainSettings(rank=4, init_lora=str(ckpt), diffsynth_alpha=setting))
    assert started.peft_config["default"].lora_alpha == (4.0 if setting is None else setting)
    torch.testing.assert_close(unet_output(started), expected, rtol=1e-4, atol=1e-5)


def test_diffsynth_alpha_default_is_the_baselines_render_alpha_everywhere():
    from kolors_story.plan.config import load_schema

    schema = load_schema(ROOT / "schemas/config.schema.yaml")
    prop = schema["properties"]["train"]["properties"]["diffsynth_alpha"]
    config = yaml.safe_load((ROOT / "config.yaml").read_text(encoding="utf-8"))
    assert prop["default"] == config["train"]["diffsynth_alpha"] == TrainSettings().diffsynth_alpha == 2.0
    assert "lora_alpha=2.0" in prop["description"]


SAVE_TWICE = """
import hashlib, sys
from pathlib import Path
import torch
torch.set_num_threads(1)
from kolors_story.models.random_kolors import build_unet
from kolors_story.training import TrainSettings, add_lora, save_lora
unet = build_unet(0)
add_lora(unet, TrainSettings(rank=4, alpha=2.0))
gen = torch.Generator().manual_seed(1)
with torch.no_grad():
    for name, param in unet.named_parameters():
        if ".lora_B." in name:
            param.copy_(torch.randn(param.shape, generator=gen))
print(",".join(set(TrainSettings().target_modules)))  # this process's set order
for i in range(3):
    print(hashlib.sha256(save_lora(unet, Path(sys.argv[1]) / str(i)).read_bytes()).hexdigest())
"""


def test_saved_lora_is_byte_identical_across_saves_and_processes(tmp_path):
    """diffusers writes target_modules as list(set) (order follows PYTHONHASHSEED) and
    safetensors writes metadata keys in HashMap order (it changes from save to save)."""
    runs = []
    for hash_seed in ("1", "2"):  # list(set) orders differ under these two seeds
        env = {**os.environ, "PYTHONHASHSEED": hash_seed, "HF_HUB_OFFLINE": "1"}
        proc = subprocess.run([sys.executable, "-c", SAVE_TWICE, str(tmp_path / hash_seed)], env=env,
                              capture_output=True, text=True, timeout=300, check=True)
        runs.append(proc.stdout.split())
    assert runs[0][0] != runs[1][0]  # the unsorted set orders really differ
    assert len({digest for run in runs for digest in run[1:]}) == 1
    path = tmp_path / "1" / "0" / LORA_WEIGHT_NAME
    size = int.from_bytes(path.read_bytes()[:8], "little")
    header = json.loads(path.read_bytes()[8:8 + size])
    assert list(header["__metadata__"]) == ["format", "lora_adapter_metadata"]
    packed = json.loads(header["__metadata__"]["lora_adapter_metadata"])
    assert packed["unet.target_modules"] == ["to_k", "to_out.0", "to_q", "to_v"]
    assert (packed["unet.r"], packed["unet.lora_alpha"]) == (4, 4.0)


def test_full_size_kolors_names_match_diffsynth_and_the_baseline_file(tmp_path):
    from diffsynth.models.lora import GeneralLoRAFromPeft, get_lora_loaders
    from diffsynth.models.sdxl_unet import SDXLUNet

    unet = full_size_unet()
    keys = list(unet.state_dict())
    names = diffsynth_key_map(keys)
    assert len(names) == len(set(names.values())) == 1682
    assert names["down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0.weight"] == \
        "blocks.7.transformer_blocks.0.attn1.to_out.weight"
    with torch.device("meta"):
        diffsynth_unet = SDXLUNet(is_kolors=True)
    theirs = diffsynth_unet.state_dict()
    assert set(names.values()) == set(theirs)  # every name is a parameter of DiffSynth's Kolors UNet
    ours = unet.state_dict()
    assert all(ours[k].shape == theirs[v].shape for k, v in names.items())

    # 70 transformer blocks x 2 attentions x (q, k, v, out) = 560 layers, x (A, B) = 1120 keys
    assert sum(bool(TARGET.search(k)) for k in keys) == 560
    baseline = diffsynth_lora(unet, rank=1, seed=0, make=lambda *shape, generator: torch.zeros(shape))
    assert len(baseline) == 1120
    # in the order DiffSynth's trainer saves them: its UNet's state_dict order
    layers = {k.rsplit(".lora_", 1)[0] + ".weight" for k in baseline}
    assert [k.rsplit(".lora_", 1)[0] + ".weight" for k in baseline][::2] == [k for k in theirs if k in layers]
    torch.save(baseline, tmp_path / "epoch=0-step=500.ckpt")
    weights = read_lora(tmp_path / "epoch=0-step=500.ckpt", unet)
    assert len(weights.state) == 1120 and weights.target_modules == ("to_k", "to_out.0", "to_q", "to_v")
    exported = torch.load(write_diffsynth_lora(weights, tmp_path / "out.ckpt"), weights_only=True)
    assert list(exported) == list(baseline)
    # DiffSynth's ModelManager.load_lora picks the first loader that matches: the peft one
    first = next(lo for lo in get_lora_loaders() if lo.match(diffsynth_unet, exported) is not None)
    assert isinstance(first, GeneralLoRAFromPeft)


class Arbitrary:
    pass


def _wrong_names(unet):
    return {"foo.bar.lora_A.default.weight": torch.zeros(2, 4), "foo.bar.lora_B.default.weight": torch.zeros(4, 2)}


def _wrong_shapes(unet):
    state = diffsynth_lora(unet, rank=2, seed=0)
    key = next(k for k in state if k.endswith("lora_A.default.weight"))
    state[key] = torch.zeros(2, state[key].shape[1] + 1)
    return state


def _half_missing(unet):
    state = diffsynth_lora(unet, rank=2, seed=0)
    del state[next(k for k in state if k.endswith("lora_B.default.weight"))]
    return state


@pytest.mark.parametrize("make, message", [
    (_wrong_names, "naming no LoRA-able layer"),
    (_wrong_shapes, "shapes that do not fit"),
    (_half_missing, "missing A/B halves"),
    (lambda unet: {"conv_in.weight": torch.zeros(1)}, "holds no LoRA tensors"),
    (lambda unet: {"x": Arbitrary()}, "weights_only=True refused"),
])
def test_files_that_are_not_a_lora_of_this_unet_are_refused(make, message, tmp_path):
    unet = build_unet(0)
    path = tmp_path / "bad.ckpt"
    torch.save(make(unet), path)
    with pytest.raises(UserError, match=message) as err:
        read_lora(path, unet)
    assert str(path) in str(err.value)


def test_other_unreadable_files_are_refused(tmp_path):
    unet = build_unet(0)
    pickled = tmp_path / "plain.pt"
    pickled.write_bytes(pickle.dumps(Arbitrary()))
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file")
    non_lora = tmp_path / "unet.safetensors"
    save_file({"conv_in.weight": torch.zeros(2, 2)}, non_lora)
    for path in (pickled, garbage, non_lora, tmp_path / "missing.ckpt"):
        with pytest.raises(UserError, match=re.escape(str(path))):
            read_lora(path, unet)
