"""The tiny BLIP captioner (kolors_story.models.random_blip) has the real repository's layout and
loads as Data-Juicer's model loader loads it: AutoProcessor plus the class config.json names."""

from __future__ import annotations

import json

import numpy as np
import transformers
from PIL import Image

from kolors_story.models.random_blip import build_tiny_blip

REAL_FILES = {"config.json", "preprocessor_config.json", "special_tokens_map.json", "tokenizer.json",
              "tokenizer_config.json", "vocab.txt", "model.safetensors"}  # Salesforce/blip-image-captioning-base


def test_layout_and_loading_as_data_juicer_does(tmp_path):
    folder = build_tiny_blip(tmp_path / "blip")
    assert REAL_FILES <= {p.name for p in folder.iterdir()}
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    assert config["architectures"] == ["BlipForConditionalGeneration"] and config["model_type"] == "blip"
    processor = transformers.AutoProcessor.from_pretrained(folder)
    assert type(processor).__name__ == "BlipProcessor"
    model = getattr(transformers, config["architectures"][0]).from_pretrained(folder)
    assert sum(p.numel() for p in model.parameters()) < 500_000
    image = Image.fromarray(np.zeros((40, 50, 3), dtype=np.uint8))
    ids = model.generate(**processor(images=[image], return_tensors="pt"), max_new_tokens=8, do_sample=False)
    assert processor.batch_decode(ids, skip_special_tokens=True)[0].strip()


def test_a_mute_blip_ends_every_caption_at_once(tmp_path):
    folder = build_tiny_blip(tmp_path / "mute", mute=True)
    processor = transformers.AutoProcessor.from_pretrained(folder)
    model = transformers.BlipForConditionalGeneration.from_pretrained(folder)
    image = Image.fromarray(np.zeros((40, 50, 3), dtype=np.uint8))
    ids = model.generate(**processor(images=[image], return_tensors="pt"), max_new_tokens=8, do_sample=True)
    assert processor.batch_decode(ids, skip_special_tokens=True)[0].strip() == ""
