"""A tiny random-weight stand-in for `Qwen/Qwen2.5-7B-Instruct`, the prompt writer's local model
(the demo's `demo-outline` variant and the tests), in the real repository's layout:
config.json, generation_config.json, tokenizer.json, tokenizer_config.json (with the real ChatML
chat template), vocab.json, merges.txt, model.safetensors.index.json and a safetensors shard.

* A seeded random `Qwen2ForCausalLM` (hidden 64, 2 layers, ~20 M parameters) whose config keeps
  every other field of the real 7B config (vocab 152064, untied embeddings, rope_theta 1e6, ...).
* The real Qwen2 byte-level BPE tokenizer, rebuilt from `qwen.tiktoken` (151,643 ranks, shipped in
  the `dashscope` wheel at `dashscope/resources/qwen.tiktoken`; `make env` extracts that one file
  into the environment, checked by its sha256) plus the 22 Qwen2.5 added tokens. Its vocab.json
  and merges.txt are byte-identical to the real ones; tests/models/test_random_qwen.py checks the
  tokenizer against tiktoken's own encoding of the same ranks. transformers' TikTokenConverter is
  not used: in 4.57 it splits digits in threes and skips NFC, unlike Qwen2.

Only transformers, tokenizers, torch and safetensors are needed; no network.
"""

from __future__ import annotations

import base64
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers
from tokenizers import pre_tokenizers, processors
from transformers import Qwen2Config, Qwen2ForCausalLM
from transformers.models.gpt2.tokenization_gpt2 import bytes_to_unicode

from kolors_story.files import share_as_umask_allows, write_json

# Qwen2 pre-tokenizer: like cl100k but digits are split one by one (\p{N}).
QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Qwen2.5 added tokens, ids 151643.. in this order: (content, special).
ADDED_TOKENS: list[tuple[str, bool]] = [
    ("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True),
    ("<|object_ref_start|>", True), ("<|object_ref_end|>", True),
    ("<|box_start|>", True), ("<|box_end|>", True),
    ("<|quad_start|>", True), ("<|quad_end|>", True),
    ("<|vision_start|>", True), ("<|vision_end|>", True),
    ("<|vision_pad|>", True), ("<|image_pad|>", True), ("<|video_pad|>", True),
    ("<tool_call>", False), ("</tool_call>", False),
    ("<|fim_prefix|>", False), ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False), ("<|fim_pad|>", False),
    ("<|repo_name|>", False), ("<|file_sep|>", False),
]

# The chat template of Qwen2.5-*-Instruct, verbatim (ChatML + Hermes tools).
CHAT_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""

# config.json of Qwen2.5-7B-Instruct with the size fields shrunk (marked).
MODEL_CONFIG: dict[str, object] = {
    "architectures": ["Qwen2ForCausalLM"],
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "hidden_act": "silu",
    "hidden_size": 64,  # real: 3584
    "initializer_range": 0.02,
    "intermediate_size": 128,  # real: 18944
    "max_position_embeddings": 32768,
    "max_window_layers": 28,
    "model_type": "qwen2",
    "num_attention_heads": 4,  # real: 28
    "num_hidden_layers": 2,  # real: 28
    "num_key_value_heads": 2,  # real: 4
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "sliding_window": 131072,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.43.1",
    "use_cache": True,
    "use_sliding_window": False,
    "vocab_size": 152064,
}

GENERATION_CONFIG: dict[str, object] = {
    "bos_token_id": 151643,
    "pad_token_id": 151643,
    "do_sample": True,
    "eos_token_id": [151645, 151643],
    "repetition_penalty": 1.05,
    "temperature": 0.7,
    "top_p": 0.8,
    "top_k": 20,
    "transformers_version": "4.37.0",
}

SHARD_NAME = "model-00001-of-00001.safetensors"

# GPT-2 byte -> printable unicode map used by byte-level BPE files.
BYTE_MAP: dict[int, str] = bytes_to_unicode()


def _byte_str(token: bytes) -> str:
    """Spell raw token bytes the way vocab.json / merges.txt do."""
    return "".join(BYTE_MAP[b] for b in token)


def load_tiktoken_ranks(path: Path) -> dict[bytes, int]:
    """Read a `.tiktoken` file: one `<base64 token> <rank>` pair per line."""
    ranks: dict[bytes, int] = {}
    for line in path.read_bytes().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def _bpe_split(ranks: dict[bytes, int], token: bytes, max_rank: int) -> list[bytes]:
    """Run tiktoken's BPE on `token` using only merges ranked below `max_rank`."""
    parts = [bytes([b]) for b in token]
    while True:
        best_idx, best_rank = -1, max_rank
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and rank < best_rank:
                best_idx, best_rank = i, rank
        if best_idx < 0:
            return parts
        parts[best_idx : best_idx + 2] = [parts[best_idx] + parts[best_idx + 1]]


def derive_merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """Recover one merge per multi-byte token, in rank order.

    Stopping BPE just before a token's own rank leaves exactly the two pieces
    that the final merge joins, which is how GPT-2 style merges.txt files are
    reconstructed from tiktoken ranks (151,643 - 256 = 151,387 merges).
    """
    merges: list[tuple[bytes, bytes]] = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) == 1:
            continue
        parts = _bpe_split(ranks, token, rank)
        if len(parts) != 2:
            raise ValueError(f"token {token!r} (rank {rank}) is not reachable by BPE")
        merges.append((parts[0], parts[1]))
    return merges


def build_fast_tokenizer(
    ranks: dict[bytes, int], merges: list[tuple[bytes, bytes]]
) -> Tokenizer:
    """Assemble the `tokenizers` pipeline used by Qwen2's tokenizer.json."""
    vocab = {_byte_str(tok): rank for tok, rank in ranks.items()}
    str_merges = [(_byte_str(a), _byte_str(b)) for a, b in merges]
    tok = Tokenizer(
        models.BPE(
            vocab, str_merges, dropout=None, unk_token=None,
            continuing_subword_prefix="", end_of_word_suffix="",
            fuse_unk=False, byte_fallback=False, ignore_merges=False,
        )
    )
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.post_processor = processors.ByteLevel(
        add_prefix_space=False, trim_offsets=False, use_regex=False
    )
    tok.decoder = decoders.ByteLevel()
    # Special and plain added tokens are appended in id order (151643..151664).
    for content, special in ADDED_TOKENS:
        added = AddedToken(content, normalized=False, special=special)
        (tok.add_special_tokens if special else tok.add_tokens)([added])
    return tok


def tokenizer_config(first_id: int) -> dict[str, object]:
    """tokenizer_config.json as published for Qwen2.5-*-Instruct."""
    decoder = {
        str(first_id + i): {
            "content": content, "lstrip": False, "normalized": False,
            "rstrip": False, "single_word": False, "special": special,
        }
        for i, (content, special) in enumerate(ADDED_TOKENS)
    }
    return {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": decoder,
        "additional_special_tokens": [c for c, s in ADDED_TOKENS[1:] if s],
        "bos_token": None,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 131072,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }


def write_tokenizer_files(out: Path, qwen_tiktoken: Path) -> None:
    """Write tokenizer.json, tokenizer_config.json, vocab.json and merges.txt."""
    ranks = load_tiktoken_ranks(qwen_tiktoken)
    merges = derive_merges(ranks)
    tok = build_fast_tokenizer(ranks, merges)
    tok.save(str(out / "tokenizer.json"), pretty=True)
    write_json(tokenizer_config(len(ranks)), out / "tokenizer_config.json")
    by_rank = sorted(ranks.items(), key=lambda kv: kv[1])
    vocab = {_byte_str(t): r for t, r in by_rank}  # compact, as the real file is
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, separators=(",", ":")), encoding="utf-8")
    lines = ["#version: 0.2"] + [f"{_byte_str(a)} {_byte_str(b)}" for a, b in merges]
    (out / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")


def write_model_files(out: Path, seed: int) -> None:
    """Write config.json, generation_config.json and seeded bf16 weights."""
    write_json(MODEL_CONFIG, out / "config.json")
    write_json(GENERATION_CONFIG, out / "generation_config.json")
    config = Qwen2Config(**{k: v for k, v in MODEL_CONFIG.items() if k != "torch_dtype"})
    with torch.random.fork_rng(devices=[]):  # leave the caller's RNG untouched
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config)
    tensors = {
        name: t.detach().to(torch.bfloat16).contiguous()
        for name, t in sorted(model.state_dict().items())
    }
    save_file(tensors, str(out / SHARD_NAME), metadata={"format": "pt"})
    share_as_umask_allows(out / SHARD_NAME)  # safetensors creates the file as 0600
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {
        "metadata": {"total_size": total},
        "weight_map": {name: SHARD_NAME for name in tensors},
    }
    write_json(index, out / "model.safetensors.index.json")


def build_random_qwen(out: Path, qwen_tiktoken: Path, seed: int = 0) -> Path:
    """Write a tiny random Qwen2.5-7B-Instruct look-alike into `out`.

    `qwen_tiktoken` is the `qwen.tiktoken` rank file (e.g. from the dashscope
    wheel). The result loads with `AutoTokenizer` / `AutoModelForCausalLM`
    offline; its weights are random, so generations are nonsense. The same
    seed always gives byte-identical files.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_tokenizer_files(out, Path(qwen_tiktoken))
    write_model_files(out, seed)
    (out / "README.md").write_text(
        "Random-weight, 2-layer stand-in for Qwen/Qwen2.5-7B-Instruct "
        "(real Qwen2 tokenizer). For offline tests only.\n",
        encoding="utf-8",
    )
    return out


RANKS_WHEEL = "dashscope==2.0.2"  # a py3-none-any wheel on PyPI holding the file below
RANKS_IN_WHEEL = "dashscope/resources/qwen.tiktoken"
RANKS_SHA256 = "b2b1b8dfb5cc5f024bafc373121c6aba3f66f9a5a0269e243470a1de16a33186"
RANKS_FILE = Path(sys.prefix) / "share" / "kolors-story" / "qwen.tiktoken"  # where `make env` puts it


def qwen_tiktoken_file() -> Path:
    """The qwen.tiktoken ranks `make env` took from the dashscope wheel (RANKS_FILE)."""
    if not RANKS_FILE.is_file():
        raise FileNotFoundError(f"the Qwen tokenizer ranks ({RANKS_FILE}) are missing: run `make env` "
                                f"(it takes them from the {RANKS_WHEEL} wheel)")
    return RANKS_FILE


def fetch_ranks(out: Path = RANKS_FILE) -> Path:
    """Download the dashscope wheel (no dependencies, nothing installed), extract qwen.tiktoken and
    check its sha256: set-up, never run by the workflow or the tests."""
    import subprocess
    import tempfile
    import zipfile

    from kolors_story.files import sha256_file

    if out.is_file() and sha256_file(out) == RANKS_SHA256:
        return out
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary", ":all:",
                        RANKS_WHEEL, "-d", tmp], check=True)
        (wheel,) = Path(tmp).glob("*.whl")
        out.parent.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(wheel) as archive:
            out.write_bytes(archive.read(RANKS_IN_WHEEL))
    if sha256_file(out) != RANKS_SHA256:
        out.unlink()
        raise SystemExit(f"{RANKS_IN_WHEEL} in {RANKS_WHEEL} is not the file this project was checked with")
    return out


if __name__ == "__main__":
    if sys.argv[1:] == ["--fetch-ranks"]:
        print(f"Qwen tokenizer ranks: {fetch_ranks()}")
    else:
        raise SystemExit("usage: python -m kolors_story.models.random_qwen --fetch-ranks")
