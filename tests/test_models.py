"""Model preparation: the tiny Kolors is in the real layout and loads through the real code."""

import hashlib
import shutil

import pytest
import torch

from kolors_story import models
from kolors_story.errors import UserError
from kolors_story.text_encoding import encode_prompts
from kolors_story.tiny_kolors import build_tiny_kolors, kolors_tokenizer_dir


def test_tiny_kolors_has_the_real_layout(tiny_kolors):
    assert models.kolors_layout_problems(tiny_kolors) == []
    index = models.read_model_index(tiny_kolors)
    assert index["_class_name"] == "KolorsPipeline"
    assert index["text_encoder"] == ["kolors", "ChatGLMModel"]
    assert index["tokenizer"] == ["kolors", "ChatGLMTokenizer"]
    for name in ("tokenizer.model", "tokenizer_config.json", "vocab.txt"):
        shipped = (kolors_tokenizer_dir() / name).read_bytes()
        assert (tiny_kolors / "tokenizer" / name).read_bytes() == shipped


def test_tiny_kolors_build_is_deterministic(tiny_kolors, tmp_path):
    again = build_tiny_kolors(tmp_path / "again", seed=0)
    for part in ("unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors",
                 "vae/diffusion_pytorch_model.safetensors"):
        digest = [hashlib.sha256((root / part).read_bytes()).hexdigest() for root in (tiny_kolors, again)]
        assert digest[0] == digest[1], part


def test_scheduler_is_kolors_own(tiny_kolors):
    from diffusers import DDPMScheduler

    config = DDPMScheduler.from_pretrained(str(tiny_kolors), subfolder="scheduler").config
    assert config.num_train_timesteps == 1100
    assert (config.beta_start, config.beta_end, config.beta_schedule) == (0.00085, 0.014, "scaled_linear")


def test_real_tokenizer_and_text_encoder_give_kolors_shapes(tiny_kolors):
    tokenizer = models.load_tokenizer(tiny_kolors)
    encoder = models.load_text_encoder(tiny_kolors, torch.float32)
    ids = tokenizer(["古风，水墨画"], return_tensors="pt")["input_ids"][0].tolist()
    assert 64790 in ids  # [gMASK]: the real ChatGLM3 vocabulary
    embeds, pooled = encode_prompts(tokenizer, encoder, ["古风，水墨画", "ink"], torch.device("cpu"))
    assert embeds.shape == (2, 256, 32) and pooled.shape == (2, 32)
    assert not torch.allclose(embeds[0], embeds[1])


def test_missing_parts_are_listed(tiny_kolors, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_kolors, broken)
    (broken / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    shutil.rmtree(broken / "tokenizer")
    with pytest.raises(UserError) as err:
        models.check_kolors_dir(broken, "models.kolors")
    message = str(err.value)
    assert "models.kolors" in message and "tokenizer/tokenizer.model" in message
    assert "unet/ weights" in message


def test_missing_folder_names_the_key(tmp_path):
    with pytest.raises(UserError, match="models.kolors: model folder .* does not exist"):
        models.check_kolors_dir(tmp_path / "nope", "models.kolors")


def test_fp16_only_folders_load_with_the_fp16_variant(tmp_path):
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "diffusion_pytorch_model.fp16.safetensors").write_bytes(b"")
    assert models.weight_variant(tmp_path) == "fp16"
    (tmp_path / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    assert models.weight_variant(tmp_path) is None


def test_offline_download_fails_fast_naming_id_and_key(tmp_path):
    import time

    start = time.monotonic()
    with pytest.raises(UserError) as err:
        models.download_model("Kwai-Kolors/Kolors-diffusers", tmp_path / "k", "models.kolors")
    assert time.monotonic() - start < 60
    assert "Kwai-Kolors/Kolors-diffusers" in str(err.value) and "models.kolors" in str(err.value)
