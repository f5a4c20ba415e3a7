"""ChatGLM prompt embeddings, exactly as KolorsPipeline.encode_prompt computes them, cached on disk.

Training captions, validation prompts, scene and anchor prompts all go through `PromptEmbeddings`:
one content-keyed cache per text encoder (its files' fingerprint) and dtype, so a caption encoded
for training is not encoded again for a scene, and a rerun with other seeds, samplers or LoRA never
loads the 6B ChatGLM. ChatGLM is loaded only when some text is missing, and released before the
caller loads the UNet: the two are never resident together.
"""

from __future__ import annotations

import gc
import logging
from pathlib import Path

import torch
from tqdm.auto import tqdm

from kolors_story.kolors_folder import KolorsFolder
from kolors_story.tensor_cache import TensorCache

log = logging.getLogger(__name__)

MAX_SEQUENCE_LENGTH = 256  # Kolors' ChatGLM context for prompts

Embedding = tuple[torch.Tensor, torch.Tensor]  # (prompt_embeds [256, W], pooled [W]), float32


@torch.no_grad()
def encode_prompts(
    tokenizer, text_encoder, prompts: list[str], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (prompt_embeds [B, 256, W], pooled [B, W]) for a list of prompts.

    Prompt embeddings are ChatGLM's hidden_states[-2]; the pooled vector is the last token of
    hidden_states[-1] (what Kolors' UNet takes as `text_embeds`).
    """
    inputs = tokenizer(
        prompts,
        padding="max_length",
        max_length=MAX_SEQUENCE_LENGTH,
        truncation=True,
        return_tensors="pt",
    ).to(device)
    output = text_encoder(
        input_ids=inputs["input_ids"],
        attention_mask=inputs["attention_mask"],
        position_ids=inputs["position_ids"],
        output_hidden_states=True,
    )
    prompt_embeds = output.hidden_states[-2].permute(1, 0, 2).clone()
    pooled = output.hidden_states[-1][-1, :, :].clone()
    return prompt_embeds, pooled


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


class PromptEmbeddings:
    """Embeddings per text for one Kolors folder, encoder dtype and device; cache_root=None keeps
    nothing on disk. Each text is encoded alone (batch of one), as the pipeline encodes a prompt."""

    def __init__(self, folder: KolorsFolder, dtype: torch.dtype, device: torch.device,
                 cache_root: Path | None = None):
        self.folder, self.dtype, self.device = folder, dtype, device
        self.cache = TensorCache(Path(cache_root) / "text" / folder.fingerprint("text_encoder")) if cache_root else None

    def _key(self, text: str) -> str:
        # The dtype is part of the key: embeddings of a bf16 encoder are not those of an fp32 one.
        return TensorCache.key(self.dtype, text)

    def get(self, texts: list[str]) -> dict[str, Embedding]:
        """Float32 CPU (prompt_embeds, pooled) per distinct text."""
        distinct = sorted(set(texts))
        found = {t: self.cache.get(self._key(t)) if self.cache else None for t in distinct}
        missing = [t for t, v in found.items() if v is None]
        log.info("prompt embeddings: %d distinct, %d cached, %d to encode", len(distinct),
                 len(distinct) - len(missing), len(missing))
        if missing:
            found.update(self._encode(missing))
        return {t: (v["embeds"].cpu(), v["pooled"].cpu()) for t, v in found.items()}

    def _encode(self, texts: list[str]) -> dict[str, dict[str, torch.Tensor]]:
        tokenizer = self.folder.load_tokenizer()
        encoder = self.folder.load_text_encoder(self.dtype).to(self.device)
        out = {}
        for text in tqdm(texts, desc="encode prompts", leave=False):
            embeds, pooled = encode_prompts(tokenizer, encoder, [text], self.device)
            out[text] = {"embeds": embeds[0].float(), "pooled": pooled[0].float()}
            if self.cache:
                self.cache.put(self._key(text), out[text])
        del encoder
        release(self.device)
        return out

    def for_pipeline(self, prompt: str, negative_prompt: str = "") -> dict[str, torch.Tensor]:
        """The four embedding arguments of KolorsPipeline.__call__ with classifier-free guidance,
        bitwise what its encode_prompt gives (an empty negative prompt: zeros where the folder's
        force_zeros_for_empty_prompt says so, else the encoding of "")."""
        zeros = not negative_prompt and self.folder.force_zeros_for_empty_prompt
        got = self.get([prompt] if zeros else [prompt, negative_prompt])
        embeds, pooled = (t[None].to(self.device, self.dtype) for t in got[prompt])
        if zeros:
            negative, negative_pooled = torch.zeros_like(embeds), torch.zeros_like(pooled)
        else:
            negative, negative_pooled = (t[None].to(self.device, self.dtype) for t in got[negative_prompt])
        return {"prompt_embeds": embeds, "negative_prompt_embeds": negative,
                "pooled_prompt_embeds": pooled, "negative_pooled_prompt_embeds": negative_pooled}
