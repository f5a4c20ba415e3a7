"""The tiny prompt-writer model: Qwen/Qwen2.5-7B-Instruct's layout and config with random weights,
and the real Qwen2 tokenizer rebuilt from the qwen.tiktoken ranks, checked against tiktoken's own
encoding of those ranks (the reference implementation of that file)."""

from __future__ import annotations

import json

import pytest

from kolors_story.files import sha256_file
from kolors_story.models.random_qwen import QWEN2_PATTERN, build_random_qwen, load_tiktoken_ranks, qwen_tiktoken_file

# Qwen/Qwen2.5-7B-Instruct's files (its 4 weight shards here 1, with the index beside them)
REAL_FILES = {"config.json", "generation_config.json", "merges.txt", "model.safetensors.index.json",
              "tokenizer.json", "tokenizer_config.json", "vocab.json"}
TEXTS = ["古风，水墨画，一个黑色长发少女，坐在教室里，盯着黑板，深思，上半身，红色长裙",
         "Hello, world! It's 2026-12-06 and 3.14159 apples.", "line one\r\nline two\n\n\tindented",
         "emoji 👩‍👩‍👧 and flags 🇨🇳", "日本語のテキストとカタカナ", "Ελληνικά, русский, العربية",
         "ＦＵＬＬ　ｗｉｄｔｈ　１２３", '{"scenes": [{"id": "s1", "prompt": "x"}]}', "   leading and trailing   "]


@pytest.fixture(scope="module")
def tokenizer(tiny_qwen):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_qwen)


def test_the_folder_has_the_real_repository_layout_and_config(tiny_qwen):
    assert REAL_FILES <= {p.name for p in tiny_qwen.iterdir()}
    config = json.loads((tiny_qwen / "config.json").read_text(encoding="utf-8"))
    assert config["architectures"] == ["Qwen2ForCausalLM"] and config["vocab_size"] == 152064
    assert (config["bos_token_id"], config["eos_token_id"], config["tie_word_embeddings"]) == (151643, 151645, False)
    index = json.loads((tiny_qwen / "model.safetensors.index.json").read_text(encoding="utf-8"))
    assert {tiny_qwen / shard for shard in index["weight_map"].values()} <= set(tiny_qwen.iterdir())


def test_the_tokenizer_encodes_as_tiktoken_does_with_the_same_ranks(tokenizer):
    import tiktoken

    ranks = load_tiktoken_ranks(qwen_tiktoken_file())
    reference = tiktoken.Encoding("qwen", pat_str=QWEN2_PATTERN, mergeable_ranks=ranks, special_tokens={})
    for text in TEXTS:
        assert tokenizer.encode(text, add_special_tokens=False) == reference.encode(text), text
        assert tokenizer.decode(tokenizer.encode(text)) == text
    assert tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [151643, 151644, 151645]


def test_the_chat_template_is_chatml(tokenizer):
    text = tokenizer.apply_chat_template([{"role": "system", "content": "你好"}, {"role": "user", "content": "写"}],
                                         tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>system\n你好<|im_end|>\n<|im_start|>user\n写<|im_end|>\n<|im_start|>assistant\n"


def test_the_model_loads_offline_and_the_same_seed_builds_the_same_bytes(tiny_qwen, tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_qwen)
    assert model.config.num_hidden_layers == 2 and model.lm_head.out_features == 152064
    again = build_random_qwen(tmp_path / "again", qwen_tiktoken_file())
    for name in ("model-00001-of-00001.safetensors", "tokenizer.json", "vocab.json", "merges.txt"):
        assert sha256_file(again / name) == sha256_file(tiny_qwen / name), name
