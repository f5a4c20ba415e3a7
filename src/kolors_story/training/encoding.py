"""Encoding before training: texts with ChatGLM (then released), images with the VAE, both cached."""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from kolors_story import models
from kolors_story.text_encoding import encode_prompts
from kolors_story.training.caches import TensorCache, model_fingerprint
from kolors_story.training.data import Example, crop_origin, load_pixels

log = logging.getLogger(__name__)


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def encode_texts(
    model_dir: Path, texts: list[str], cache_root: Path, device: torch.device, dtype: torch.dtype
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(prompt_embeds, pooled) per distinct text. ChatGLM is loaded only if some text is not
    cached yet, and released before returning: it is never resident beside the UNet."""
    cache = TensorCache(Path(cache_root) / "text" / model_fingerprint(Path(model_dir) / "text_encoder"))
    distinct = sorted(set(texts))
    # The dtype is part of the key: embeddings of a bf16 encoder are not those of an fp32 one.
    found = {t: cache.get(TensorCache.key(dtype, t)) for t in distinct}
    missing = [t for t, v in found.items() if v is None]
    log.info("text embeddings: %d distinct, %d cached, %d to encode", len(distinct),
             len(distinct) - len(missing), len(missing))
    if missing:
        tokenizer = models.load_tokenizer(model_dir)
        encoder = models.load_text_encoder(model_dir, dtype).to(device)
        for text in tqdm(missing, desc="encode texts", leave=False):
            embeds, pooled = encode_prompts(tokenizer, encoder, [text], device)
            found[text] = {"embeds": embeds[0].float(), "pooled": pooled[0].float()}
            cache.put(TensorCache.key(dtype, text), found[text])
        del encoder
        release(device)
    return {t: (v["embeds"].cpu(), v["pooled"].cpu()) for t, v in found.items()}


@torch.no_grad()
def encode_latents(vae, pixels: torch.Tensor, device: torch.device) -> torch.Tensor:
    dist = vae.encode(pixels.to(device, vae.dtype)).latent_dist
    return (dist.mode() * vae.config.scaling_factor).float()


def cache_latents(
    get_vae: Callable[[], Any], model_dir: Path, examples: list[Example], flips: tuple[bool, ...], cache_root: Path,
    device: torch.device, vae_dtype: torch.dtype = torch.float32,
) -> dict[tuple[int, bool], torch.Tensor]:
    """Center-cropped latents per (example, flip), encoded once per image content and size.
    `get_vae` is called only when some latent is not cached yet."""
    cache = TensorCache(Path(cache_root) / "latents" / model_fingerprint(Path(model_dir) / "vae"))
    latents = {}
    for i, ex in enumerate(tqdm(examples, desc="latents", leave=False)):
        for flip in flips:
            key = TensorCache.key(ex.digest, ex.target_size, "center", flip, vae_dtype)
            hit = cache.get(key)
            if hit is None:
                pixels = load_pixels(ex, crop_origin(ex, "center", None), flip)
                hit = {"latents": encode_latents(get_vae(), pixels[None], device)[0]}
                cache.put(key, hit)
            latents[(i, flip)] = hit["latents"].cpu()
    log.info("latents: %d cached, %d encoded", cache.hits, cache.misses)
    return latents
