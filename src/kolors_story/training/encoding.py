"""Encoding before training: texts with ChatGLM (then released), images with the VAE, both cached."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from kolors_story.models.kolors_folder import KolorsFolder
from kolors_story.models.prompt_embeddings import Embeddings, EmbeddingsFile, PromptEmbeddings
from kolors_story.models.tensor_cache import TensorCache
from kolors_story.training.data import Example, crop_origin, load_pixels

log = logging.getLogger(__name__)


def encode_texts(
    folder: KolorsFolder, texts: list[str], cache_root: Path, device: torch.device, dtype: torch.dtype,
    store: Path | None = None,
) -> Embeddings:
    """Float32 CPU (prompt_embeds, pooled) per distinct text, made at each lookup: from the
    encode_texts job's file when given (memory-mapped, read per batch; ChatGLM never loaded; the
    file's dtype is models.text_encoder_precision's, the caller casts to its own), else encoded
    in `dtype` through the prompt-embedding cache and held in that dtype, ChatGLM loaded only if
    some text is not cached yet and released before returning: never beside the UNet."""
    if store is not None:
        return EmbeddingsFile(store, folder, dtype, device).lookup(texts)
    return PromptEmbeddings(folder, dtype, device, cache_root).lookup(texts)


@torch.no_grad()
def encode_latents(vae, pixels: torch.Tensor, device: torch.device) -> torch.Tensor:
    dist = vae.encode(pixels.to(device, vae.dtype)).latent_dist
    return (dist.mode() * vae.config.scaling_factor).float()


def cache_latents(
    get_vae: Callable[[], Any], folder: KolorsFolder, examples: list[Example], flips: tuple[bool, ...], cache_root: Path,
    device: torch.device, vae_dtype: torch.dtype = torch.float32,
) -> dict[tuple[int, bool], torch.Tensor]:
    """Center-cropped latents per (example, flip), encoded once per image content and size.
    `get_vae` is called only when some latent is not cached yet."""
    cache = TensorCache(Path(cache_root) / "latents" / folder.fingerprint("vae"))
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
