"""ChatGLM prompt embeddings, exactly as KolorsPipeline.encode_prompt computes them, cached on disk.

In the workflow one job per Kolors model and text-encoder precision (rule encode_texts,
`models.text_encoder_precision`) loads ChatGLM once and writes every text the run needs (training
captions, validation prompts, scene and anchor prompts and negatives of every variant) into one
embeddings file (`write_embeddings`), in the encoder's own dtype. Training, scene and anchor jobs
read it (`EmbeddingsFile`), cast at use, and never load ChatGLM. Encoding goes through a
content-keyed cache per text encoder (its files' fingerprint) and dtype, so editing one prompt
encodes one text. Without a file (tests, the GPU check, `python -m kolors_story.training`)
`PromptEmbeddings` encodes a text missing from the cache on the spot: ChatGLM is loaded, used and
released before the caller loads the UNet.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from kolors_story.errors import UserError
from kolors_story.models.kolors_folder import KolorsFolder
from kolors_story.chatglm_tokens import MAX_TOKENS, count_tokens, dropped_text
from kolors_story.models.tensor_cache import TensorCache
from kolors_story.models.text_names import text_name

log = logging.getLogger(__name__)

MAX_SEQUENCE_LENGTH = 256  # Kolors' ChatGLM context for prompts
REMAKE = "Remake it: snakemake -R encode_texts (add your --configfile)"
METADATA_KEY = "kolors_story.embeddings"  # the embeddings file's one metadata entry (JSON)

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


def encoder_dtype(precision: str, device: torch.device) -> torch.dtype:
    """The text encoder's dtype for `models.text_encoder_precision` on `device` (as every model
    here: models.devices.runtime_dtype; bf16 on a CPU only where it is native)."""
    from kolors_story.models.devices import runtime_dtype

    return runtime_dtype(precision, device)


def log_cuts(folder: KolorsFolder, texts: list[str]) -> int:
    """Warn once per distinct text that ChatGLM's 256 tokens cut (the config refused them unless
    story.truncate_long_prompts is set), with the words that are dropped; returns how many."""
    model_file = folder.path / "tokenizer" / "tokenizer.model"
    cut = 0
    for text in sorted(set(texts)):
        if (dropped := dropped_text(text, model_file)) is not None:
            cut += 1
            log.warning("text cut at ChatGLM's %d tokens (%d tokens): %r... loses %r", MAX_TOKENS,
                        count_tokens(text, model_file), text[:40], dropped)
    return cut


def write_embeddings(folder: KolorsFolder, texts: list[str], out_file: Path, dtype: torch.dtype,
                     device: torch.device, cache_root: Path | None = None) -> Path:
    """Every distinct text's (prompt_embeds, pooled) in one safetensors file, in the encoder's dtype
    (lossless: that is what ChatGLM computed), the texts in its metadata; written atomically.
    Through the content-keyed cache: ChatGLM is loaded once, and only if some text is missing."""
    from safetensors.torch import save_file

    log_cuts(folder, texts)
    got = PromptEmbeddings(folder, dtype, device, cache_root).get(texts)
    tensors, names = {}, {}
    for text, (embeds, pooled) in got.items():
        name = text_name(text)
        names[name] = text
        tensors[f"{name}.embeds"] = embeds.to(dtype).contiguous()
        tensors[f"{name}.pooled"] = pooled.to(dtype).contiguous()
    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_file.with_name(f".{out_file.name}.{socket.gethostname()}-{os.getpid()}.tmp")
    # One metadata entry: safetensors writes several in hash order, and the file must be the same
    # bytes on every run (results are compared byte for byte).
    about = {"dtype": str(dtype).removeprefix("torch."), "texts": names}
    save_file(tensors, tmp, metadata={METADATA_KEY: json.dumps(about, ensure_ascii=False, sort_keys=True)})
    os.replace(tmp, out_file)
    log.info("embeddings: %d text(s) in %s (%s)", len(names), out_file, dtype)
    return out_file


class _ForPipeline:
    """The pipeline's four embedding arguments from `get` (float32 CPU tensors per text), cast to
    the caller's dtype and device: one code path for encoded and stored embeddings."""

    folder: KolorsFolder
    dtype: torch.dtype
    device: torch.device

    def get(self, texts: list[str]) -> dict[str, Embedding]:
        raise NotImplementedError

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


class EmbeddingsFile(_ForPipeline):
    """The encode_texts job's file, read: (prompt_embeds, pooled) per text, cast at use to `dtype`
    on `device` (the file keeps the encoder's own dtype). Never loads ChatGLM; a text that is not
    in the file is refused, naming the text and the command that remakes the file."""

    def __init__(self, path: Path, folder: KolorsFolder, dtype: torch.dtype, device: torch.device):
        self.path, self.folder, self.dtype, self.device = Path(path), folder, dtype, device

    def about(self) -> dict:
        """What write_embeddings recorded: {"dtype": "float16", "texts": {tensor name: text}}."""
        return json.loads(self._open(lambda f: f.metadata()[METADATA_KEY]))

    def texts(self) -> list[str]:
        """The texts the file holds, sorted."""
        return sorted(self.about()["texts"].values())

    def _open(self, read: Callable[[Any], Any]) -> Any:
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(self.path), framework="pt") as f:
                return read(f)
        except UserError:
            raise
        except (OSError, SafetensorError, KeyError, TypeError, ValueError) as err:  # missing, truncated, foreign
            raise UserError(f"the embeddings file {self.path} cannot be read ({err}). {REMAKE}.") from err

    def get(self, texts: list[str]) -> dict[str, Embedding]:
        """Float32 CPU (prompt_embeds, pooled) per distinct text."""
        def read(f) -> dict[str, Embedding]:
            out, names = {}, set(f.keys())
            for text in sorted(set(texts)):
                name = text_name(text)
                if f"{name}.embeds" not in names or f"{name}.pooled" not in names:
                    raise UserError(f"the text {text!r} is not in the embeddings file {self.path}: it was "
                                    f"written for other prompts. {REMAKE}.")
                out[text] = (f.get_tensor(f"{name}.embeds").float(), f.get_tensor(f"{name}.pooled").float())
            return out

        got = self._open(read)
        log.info("prompt embeddings: %d distinct, read from %s", len(got), self.path)
        return got


class PromptEmbeddings(_ForPipeline):
    """Embeddings per text for one Kolors folder, encoder dtype and device; cache_root=None keeps
    nothing on disk. Each text is encoded alone (batch of one), as the pipeline encodes a prompt.
    store: an embeddings file (write_embeddings) that holds every text asked for; then this reads
    it as EmbeddingsFile does and ChatGLM is never loaded."""

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
            return EmbeddingsFile(self.store, self.folder, self.dtype, self.device).get(texts)
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
