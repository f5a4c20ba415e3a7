"""The name of a text in the encode_texts job's files: a digest (texts hold any characters).

Light on purpose (no torch): the workflow names each text's marker file with it when the
Snakefile is parsed, and prompt_embeddings names the text's tensors with it.
"""

from __future__ import annotations

import hashlib


def text_name(text: str) -> str:
    """32 hex digits of the text's SHA-256 (UTF-8)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]
