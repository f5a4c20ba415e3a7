"""Precisions and devices: the one mapping from a config precision to the torch dtype a model runs
in on a given device.

On a GPU every precision is honored. On a CPU bf16 is honored only where the CPU computes bf16
natively (AVX512-BF16 or AMX, as torch's own CPU capability checks report): elsewhere bf16 matmuls
are emulated and 100-700x slower than fp32 (a 512x4096x4096 matmul on an AVX2-only EPYC: 0.18
GFLOP/s in bf16, 133 in fp32), so fp32 runs instead. fp16
on a CPU always runs as fp32 (torch's CPU fp16 kernels are slow or missing). Each decision is
logged once per process, saying which dtype runs and why.

Where KOLORS_CPU_BF16=1 forces bf16 on a CPU without native bf16 (a model whose fp32 weights do not
fit in RAM: ChatGLM's 25 GB), the text encoder keeps its weights in bf16 and computes each layer in
fp32 (`compute_in_fp32`): on an AVX2 EPYC a full-size ChatGLM text took 5 min in plain bf16 on one
thread, 70-85 s this way on two.
"""

from __future__ import annotations

import functools
import logging
import os

import torch

log = logging.getLogger(__name__)

# "1" runs bf16 on any CPU (slow without native bf16: a rehearsal's own choice), "0" never.
CPU_BF16_ENV = "KOLORS_CPU_BF16"


def torch_dtype(precision: str) -> torch.dtype:
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def cpu_has_native_bf16() -> bool:
    """True where this CPU computes bf16 natively (AVX512-BF16 or AMX tiles), as torch checks it;
    KOLORS_CPU_BF16=1/0 overrides the check."""
    forced = os.environ.get(CPU_BF16_ENV, "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    return cpu_computes_bf16()


def cpu_computes_bf16() -> bool:
    """The hardware alone: AVX512-BF16 or AMX tiles, as torch checks them (no override)."""
    cpu = torch.cpu
    checks = [getattr(cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(check() for check in checks if check is not None)


def runtime_dtype(precision: str, device: torch.device | str) -> torch.dtype:
    """The dtype a model runs in for a config precision (fp32 | bf16 | fp16) on `device`."""
    device = torch.device(device)
    wanted = torch_dtype(precision)
    if device.type != "cpu" or wanted == torch.float32:
        return wanted
    if wanted == torch.bfloat16 and cpu_has_native_bf16():
        forced = os.environ.get(CPU_BF16_ENV, "").strip() == "1"
        _say_once(precision, f"bf16 on the CPU: {CPU_BF16_ENV}=1 asks for it" if forced
                  else "bf16 on the CPU: it computes bf16 natively (AVX512-BF16 or AMX)")
        return wanted
    why = ("this CPU has no native bf16 (no AVX512-BF16 or AMX): bf16 would run 100x slower or more"
           if wanted == torch.bfloat16 else "fp16 kernels on a CPU are slow or missing")
    _say_once(precision, f"fp32 on the CPU instead of {precision}: {why}")
    return torch.float32


def emulates_bf16(dtype: torch.dtype, device: torch.device | str) -> bool:
    """bf16 on a CPU that does not compute it natively (only where KOLORS_CPU_BF16=1 forced it)."""
    return dtype == torch.bfloat16 and torch.device(device).type == "cpu" and not cpu_computes_bf16()


def compute_in_fp32(model: torch.nn.Module) -> torch.nn.Module:
    """Keep `model`'s bf16 weights and run every Linear and Embedding in fp32 (diffusers' layerwise
    casting: each layer is cast up for its forward and back after): bf16's memory at fp32's speed on
    a CPU without native bf16. The outputs are fp32."""
    from diffusers.hooks import apply_layerwise_casting

    _say_once("bf16", "bf16 weights computed in fp32 layer by layer: this CPU has no native bf16")
    apply_layerwise_casting(model, torch.bfloat16, torch.float32, skip_modules_pattern=None, skip_modules_classes=())
    return model


@functools.cache
def _say_once(precision: str, message: str) -> None:
    log.info("precision %s: %s", precision, message)


def enable_tf32(device: torch.device | str) -> None:
    """TF32 for fp32 matmuls and convolutions on a CUDA device (the upcast VAE, the scorer, fp32
    training): tensor-core speed at a 10-bit mantissa. Nothing on any other device. Through torch
    2.9+'s fp32_precision settings: once they are used, torch raises on the legacy getters
    (`matmul.allow_tf32`, `torch.get_float32_matmul_precision()`), so this code reads neither."""
    if torch.device(device).type != "cuda":
        return
    if hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        torch.backends.cuda.matmul.fp32_precision = "tf32"
        torch.backends.cudnn.conv.fp32_precision = "tf32"
    else:  # torch before 2.9 (a GPU host's own torch)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    log.info("TF32 on for fp32 matmuls and convolutions on %s", device)
