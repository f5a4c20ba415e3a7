"""ChatGLM prompt embeddings, exactly as KolorsPipeline.encode_prompt computes them, cached on disk.

In the workflow one job per Kolors model and precision (rule encode_texts) loads ChatGLM once and
writes every text the run needs (training captions, validation prompts, scene and anchor prompts
and negatives of every variant) into one embeddings file (`write_embeddings`), in the encoder's
own dtype. Training, scene and anchor jobs read it (`PromptEmbeddings(..., store=file)`), cast at
use, and never load ChatGLM. Encoding goes through a content-keyed cache per text encoder (its
files' fingerprint) and dtype, so editing one prompt encodes one text. Without a store (tests, the
GPU check, `python -m kolors_story.training`) a text missing from the cache is encoded on the spot:
ChatGLM is loaded, used and released before the caller loads the UNet.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import os
from pathlib import Path

import torch
from tqdm.auto import tqdm

from kolors_story.errors import UserError
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


def text_name(text: str) -> str:
    """A text's tensor names in an embeddings file: a digest (texts hold any characters)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


def write_embeddings(folder: KolorsFolder, texts: list[str], out_file: Path, dtype: torch.dtype,
                     device: torch.device, cache_root: Path | None = None) -> Path:
    """Every distinct text's (prompt_embeds, pooled) in one safetensors file, in the encoder's dtype
    (lossless: that is what ChatGLM computed), the texts in its metadata; written atomically."""
    from safetensors.torch import save_file

    got = PromptEmbeddings(folder, dtype, device, cache_root).get(texts)
    tensors, names = {}, {}
    for text, (embeds, pooled) in got.items():
        name = text_name(text)
        names[name] = text
        tensors[f"{name}.embeds"] = embeds.to(dtype).contiguous()
        tensors[f"{name}.pooled"] = pooled.to(dtype).contiguous()
    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_file.with_name(f".{out_file.name}.{os.getpid()}.tmp")
    save_file(tensors, tmp, metadata={"texts": json.dumps(names, ensure_ascii=False, sort_keys=True),
                                      "dtype": str(dtype).removeprefix("torch.")})
    os.replace(tmp, out_file)
    log.info("embeddings: %d text(s) in %s (%s)", len(names), out_file, dtype)
    return out_file


def read_embeddings(store: Path, texts: list[str]) -> dict[str, Embedding]:
    """Float32 CPU (prompt_embeds, pooled) of each text from an embeddings file; a text that is
    not there is refused, naming it and the job that writes it."""
    from safetensors import safe_open

    out = {}
    with safe_open(str(store), framework="pt") as f:
        for text in sorted(set(texts)):
            name = text_name(text)
            if f"{name}.embeds" not in f.keys():
                raise UserError(f"the text {text!r} is not in the embeddings file {store}: it was written "
                                "for other prompts. Rerun its job: snakemake -R encode_texts")
            out[text] = (f.get_tensor(f"{name}.embeds").float(), f.get_tensor(f"{name}.pooled").float())
    return out


class PromptEmbeddings:
    """Embeddings per text for one Kolors folder, encoder dtype and device; cache_root=None keeps
    nothing on disk. Each text is encoded alone (batch of one), as the pipeline encodes a prompt.
    store: an embeddings file (write_embeddings) that holds every text asked for; then ChatGLM is
    never loaded."""

    def __init__(self, folder: KolorsFolder, dtype: torch.dtype, device: torch.device,
                 cache_root: Path | None = None, store: Path | None = None):
        self.folder, self.dtype, self.device, self.store = folder, dtype, device, store
        self.cache = TensorCache(Path(cache_root) / "text" / folder.fingerprint("text_encoder")) if cache_root else None

    def _key(self, text: str) -> str:
        # The dtype is part of the key: embeddings of a bf16 encoder are not those of an fp32 one.
        return TensorCache.key(self.dtype, text)

    def get(self, texts: list[str]) -> dict[str, Embedding]:
        """Float32 CPU (prompt_embeds, pooled) per distinct text."""
        if self.store is not None:
            return read_embeddings(self.store, texts)
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
        encoder = self.folder.load_text_encoder(self.dtype, self.device)
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
