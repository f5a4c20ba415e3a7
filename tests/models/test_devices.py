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
