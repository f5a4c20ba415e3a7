"""The encode_texts job's embeddings file on the tiny Kolors: bitwise the encoded embeddings, one
stored dtype cast at use, one ChatGLM load per rerun and only for missing texts, clear refusals,
training reads it without ChatGLM (per batch, memory-mapped), and the encode job holds one text
at a time."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from kolors_story.errors import UserError
from kolors_story.models.kolors_folder import KolorsFolder
from kolors_story.models.prompt_embeddings import EmbeddingsFile, PromptEmbeddings, encoder_dtype, write_embeddings
from kolors_story.models.text_names import text_name

CPU = torch.device("cpu")
PROMPT, NEGATIVE = "水墨画，山水", "丑陋"


@pytest.fixture
def counted_loads(monkeypatch) -> list[torch.dtype]:
    """Every ChatGLM load, by dtype."""
    loads, load = [], KolorsFolder.load_text_encoder

    def counting(self, dtype, device=None):
        loads.append(dtype)
        return load(self, dtype, device)

    monkeypatch.setattr(KolorsFolder, "load_text_encoder", counting)
    return loads


def refuse_chatglm(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("ChatGLM was loaded although the embeddings file holds every text")

    monkeypatch.setattr(KolorsFolder, "load_text_encoder", refuse)


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("force_zeros", [False, True])
@pytest.mark.parametrize("negative", [NEGATIVE, ""])
def test_for_pipeline_from_the_file_is_bitwise_the_encoded_one(tiny_kolors, tmp_path, monkeypatch, force_zeros,
                                                                 negative):
    monkeypatch.setattr(KolorsFolder, "force_zeros_for_empty_prompt", property(lambda self: force_zeros))
    folder = KolorsFolder(tiny_kolors)
    direct = PromptEmbeddings(folder, torch.float32, CPU).for_pipeline(PROMPT, negative)
    store = write_embeddings(folder, [PROMPT, negative, "二次元"], tmp_path / "e.safetensors", torch.float32, CPU)
    refuse_chatglm(monkeypatch)
    stored = EmbeddingsFile(store, folder, torch.float32, CPU).for_pipeline(PROMPT, negative)
    assert same(direct, stored)
    assert same(stored, PromptEmbeddings(folder, torch.float32, CPU, store=store).for_pipeline(PROMPT, negative))
    zeroed = not torch.any(stored["negative_prompt_embeds"])
    assert zeroed == (force_zeros and not negative)


def test_one_stored_dtype_the_encoders_own_cast_at_use(tiny_kolors, tmp_path, monkeypatch):
    folder = KolorsFolder(tiny_kolors)
    store = write_embeddings(folder, [PROMPT, NEGATIVE], tmp_path / "e.safetensors", torch.bfloat16, CPU)
    with safe_open(str(store), framework="pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    assert EmbeddingsFile(store, folder, torch.float32, CPU).about()["dtype"] == "bfloat16"
    encoded = PromptEmbeddings(folder, torch.bfloat16, CPU).for_pipeline(PROMPT, NEGATIVE)
    refuse_chatglm(monkeypatch)
    assert same(encoded, EmbeddingsFile(store, folder, torch.bfloat16, CPU).for_pipeline(PROMPT, NEGATIVE))
    as_fp32 = EmbeddingsFile(store, folder, torch.float32, CPU).for_pipeline(PROMPT, NEGATIVE)  # cast at use
    assert same(as_fp32, {k: v.float() for k, v in encoded.items()})
    assert encoder_dtype("fp16", CPU) == torch.float32 and encoder_dtype("bf16", torch.device("cuda")) == torch.bfloat16


def test_a_rerun_encodes_only_the_new_text_with_one_chatglm_load(tiny_kolors, tmp_path, counted_loads, caplog):
    folder, cache = KolorsFolder(tiny_kolors), tmp_path / "cache"
    out = tmp_path / "shared" / "e.safetensors"
    write_embeddings(folder, ["a", "b", "c", "a"], out, torch.float32, CPU, cache)
    assert len(counted_loads) == 1 and EmbeddingsFile(out, folder, torch.float32, CPU).texts() == ["a", "b", "c"]
    first = EmbeddingsFile(out, folder, torch.float32, CPU).get(["a", "b"])
    with caplog.at_level("INFO", logger="kolors_story.models.prompt_embeddings"):
        write_embeddings(folder, ["a", "b", "d"], out, torch.float32, CPU, cache)  # "c" edited to "d"
        assert "3 distinct, 2 cached, 1 to encode" in caplog.text
    assert len(counted_loads) == 2 and EmbeddingsFile(out, folder, torch.float32, CPU).texts() == ["a", "b", "d"]
    again = EmbeddingsFile(out, folder, torch.float32, CPU).get(["a", "b"])
    assert all(torch.equal(x, y) for t in "ab" for x, y in zip(first[t], again[t]))
    write_embeddings(folder, ["d", "b", "a"], out, torch.float32, CPU, cache)
    assert len(counted_loads) == 2  # everything cached: ChatGLM not loaded at all
    assert [p.name for p in out.parent.iterdir()] == ["e.safetensors"]  # no temporary file left


def test_a_missing_text_or_a_damaged_file_is_refused_with_the_fix(tiny_kolors, tmp_path):
    folder = KolorsFolder(tiny_kolors)
    store = write_embeddings(folder, [PROMPT, NEGATIVE], tmp_path / "e.safetensors", torch.float32, CPU)
    with pytest.raises(UserError, match=r"'另一个提示' is not in the embeddings file .*snakemake -R encode_texts"):
        EmbeddingsFile(store, folder, torch.float32, CPU).for_pipeline("另一个提示", NEGATIVE)
    damaged = tmp_path / "damaged.safetensors"
    damaged.write_bytes(store.read_bytes()[:100])
    for path in (damaged, tmp_path / "absent.safetensors"):
        with pytest.raises(UserError, match=rf"{path.name} cannot be read .*snakemake -R encode_texts"):
            EmbeddingsFile(path, folder, torch.float32, CPU).get([PROMPT])


def test_training_reads_the_file_without_chatglm(tiny_kolors, training_folder, tmp_path, monkeypatch):
    from kolors_story.training.data import read_metadata
    from kolors_story.training.encoding import encode_texts

    folder = KolorsFolder(tiny_kolors)
    texts = [e.caption for e in read_metadata(training_folder)] + ["验证", ""]
    encoded = encode_texts(folder, texts, tmp_path / "cache", CPU, torch.float32)  # the fallback: no file
    store = write_embeddings(folder, texts, tmp_path / "e.safetensors", torch.float32, CPU, tmp_path / "cache")
    refuse_chatglm(monkeypatch)
    stored = encode_texts(folder, texts, tmp_path / "other_cache", CPU, torch.float32, store)
    assert stored.keys() == encoded.keys() == set(texts)
    assert all(torch.equal(a, b) for t in texts for a, b in zip(encoded[t], stored[t]))
    assert not (tmp_path / "other_cache").exists()


def test_a_text_cut_at_256_tokens_is_warned_once_with_the_words_it_loses(tiny_kolors, tmp_path, caplog):
    long = "水墨画，山水，" * 60 + "结尾的小船"
    with caplog.at_level("WARNING", logger="kolors_story.models.prompt_embeddings"):
        write_embeddings(KolorsFolder(tiny_kolors), [long, "短", long], tmp_path / "e.safetensors", torch.float32, CPU)
    warnings = [r.getMessage() for r in caplog.records if "text cut" in r.getMessage()]
    assert len(warnings) == 1 and "结尾的小船'" in warnings[0] and "(306 tokens)" in warnings[0] and "text cut at ChatGLM's 256 tokens" in warnings[0]


def live_embeddings(width: int) -> int:
    """Prompt-embedding tensors ([256, width], any dtype or device) alive in this process."""
    import gc

    return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor) and tuple(o.shape) == (256, width))


def test_the_encode_job_holds_one_text_at_a_time(tiny_kolors, tmp_path, monkeypatch):
    """Each embedding leaves the encoder as it is made and goes into the file; from the cache too:
    a captioned dataset's thousands of texts never sit in memory at once (fp32 or any dtype)."""
    from kolors_story.models import prompt_embeddings as P
    from kolors_story.models.tensor_cache import TensorCache

    folder, texts = KolorsFolder(tiny_kolors), [f"文本 {i}" for i in range(8)]
    width = folder.config("text_encoder")["hidden_size"]
    alive: list[int] = []
    encode, get = P.encode_prompts, TensorCache.get

    def counting_encode(*args, **kwargs):
        alive.append(live_embeddings(width))
        return encode(*args, **kwargs)

    def counting_get(self, key):
        alive.append(live_embeddings(width))
        return get(self, key)

    monkeypatch.setattr(P, "encode_prompts", counting_encode)
    monkeypatch.setattr(TensorCache, "get", counting_get)
    encoded = write_embeddings(folder, texts, tmp_path / "e.safetensors", torch.bfloat16, CPU, tmp_path / "cache")
    assert len(alive) == 2 * len(texts) and max(alive) <= 2, alive  # 8 cache misses, 8 encodings
    alive.clear()
    cached = write_embeddings(folder, texts, tmp_path / "again.safetensors", torch.bfloat16, CPU, tmp_path / "cache")
    assert len(alive) == len(texts) and max(alive) <= 2, alive
    assert encoded.read_bytes() == cached.read_bytes()


def test_the_file_has_save_files_bytes_for_any_text(tiny_kolors, tmp_path):
    """Written text by text, the file is byte for byte what safetensors' save_file makes of the
    same tensors and metadata (quotes, control characters, non-ASCII in the texts)."""
    from safetensors.torch import load_file, save_file

    texts = ["水墨画", 'a "quoted"\nline\twith\x1f\\', "", "é\u2028\x7f"]
    store = write_embeddings(KolorsFolder(tiny_kolors), texts, tmp_path / "e.safetensors", torch.bfloat16, CPU)
    with safe_open(str(store), framework="pt") as f:
        metadata = f.metadata()
    save_file(load_file(store), tmp_path / "save_file.safetensors", metadata=metadata)
    assert store.read_bytes() == (tmp_path / "save_file.safetensors").read_bytes()


def test_float32_cache_entries_of_older_runs_give_the_same_file(tiny_kolors, tmp_path):
    from kolors_story.models.tensor_cache import TensorCache

    folder, texts = KolorsFolder(tiny_kolors), [PROMPT, NEGATIVE, ""]
    fresh = write_embeddings(folder, texts, tmp_path / "fresh.safetensors", torch.bfloat16, CPU, tmp_path / "cache")
    source = PromptEmbeddings(folder, torch.bfloat16, CPU, tmp_path / "cache")
    for text, (embeds, pooled) in source.get(texts).items():  # float32, as the cache held them before
        source.cache.put(TensorCache.key(torch.bfloat16, text), {"embeds": embeds, "pooled": pooled})
    assert source.cache.get(TensorCache.key(torch.bfloat16, PROMPT))["embeds"].dtype == torch.float32
    again = write_embeddings(folder, texts, tmp_path / "again.safetensors", torch.bfloat16, CPU, tmp_path / "cache")
    assert fresh.read_bytes() == again.read_bytes()


def test_training_reads_embeddings_per_batch_and_holds_none(tiny_kolors, tmp_path):
    """A training process gets its captions' embeddings as it builds a batch, read from the
    memory-mapped file and cast then: it holds no float32 copy of every caption."""
    from kolors_story.training.encoding import encode_texts

    folder, texts = KolorsFolder(tiny_kolors), [f"标题 {i}" for i in range(6)]
    width = folder.config("text_encoder")["hidden_size"]
    store = write_embeddings(folder, texts, tmp_path / "e.safetensors", torch.bfloat16, CPU)
    before = live_embeddings(width)
    found = encode_texts(folder, texts, tmp_path / "cache", CPU, torch.bfloat16, store)
    assert live_embeddings(width) == before and len(found) == len(texts)
    embeds, pooled = found[texts[0]]
    assert embeds.dtype == pooled.dtype == torch.float32 and embeds.shape == (256, width)
    with safe_open(str(store), framework="pt") as f:
        assert torch.equal(embeds, f.get_tensor(f"{text_name(texts[0])}.embeds").float())
