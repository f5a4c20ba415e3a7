"""models.devices: which dtype a config precision runs in, on each device, and the log saying why."""

import logging

import pytest
import torch

from kolors_story.models import devices
from kolors_story.models.prompt_embeddings import encoder_dtype
from kolors_story.render.scenes import SamplerSettings, pipeline_dtype
from kolors_story.training.loop import precision_dtypes

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.fixture(autouse=True)
def fresh_log_once():
    devices._say_once.cache_clear()
    yield
    devices._say_once.cache_clear()


@pytest.fixture
def native_bf16(monkeypatch):
    def set_native(value: bool) -> None:
        monkeypatch.setenv(devices.CPU_BF16_ENV, "1" if value else "0")
    return set_native


def test_a_gpu_honors_every_precision():
    assert [devices.runtime_dtype(p, CUDA) for p in ("fp32", "bf16", "fp16")] == [
        torch.float32, torch.bfloat16, torch.float16]


def test_bf16_on_a_cpu_with_native_bf16_and_fp32_elsewhere(native_bf16, caplog):
    caplog.set_level(logging.INFO, logger=devices.__name__)
    native_bf16(True)
    assert devices.runtime_dtype("bf16", CPU) == torch.bfloat16
    assert devices.runtime_dtype("fp16", CPU) == torch.float32  # fp16 on a CPU stays fp32
    assert "KOLORS_CPU_BF16=1 asks for it" in caplog.text and "fp16 kernels on a CPU" in caplog.text
    native_bf16(False)
    caplog.clear()
    assert devices.runtime_dtype("bf16", CPU) == torch.float32
    assert "no native bf16" in caplog.text


def test_the_fallback_is_said_once_per_process(native_bf16, caplog):
    caplog.set_level(logging.INFO, logger=devices.__name__)
    native_bf16(False)
    for _ in range(3):
        devices.runtime_dtype("bf16", CPU)
    assert caplog.text.count("no native bf16") == 1


def test_every_model_asks_the_one_mapping(native_bf16):
    """The text encoder, the scene pipeline and the trainer run the same dtype for one precision."""
    native_bf16(True)
    assert encoder_dtype("bf16", CPU) == pipeline_dtype(SamplerSettings(precision="bf16"), CPU) == torch.bfloat16
    assert precision_dtypes("bf16", CPU) == (torch.bfloat16, torch.bfloat16)
    native_bf16(False)
    assert encoder_dtype("bf16", CPU) == pipeline_dtype(SamplerSettings(precision="bf16"), CPU) == torch.float32
    # Without native bf16 the trainer keeps what it always did on a CPU (the demo's keys and bits).
    assert precision_dtypes("bf16", CPU) == precision_dtypes("fp16", CPU) == (torch.float32, torch.bfloat16)
    assert precision_dtypes("fp32", CPU) == (torch.float32, None)


def test_the_check_reads_torchs_own_cpu_capability(monkeypatch):
    monkeypatch.delenv(devices.CPU_BF16_ENV, raising=False)
    expected = any(getattr(torch.cpu, name, lambda: False)()
                   for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
    assert devices.cpu_has_native_bf16() == expected
    with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
        flags = f.read()
    if "avx512_bf16" in flags or "amx_tile" in flags:
        assert devices.cpu_has_native_bf16()


def test_forced_bf16_on_a_cpu_without_it_keeps_bf16_weights_and_computes_in_fp32(tiny_kolors, monkeypatch):
    """KOLORS_CPU_BF16=1 on a CPU without native bf16 (how ChatGLM's 25 GB of fp32 weights fit a
    24 GB machine): the encoder's weights stay bf16 and its layers compute in fp32, so its texts
    come out as an fp32 encoder of the same (bf16-rounded) weights computes them, far closer than
    plain bf16 computing; a cache entry of that mode is not one of plain bf16."""
    from kolors_story.models.kolors_folder import KolorsFolder
    from kolors_story.models.prompt_embeddings import PromptEmbeddings, encode_prompts

    monkeypatch.setattr(devices, "cpu_computes_bf16", lambda: False)
    folder = KolorsFolder(tiny_kolors)
    tokenizer = folder.load_tokenizer()
    text = ["水墨画，一个在桃花园中读书的少女"]

    def encoded(model):
        return encode_prompts(tokenizer, model, text, CPU)[0].float()

    reference = encoded(folder.load_text_encoder(torch.bfloat16).float())  # the bf16 weights, in fp32
    plain = encoded(folder.load_text_encoder(torch.bfloat16))
    assert devices.emulates_bf16(torch.bfloat16, CPU) and not devices.emulates_bf16(torch.bfloat16, CUDA)
    upcast = devices.compute_in_fp32(folder.load_text_encoder(torch.bfloat16))
    out = encode_prompts(tokenizer, upcast, text, CPU)[0]
    assert out.dtype == torch.float32
    assert {p.dtype for p in upcast.parameters()} == {torch.bfloat16}  # still bf16 after a forward
    worst = (out - reference).abs().max().item()
    assert worst < (plain - reference).abs().max().item() / 8, worst

    monkeypatch.setenv(devices.CPU_BF16_ENV, "1")
    emulated = PromptEmbeddings(folder, torch.bfloat16, CPU)._key(text[0])
    monkeypatch.setattr(devices, "cpu_computes_bf16", lambda: True)
    assert PromptEmbeddings(folder, torch.bfloat16, CPU)._key(text[0]) != emulated
