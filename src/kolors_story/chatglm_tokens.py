"""ChatGLM's 256-token limit, counted with the real Kolors tokenizer: the config (scene, negative
and validation prompts, the caption template), the training folder (each caption) and the encode
job (what a cut drops) all check a text the same way. Kept free of torch: the Snakefile calls it
when the workflow is parsed.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

from kolors_story.errors import UserError

MAX_TOKENS = 256  # KolorsPipeline's max_sequence_length; longer texts are cut by the tokenizer
PREFIX_TOKENS = 2  # ChatGLM prepends [gMASK] and sop


def tokenizer_model() -> Path:
    """The real Kolors ChatGLM sentencepiece model shipped in the diffsynth 1.1.9 wheel (found
    without importing diffsynth, which would pull in torch)."""
    spec = importlib.util.find_spec("diffsynth")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the Kolors tokenizer comes with diffsynth==1.1.9; install requirements.txt")
    path = Path(spec.submodule_search_locations[0]) / "tokenizer_configs/kolors/tokenizer/tokenizer.model"
    if not path.is_file():
        raise UserError(f"Kolors tokenizer not found at {path}; install diffsynth==1.1.9")
    return path


@functools.cache
def _sentencepiece(model_file: Path | None = None):
    """The sentencepiece model: a Kolors folder's tokenizer/tokenizer.model when given (the GPU host
    has no diffsynth wheel), else the one shipped with diffsynth."""
    import sentencepiece

    return sentencepiece.SentencePieceProcessor(model_file=str(model_file or tokenizer_model()))


def count_tokens(text: str, model_file: Path | None = None) -> int:
    """Tokens ChatGLM sees for this text (equal to ChatGLMTokenizer's input_ids length)."""
    return len(_sentencepiece(model_file).encode(text)) + PREFIX_TOKENS


def dropped_text(text: str, model_file: Path | None = None) -> str | None:
    """The end of `text` that ChatGLM's 256 tokens cut off, or None when it fits."""
    ids = _sentencepiece(model_file).encode(text)
    keep = MAX_TOKENS - PREFIX_TOKENS
    return _sentencepiece(model_file).decode(ids[keep:]) if len(ids) > keep else None


def over_limit(text: str, what: str) -> str | None:
    """`what: N tokens, more than ChatGLM's 256; ...` for a text that does not fit, else None."""
    n = count_tokens(text)
    if n <= MAX_TOKENS:
        return None
    return f"{what}: {n} tokens, more than ChatGLM's {MAX_TOKENS}; the end would be cut off"


def fitting_text(text: str, model_file: Path | None = None) -> str:
    """`text` cut to what ChatGLM's 256 tokens keep (`text` itself when it fits)."""
    ids = _sentencepiece(model_file).encode(text)
    keep = MAX_TOKENS - PREFIX_TOKENS
    return _sentencepiece(model_file).decode(ids[:keep]) if len(ids) > keep else text
