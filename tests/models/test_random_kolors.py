"""The random Kolors builder writes the text encoder as Kwai-Kolors/Kolors-diffusers has it: 3 shards
`model.fp16-0000N-of-00003.safetensors` and the index `model.safetensors.index.fp16.json`
(../shared/FACTS.md, "Real repositories"), at full size too, checked here without full weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kolors_story.models import random_kolors
from kolors_story.models.kolors_configs import CHATGLM3_6B

REAL_SHARDS = [f"model.fp16-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
REAL_INDEX = "model.safetensors.index.fp16.json"


def full_size_chatglm_on_meta():
    """ChatGLM3-6B at its real shapes in fp16, on the meta device: sizes without memory."""
    from diffusers.pipelines.kolors.text_encoder import ChatGLMConfig, ChatGLMModel

    with random_kolors.building(torch.float16, "meta"):
        return ChatGLMModel(ChatGLMConfig(**CHATGLM3_6B), empty_init=False)


def shard_files(state_dict: dict, max_shard_size: int) -> dict[str, list[str]]:
    """The files save_pretrained(variant="fp16", max_shard_size=...) writes: transformers 4.57 splits
    with huggingface_hub's split_torch_state_dict_into_shards under its variant-glued name pattern."""
    from huggingface_hub import split_torch_state_dict_into_shards

    return split_torch_state_dict_into_shards(state_dict, filename_pattern="model.fp16{suffix}.safetensors",
                                              max_shard_size=max_shard_size).filename_to_tensors


@pytest.fixture(scope="module")
def full_state() -> dict[str, torch.Tensor]:
    return full_size_chatglm_on_meta().state_dict()


def test_the_old_size_rule_gave_the_full_text_encoder_four_shards(full_state):
    size = sum(t.untyped_storage().nbytes() for t in full_state.values())
    assert round(size / 1e9, 1) == 12.5  # the real repo's text encoder: 12.5 GB of fp16
    assert len(shard_files(full_state, size // 3 + 1)) == 4  # greedy: 4.09 + 4.08 + 3.78 + 0.53 GB


def test_the_full_text_encoder_is_planned_in_the_real_three_shards(full_state):
    size = random_kolors.shard_size(full_state, random_kolors.TEXT_ENCODER_SHARDS)
    files = shard_files(full_state, size)
    assert list(files) == REAL_SHARDS
    biggest = max(t.untyped_storage().nbytes() for t in full_state.values())
    assert biggest <= size and len(shard_files(full_state, size - 1)) == 4  # the smallest size that gives 3
    order = [name for names in files.values() for name in names]
    assert order == list(full_state)  # consecutive tensors per shard, as saved


def test_the_builder_saves_the_full_text_encoder_in_three_shards(tmp_path, monkeypatch):
    """save_kolors_folder with the full-size ChatGLM (on the meta device) and its save recorded."""
    encoder = full_size_chatglm_on_meta()
    saved = {}

    def record(self, folder, variant=None, max_shard_size=None, **_):
        saved.update(folder=Path(folder), variant=variant, files=shard_files(self.state_dict(), max_shard_size))

    class Saved:  # stands in for the UNet and VAE, which save in one file each
        def half(self):
            return self

        def save_pretrained(self, folder, variant=None):
            Path(folder).mkdir(parents=True)

    monkeypatch.setattr(type(encoder), "save_pretrained", record)
    random_kolors.save_kolors_folder(tmp_path / "kolors", Saved(), Saved(), encoder)
    assert saved["folder"] == tmp_path / "kolors" / "text_encoder" and saved["variant"] == "fp16"
    assert list(saved["files"]) == REAL_SHARDS


def test_the_tiny_folder_has_the_real_shards_and_index(tmp_path):
    folder = random_kolors.build_tiny_kolors(tmp_path / "kolors")
    text_encoder = folder / "text_encoder"
    assert sorted(p.name for p in text_encoder.glob("*.safetensors")) == REAL_SHARDS
    index = json.loads((text_encoder / REAL_INDEX).read_text())
    assert sorted(set(index["weight_map"].values())) == REAL_SHARDS
    assert sorted(p.name for p in text_encoder.iterdir()) == sorted(["config.json", REAL_INDEX, *REAL_SHARDS])


def test_shard_size_refuses_a_count_no_size_gives():
    state = {"a": torch.zeros(10, dtype=torch.float16), "b": torch.zeros(10, dtype=torch.float16)}
    with pytest.raises(ValueError, match="exactly 3 shards"):
        random_kolors.shard_size(state, 3)
