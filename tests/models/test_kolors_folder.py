"""The Kolors folder owner: the tiny Kolors is laid out as Kwai-Kolors/Kolors-diffusers is, every
diffusers layout found in the wild loads to bitwise the same pipeline, and everything else is
refused with the files that are missing or foreign."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from kolors_story.errors import UserError
from kolors_story.models.kolors_folder import KolorsFolder
from kolors_story.models.prompt_embeddings import encode_prompts
from kolors_story.models.kolors_configs import MODEL_INDEX, SCHEDULER_CONFIG
from kolors_story.models.random_kolors import build_tiny_kolors, kolors_tokenizer_dir

# The file list of Kwai-Kolors/Kolors-diffusers (../shared/FACTS.md, "Real repositories").
REAL_FILES = {
    "model_index.json", "scheduler/scheduler_config.json", "text_encoder/config.json",
    "text_encoder/model.fp16-00001-of-00003.safetensors", "text_encoder/model.fp16-00002-of-00003.safetensors",
    "text_encoder/model.fp16-00003-of-00003.safetensors", "text_encoder/model.safetensors.index.fp16.json",
    "tokenizer/tokenizer.model", "tokenizer/tokenizer_config.json", "tokenizer/vocab.txt",
    "unet/config.json", "unet/diffusion_pytorch_model.fp16.safetensors",
    "vae/config.json", "vae/diffusion_pytorch_model.fp16.safetensors",
}


def files_of(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def test_tiny_kolors_has_exactly_the_real_file_list_and_configs(tiny_kolors):
    assert files_of(tiny_kolors) == REAL_FILES
    assert json.loads((tiny_kolors / "model_index.json").read_text()) == MODEL_INDEX
    assert MODEL_INDEX["force_zeros_for_empty_prompt"] is False
    scheduler = json.loads((tiny_kolors / "scheduler/scheduler_config.json").read_text())
    assert scheduler == SCHEDULER_CONFIG and scheduler["num_train_timesteps"] == 1100
    for name in ("tokenizer.model", "tokenizer_config.json", "vocab.txt"):
        assert (tiny_kolors / "tokenizer" / name).read_bytes() == (kolors_tokenizer_dir() / name).read_bytes()
    index = json.loads((tiny_kolors / "text_encoder/model.safetensors.index.fp16.json").read_text())
    assert set(index["weight_map"].values()) == {f"model.fp16-0000{i}-of-00003.safetensors" for i in (1, 2, 3)}


def test_tiny_weights_are_fp16_as_shipped(tiny_kolors):
    from safetensors import safe_open

    for name in ("unet/diffusion_pytorch_model.fp16.safetensors", "text_encoder/model.fp16-00001-of-00003.safetensors"):
        with safe_open(str(tiny_kolors / name), "pt") as f:
            assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}, name


def test_tiny_kolors_build_is_deterministic(tiny_kolors, tmp_path):
    again = build_tiny_kolors(tmp_path / "again", seed=0)
    for name in REAL_FILES:
        digest = [hashlib.sha256((root / name).read_bytes()).hexdigest() for root in (tiny_kolors, again)]
        assert digest[0] == digest[1], name


def test_real_tokenizer_and_text_encoder_give_kolors_shapes(tiny_kolors):
    folder = KolorsFolder(tiny_kolors)
    tokenizer, encoder = folder.load_tokenizer(), folder.load_text_encoder(torch.float32)
    ids = tokenizer(["古风，水墨画"], return_tensors="pt")["input_ids"][0].tolist()
    assert 64790 in ids  # [gMASK]: the real ChatGLM3 vocabulary
    embeds, pooled = encode_prompts(tokenizer, encoder, ["古风，水墨画", "ink"], torch.device("cpu"))
    assert embeds.shape == (2, 256, 32) and pooled.shape == (2, 32)
    assert not torch.allclose(embeds[0], embeds[1])


# ---- every diffusers layout in the wild loads -------------------------------------------------


def resave(src: Path, dst: Path, variant: str | None, safe: bool = True, te_shards: int = 3,
           unet_shards: int = 1) -> Path:
    """The tiny Kolors written again with other weight spellings (same tensor values)."""
    folder = KolorsFolder(src)
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors", "*.index.*json"))
    dtype = torch.float16 if variant else torch.float32
    encoder = folder.load_text_encoder(dtype)
    size = sum(p.numel() * p.element_size() for p in encoder.state_dict().values())
    encoder.save_pretrained(dst / "text_encoder", variant=variant, safe_serialization=safe,
                            max_shard_size=size // te_shards + 1 if te_shards > 1 else "10GB")
    unet = folder.load_unet(dtype)
    size = sum(p.numel() * p.element_size() for p in unet.state_dict().values())
    unet.save_pretrained(dst / "unet", variant=variant, safe_serialization=safe,
                         max_shard_size=size // unet_shards + 1 if unet_shards > 1 else "10GB")
    folder.load_vae(dtype).save_pretrained(dst / "vae", variant=variant, safe_serialization=safe)
    return dst


def legacy_index(root: Path, part: str, keep_current: bool = False) -> None:
    """Rename `<stem>.safetensors.index.fp16.json` to the older `<stem>.fp16.safetensors.index.json`."""
    (current,) = (root / part).glob("*.safetensors.index.fp16.json")
    legacy = current.with_name(current.name.replace(".safetensors.index.fp16.json", ".fp16.safetensors.index.json"))
    shutil.copyfile(current, legacy)
    if not keep_current:
        current.unlink()


def render(root: Path) -> np.ndarray:
    pipe = KolorsFolder(root).load_pipeline(torch.float32)
    image = pipe("水墨画", width=32, height=32, num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images[0]
    return np.asarray(image)


@pytest.fixture(scope="module")
def reference_image(tiny_kolors) -> np.ndarray:
    return render(tiny_kolors)


LAYOUTS = {
    "fp16, text encoder index in the older spelling": (dict(variant="fp16"), [("text_encoder", False)]),
    "fp16, sharded UNet, current index": (dict(variant="fp16", unet_shards=2), []),
    "fp16, sharded UNet, older index": (dict(variant="fp16", unet_shards=2), [("unet", False)]),
    "fp16, sharded UNet, both index spellings": (dict(variant="fp16", unet_shards=2), [("unet", True)]),
    "full precision safetensors, one file each": (dict(variant=None, te_shards=1), []),
    "full precision, sharded text encoder": (dict(variant=None, te_shards=3), []),
    "pickle (.bin) weights, sharded text encoder": (dict(variant=None, safe=False, te_shards=2), []),
    "fp16 pickle (.bin) weights": (dict(variant="fp16", safe=False, te_shards=1), []),
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_every_diffusers_layout_loads_to_the_same_pipeline(name, tiny_kolors, reference_image, tmp_path):
    options, legacy = LAYOUTS[name]
    root = resave(tiny_kolors, tmp_path / "k", **options)
    for part, keep in legacy:
        legacy_index(root, part, keep)
    folder = KolorsFolder(root)
    expected_format = "safetensors" if options.get("safe", True) else "bin"
    assert {w.format for w in folder.weights.values()} == {expected_format}
    assert folder.variant == options["variant"]
    assert np.array_equal(render(root), reference_image), name
    assert files_of(root) == files_of(tmp_path / "k")  # loading never writes into the user's folder


# ---- everything else is refused, naming what is wrong -----------------------------------------


def copy(tiny_kolors: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_kolors, tmp_path / "kolors"))


def drop_shard(root):
    (root / "text_encoder/model.fp16-00002-of-00003.safetensors").unlink()


def truncate_unet(root):
    path = root / "unet/diffusion_pytorch_model.fp16.safetensors"
    path.write_bytes(path.read_bytes()[:-1000])


def drop_index(root):
    (root / "text_encoder/model.safetensors.index.fp16.json").unlink()


def modelscope_in_flight(root):
    (root / "._____temp" / "unet").mkdir(parents=True)
    (root / "._____temp" / "unet" / "diffusion_pytorch_model.fp16.safetensors").write_bytes(b"\0" * 10)


def hub_in_flight(root):
    (root / ".cache/huggingface/download/unet").mkdir(parents=True)
    (root / ".cache/huggingface/download/unet/x.incomplete").write_bytes(b"")


def no_unet_weights(root):
    (root / "unet/diffusion_pytorch_model.fp16.safetensors").unlink()


def no_tokenizer_and_index(root):
    shutil.rmtree(root / "tokenizer")
    (root / "model_index.json").unlink()


def sdxl_index(root):
    index = json.loads((root / "model_index.json").read_text())
    (root / "model_index.json").write_text(json.dumps({**index, "_class_name": "StableDiffusionXLPipeline"}))


def original_kolors_layout(root):
    """Kwai-Kolors/Kolors: text_encoder as pytorch_model-0000N-of-00007.bin, no model_index.json."""
    (root / "model_index.json").unlink()
    for f in (root / "text_encoder").glob("model*"):
        f.unlink()
    for i in range(1, 8):
        (root / f"text_encoder/pytorch_model-0000{i}-of-00007.bin").write_bytes(b"\0")
    (root / "text_encoder/pytorch_model.bin.index.json").write_text("{}")


def diffsynth_models_folder(root):
    """DiffSynth's models/ folder: the original layout under kolors/Kolors/."""
    inner = root / "kolors" / "Kolors"
    inner.mkdir(parents=True)
    for part in ("unet", "vae", "text_encoder", "scheduler", "tokenizer", "model_index.json"):
        shutil.move(str(root / part), str(inner / part))


REFUSALS = {
    "a shard of a half-finished download": (drop_shard, [
        "text_encoder/model.fp16-00002-of-00003.safetensors (listed in model.safetensors.index.fp16.json)",
        "delete the folder"]),
    "a truncated weight file": (truncate_unet, ["unet/diffusion_pytorch_model.fp16.safetensors (truncated"]),
    "shards without their index": (drop_index, ["text_encoder/model.safetensors.index.fp16.json (the shard index"]),
    "ModelScope still downloading": (modelscope_in_flight, ["unfinished download files ._____temp/unet/"]),
    "huggingface_hub still downloading": (hub_in_flight, ["unfinished download files .cache/huggingface/"]),
    "no UNet weights": (no_unet_weights, ["unet/ weights (e.g. diffusion_pytorch_model.fp16.safetensors"]),
    "missing tokenizer and model_index.json": (no_tokenizer_and_index, ["model_index.json", "tokenizer/tokenizer.model"]),
    "another pipeline": (sdxl_index, ["holds a StableDiffusionXLPipeline (model_index.json), not a KolorsPipeline"]),
    "the original Kwai-Kolors/Kolors layout": (original_kolors_layout, ["original Kwai-Kolors/Kolors layout",
                                                                       "Kwai-Kolors/Kolors-diffusers"]),
    "a DiffSynth models folder": (diffsynth_models_folder, ["DiffSynth models folder", "kolors/Kolors/"]),
}


@pytest.mark.parametrize("name", list(REFUSALS))
def test_foreign_or_incomplete_folders_are_refused_with_the_files_and_the_fix(name, tiny_kolors, tmp_path):
    damage, expected = REFUSALS[name]
    root = copy(tiny_kolors, tmp_path)
    damage(root)
    with pytest.raises(UserError) as err:
        KolorsFolder(root, "models.kolors")
    message = str(err.value)
    assert message.startswith("models.kolors: "), message
    assert "Kwai-Kolors/Kolors-diffusers" in message
    for text in expected:
        assert text in message, (text, message)


def test_a_missing_folder_or_a_single_file_names_the_key(tiny_kolors, tmp_path):
    with pytest.raises(UserError, match="models.kolors: model folder .* does not exist"):
        KolorsFolder(tmp_path / "nope")
    with pytest.raises(UserError, match="is a single file"):
        KolorsFolder(tiny_kolors / "unet" / "diffusion_pytorch_model.fp16.safetensors")


def test_an_empty_temporary_download_folder_is_fine(tiny_kolors, tmp_path):
    root = copy(tiny_kolors, tmp_path)
    (root / "._____temp").mkdir()  # ModelScope leaves it behind, empty, after a finished download
    assert KolorsFolder(root).variant == "fp16"


def test_describe_names_the_layout_without_absolute_paths(tiny_kolors):
    described = KolorsFolder(tiny_kolors).describe()
    assert described["weights"]["text_encoder"]["index"] == "model.safetensors.index.fp16.json"
    assert described["weights"]["unet"]["variant"] == "fp16"
    assert set(described["config_sha256"]) >= {"model_index.json", "unet/config.json"}


@pytest.mark.parametrize("part", ["text_encoder", "unet", "vae"])
def test_every_model_loads_straight_onto_a_cuda_device(tiny_kolors, monkeypatch, part):
    """device_map: diffusers/transformers put each tensor on the GPU as they read it from the
    memory-mapped file; the model is never built in host memory and moved afterwards. ChatGLM
    takes `dtype`, not `torch_dtype`: the one spelling transformers 4.56+ and 5.x both take."""
    import diffusers
    from diffusers.pipelines.kolors.text_encoder import ChatGLMModel

    calls = []

    class Loaded:
        def eval(self):
            return self

        def to(self, *args, **kwargs):
            raise AssertionError("moved after loading: it went through host memory")

    def from_pretrained(folder, **kwargs):
        calls.append(kwargs)
        return Loaded()

    cls = {"text_encoder": ChatGLMModel, "unet": diffusers.UNet2DConditionModel, "vae": diffusers.AutoencoderKL}[part]
    monkeypatch.setattr(cls, "from_pretrained", staticmethod(from_pretrained))
    load = getattr(KolorsFolder(tiny_kolors), f"load_{part}")
    load(torch.bfloat16, torch.device("cuda", 3))
    dtype_key = "dtype" if part == "text_encoder" else "torch_dtype"
    assert calls[-1]["device_map"] == {"": 3} and calls[-1][dtype_key] == torch.bfloat16
    assert {"dtype", "torch_dtype"} & set(calls[-1]) == {dtype_key}
    load(torch.bfloat16, torch.device("cpu"))  # the CPU: loaded there, no map
    assert "device_map" not in calls[-1]


def test_the_unet_loads_onto_the_device_it_is_given_through_diffusers(tiny_kolors):
    """The real loader, onto the meta device: every weight lands there, none on the CPU."""
    unet = KolorsFolder(tiny_kolors).load_unet(torch.bfloat16, torch.device("meta"))
    assert {(p.device.type, p.dtype) for p in unet.parameters()} == {("meta", torch.bfloat16)}
