"""Shared pieces of the benchmarks: full-size Kolors model configs, model builders with random
weights (bf16, no fp32 detour) and process-memory readings.

The configs are the real ones (see ../shared/FACTS.md): the Kolors UNet from
Kwai-Kolors/Kolors-diffusers unet/config.json, the SDXL VAE, and ChatGLM3-6B at full width.
"""

from __future__ import annotations

import ctypes
import gc
import resource
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "src") not in sys.path:  # runnable without `pip install -e .`
    sys.path.insert(0, str(ROOT / "src"))

GIB = 2**30

# Kwai-Kolors/Kolors-diffusers unet/config.json (the parts that shape the network).
from kolors_story.models.kolors_configs import KOLORS_UNET_CONFIG as KOLORS_UNET  # noqa: E402,F401  (one copy)

KOLORS_UNET_PARAMS = 2_579_458_820  # FACTS.md, counted on the real config

# The SDXL VAE and ChatGLM3-6B: one copy, beside the tiny configs (num_layers is the only thing
# the benchmarks change).
from kolors_story.models.kolors_configs import CHATGLM3_6B, SDXL_VAE  # noqa: E402,F401
from kolors_story.models.random_kolors import building  # noqa: E402,F401

CHATGLM3_6B_LAYERS = 28
CHATGLM3_6B_PARAMS = 6_243_584_000  # 28 layers, embedding + output layer (checked by gpu_memory_estimate)


@dataclass(frozen=True)
class Sizes:
    """The models a benchmark builds: the real Kolors shapes, or (each benchmark's --smoke) the test
    models' tiny widths, which run the same code path in seconds; the figures then mean nothing."""

    tiny: bool
    unet: dict
    vae: dict
    chatglm: dict  # ChatGLMConfig fields (num_layers is set per build)
    text_width: int  # ChatGLM's hidden size: the UNet's text input
    clip: str  # the kolors_story.models.random_aesthetic function giving the CLIP vision config


SIZES = Sizes(False, KOLORS_UNET, SDXL_VAE, CHATGLM3_6B, CHATGLM3_6B["hidden_size"], "full_clip_vision_config")


def use_tiny_models() -> None:
    """--smoke: every builder below and every reader of SIZES gets the tiny models."""
    global SIZES
    from kolors_story.models import random_kolors as T

    SIZES = Sizes(True, T.TINY_UNET, T.TINY_VAE, T.TINY_CHATGLM, T.TEXT_WIDTH, "tiny_clip_vision_config")


def default_dtype(dtype: torch.dtype):
    """Build modules straight in `dtype` (no fp32 copy that would inflate peak memory)."""
    return building(dtype)


def build_unet(dtype: torch.dtype = torch.bfloat16, seed: int = 0):
    from kolors_story.models import random_kolors as T

    return T.build_unet(seed).to(dtype) if SIZES.tiny else T.build_full_unet(seed, dtype)


def build_vae(dtype: torch.dtype = torch.bfloat16, seed: int = 0):
    from kolors_story.models import random_kolors as T

    return T.build_vae(seed).to(dtype) if SIZES.tiny else T.build_full_vae(seed, dtype)


def chatglm_config(num_layers: int):
    from diffusers.pipelines.kolors.text_encoder import ChatGLMConfig

    return ChatGLMConfig(**{**CHATGLM3_6B, "num_layers": num_layers})


def build_text_encoder(num_layers: int, dtype: torch.dtype = torch.bfloat16, seed: int = 0):
    """Full-width ChatGLM3 with `num_layers` blocks and seeded random weights (the tiny model's
    initialisation, drawn in `dtype`); the tiny 2-layer one under use_tiny_models()."""
    from kolors_story.models import random_kolors as T

    if SIZES.tiny:
        return T.build_text_encoder(seed).to(dtype)
    return T.build_full_text_encoder(seed, dtype, num_layers=num_layers)


def param_bytes(module: torch.nn.Module, trainable: bool | None = None) -> int:
    return sum(
        p.numel() * p.element_size()
        for p in module.parameters()
        if trainable is None or p.requires_grad == trainable
    )


# ---------------------------------------------------------------- process memory (Linux)
def ru_maxrss_bytes() -> int:
    """Peak resident set size of this process since it started (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


from kolors_story.host.memory_peak import status_kib as _status_kib  # noqa: E402  (one reader of /proc)


def rss_bytes() -> int | None:
    kib = _status_kib("VmRSS")
    return None if kib is None else kib * 1024


def reset_peak_rss() -> bool:
    """Reset VmHWM (the kernel's peak-RSS mark) so the next peak_rss_bytes() covers one phase.

    Writing 5 to /proc/self/clear_refs does that (Linux >= 4.0). ru_maxrss is not reset.
    """
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int | None:
    kib = _status_kib("VmHWM")
    return None if kib is None else kib * 1024


def release_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS, so RSS shows what is live."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def gib(n: int | float | None) -> float | None:
    return None if n is None else round(n / GIB, 3)


# AVX512-BF16 or AMX: without them CPU bf16 matmuls are far slower than fp32 (measured on an
# AVX2-only AMD EPYC: 256x4096 @ 4096x4096 took 0.35 s in fp32 and 51 s in bf16). The workflow's
# own check (torch's), so a benchmark and a job agree on what this CPU runs.
from kolors_story.models.devices import cpu_has_native_bf16  # noqa: E402,F401


def pick_dtype(device: str) -> tuple[str, str]:
    if device.startswith("cuda"):
        return "bf16", "CUDA"
    if cpu_has_native_bf16():
        return "bf16", "CPU has AVX512-BF16/AMX"
    return "fp32", ("CPU lacks AVX512-BF16/AMX (capability "
                    f"{torch.backends.cpu.get_cpu_capability()}): bf16 matmuls would be ~50-150x slower")
