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

import json
import logging
import math
import os
import socket
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from kolors_story.errors import UserError
from kolors_story.files import SAFETENSORS_METADATA, safetensors_header_bytes
from kolors_story.models.devices import compute_in_fp32, emulates_bf16, runtime_dtype
from kolors_story.models.kolors_folder import KolorsFolder
from kolors_story.chatglm_tokens import MAX_TOKENS, count_tokens, dropped_text
from kolors_story.models.tensor_cache import TensorCache
from kolors_story.models.text_names import text_name

log = logging.getLogger(__name__)

MAX_SEQUENCE_LENGTH = 256  # Kolors' ChatGLM context for prompts
REMAKE = "Remake it: snakemake -R encode_texts (add your --configfile)"
METADATA_KEY = "kolors_story.embeddings"  # the embeddings file's one metadata entry (JSON)

Embedding = tuple[torch.Tensor, torch.Tensor]  # (prompt_embeds [256, W], pooled [W])


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


def encoder_dtype(precision: str, device: torch.device) -> torch.dtype:
    """The text encoder's dtype for `models.text_encoder_precision` on `device` (as every model
    here: devices.runtime_dtype; bf16 on a CPU only where it is native or forced)."""
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
    Through the content-keyed cache: ChatGLM is loaded once, and only if some text is missing.
    Each text goes into the file as it comes from the cache or the encoder: the job holds one
    text's tensors at a time, not a copy of every text (a captioned dataset has thousands)."""
    log_cuts(folder, texts)
    names = {text_name(text): text for text in set(texts)}
    order = sorted(names)  # the file's order: one dtype, so by tensor name, as save_file lays it out
    width = int(folder.config("text_encoder")["hidden_size"])
    layout = [(f"{name}.{part}", shape) for name in order
              for part, shape in (("embeds", (MAX_SEQUENCE_LENGTH, width)), ("pooled", (width,)))]
    made = PromptEmbeddings(folder, dtype, device, cache_root).native([names[name] for name in order])
    # One metadata entry: safetensors writes several in hash order, and the file must be the same
    # bytes on every run (results are compared byte for byte).
    about = {"dtype": str(dtype).removeprefix("torch."), "texts": names}
    metadata = {METADATA_KEY: json.dumps(about, ensure_ascii=False, sort_keys=True)}
    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_file.with_name(f".{out_file.name}.{socket.gethostname()}-{os.getpid()}.tmp")
    try:
        _write_safetensors(tmp, dtype, layout, (t for pair in made for t in pair), metadata)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, out_file)
    log.info("embeddings: %d text(s) in %s (%s)", len(names), out_file, dtype)
    return out_file


_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


def _write_safetensors(path: Path, dtype: torch.dtype, layout: list[tuple[str, tuple[int, ...]]],
                       tensors: Iterable[torch.Tensor], metadata: dict[str, str]) -> None:
    """A safetensors file of CPU tensors of one dtype, written as they come, one held at a time.
    `layout` names each tensor and its shape in name order: for one dtype that is the order
    safetensors' save_file lays out, and the header is its compact JSON padded to 8 bytes, so the
    bytes are save_file's (tests compare them)."""
    if [name for name, _ in layout] != sorted(name for name, _ in layout):
        raise ValueError("the layout must be in name order")
    header: dict[str, Any] = {SAFETENSORS_METADATA: metadata}
    offset, itemsize = 0, torch.empty((), dtype=dtype).element_size()
    for name, shape in layout:
        end = offset + math.prod(shape) * itemsize
        header[name] = {"dtype": _SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, end]}
        offset = end
    with open(path, "wb") as f:
        f.write(safetensors_header_bytes(header))
        for (name, shape), tensor in zip(layout, tensors, strict=True):
            if tuple(tensor.shape) != shape or tensor.dtype != dtype:
                raise ValueError(f"{name}: {tuple(tensor.shape)} {tensor.dtype}, the layout says {shape} {dtype}")
            f.write(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())


class Embeddings(Mapping[str, Embedding]):
    """(prompt_embeds, pooled) per text, float32 CPU tensors made at each lookup from the stored
    ones (the encoder's dtype, memory-mapped from the file or held): a holder keeps the texts it
    uses (a training batch's captions), never a float32 copy of every text."""

    def __init__(self, texts: Iterable[str], read: Callable[[str], Embedding]):
        self._texts, self._read = sorted(set(texts)), read
        self._known = set(self._texts)

    def __getitem__(self, text: str) -> Embedding:
        if text not in self._known:
            raise KeyError(text)
        embeds, pooled = self._read(text)
        return embeds.float(), pooled.float()

    def __iter__(self) -> Iterator[str]:
        return iter(self._texts)

    def __len__(self) -> int:
        return len(self._texts)


class _ForPipeline:
    """The pipeline's four embedding arguments from `lookup` (float32 CPU tensors per text), cast
    to the caller's dtype and device: one code path for encoded and stored embeddings."""

    folder: KolorsFolder
    dtype: torch.dtype
    device: torch.device

    def lookup(self, texts: list[str]) -> Embeddings:
        raise NotImplementedError

    def get(self, texts: list[str]) -> dict[str, Embedding]:
        """Float32 CPU (prompt_embeds, pooled) per distinct text, all at once (a pipeline's prompts)."""
        found = self.lookup(texts)
        return {text: found[text] for text in found}

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
        return json.loads(self._read(lambda f: f.metadata()[METADATA_KEY]))

    def texts(self) -> list[str]:
        """The texts the file holds, sorted."""
        return sorted(self.about()["texts"].values())

    def _read(self, read: Callable[[Any], Any]) -> Any:
        """`read(handle)` of the file opened memory-mapped (safe_open); the handle lives as long as
        what `read` returns keeps it."""
        from safetensors import SafetensorError, safe_open

        try:
            return read(safe_open(str(self.path), framework="pt"))
        except UserError:
            raise
        except (OSError, SafetensorError, KeyError, TypeError, ValueError) as err:  # missing, truncated, foreign
            raise UserError(f"the embeddings file {self.path} cannot be read ({err}). {REMAKE}.") from err

    def lookup(self, texts: list[str]) -> Embeddings:
        """Every text checked present at once; each lookup then reads that text's tensors from the
        memory-mapped file (a training process holds one batch's, whatever the file holds)."""
        def open_lookup(f) -> Embeddings:
            names = set(f.keys())
            for text in sorted(set(texts)):
                name = text_name(text)
                if f"{name}.embeds" not in names or f"{name}.pooled" not in names:
                    raise UserError(f"the text {text!r} is not in the embeddings file {self.path}: it was "
                                    f"written for other prompts. {REMAKE}.")
            return Embeddings(texts, lambda text: (f.get_tensor(f"{text_name(text)}.embeds"),
                                                   f.get_tensor(f"{text_name(text)}.pooled")))

        found = self._read(open_lookup)
        log.info("prompt embeddings: %d distinct, read from %s", len(found), self.path)
        return found


class _Encoder:
    """ChatGLM on `device`, loaded at the first text to encode; each embedding leaves the device as
    it is made, in the encoder's dtype, so the device holds the model and one text."""

    def __init__(self, folder: KolorsFolder, dtype: torch.dtype, device: torch.device):
        self.folder, self.dtype, self.device = folder, dtype, device
        self.tokenizer = self.model = None

    def encode(self, text: str) -> dict[str, torch.Tensor]:
        if self.model is None:
            self.tokenizer = self.folder.load_tokenizer()
            self.model = self.folder.load_text_encoder(self.dtype, self.device)
            if emulates_bf16(self.dtype, self.device):
                compute_in_fp32(self.model)
        embeds, pooled = encode_prompts(self.tokenizer, self.model, [text], self.device)
        return {"embeds": embeds[0].cpu(), "pooled": pooled[0].cpu()}

    def close(self) -> None:
        if self.model is not None:
            self.model = None
            from diffusers.training_utils import free_memory  # imported here: a second of imports

            free_memory()  # gc, then the accelerator's cache: the UNet loads next


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
        # The dtype is part of the key: embeddings of a bf16 encoder are not those of an fp32 one,
        # nor those of bf16 weights computed in fp32 (devices.compute_in_fp32).
        if emulates_bf16(self.dtype, self.device):
            return TensorCache.key(self.dtype, "fp32 compute", text)
        return TensorCache.key(self.dtype, text)

    def lookup(self, texts: list[str]) -> Embeddings:
        """Every distinct text, encoder-dtype tensors held on the CPU (a file, with `store`)."""
        if self.store is not None:
            return EmbeddingsFile(self.store, self.folder, self.dtype, self.device).lookup(texts)
        distinct = sorted(set(texts))
        held = dict(zip(distinct, self.native(distinct)))
        return Embeddings(distinct, held.__getitem__)

    def native(self, texts: list[str]) -> Iterator[Embedding]:
        """Each of the distinct `texts`' (prompt_embeds, pooled), on the CPU in the encoder's dtype,
        in their order: from the cache, or encoded as it comes (ChatGLM loaded at the first text the
        cache lacks, once, and released after the last). A cache entry may hold float32 (the same
        values: the key has the dtype)."""
        cached = sum(1 for text in texts if self.cache and self.cache.has(self._key(text)))
        log.info("prompt embeddings: %d distinct, %d cached, %d to encode", len(texts), cached, len(texts) - cached)
        encoder = _Encoder(self.folder, self.dtype, self.device)
        try:
            for text in tqdm(texts, desc="prompt embeddings", leave=False):
                found = self.cache.get(self._key(text)) if self.cache else None
                if found is None:
                    found = encoder.encode(text)
                    if self.cache:
                        self.cache.put(self._key(text), found)
                yield found["embeds"].to(self.dtype), found["pooled"].to(self.dtype)
        finally:
            encoder.close()
