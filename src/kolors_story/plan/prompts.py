"""Scene prompts: assembled from characters defined once, a style prefix and a template, and
checked against ChatGLM's 256-token context before anything runs.

Kept free of torch imports: the Snakefile calls it when the workflow is parsed.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import re
import string
from collections.abc import Iterator
from pathlib import Path

from kolors_story.errors import UserError

log = logging.getLogger(__name__)

MAX_TOKENS = 256  # KolorsPipeline's max_sequence_length; longer prompts are cut by the tokenizer
PREFIX_TOKENS = 2  # ChatGLM prepends [gMASK] and sop
DEFAULT_TEMPLATE = "{style}，{characters}，{action}，{setting}"
TEMPLATE_FIELDS = ("style", "characters", "action", "setting")


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
def _sentencepiece():
    import sentencepiece

    return sentencepiece.SentencePieceProcessor(model_file=str(tokenizer_model()))


def count_tokens(text: str) -> int:
    """Tokens ChatGLM sees for this prompt (equal to ChatGLMTokenizer's input_ids length)."""
    return len(_sentencepiece().encode(text)) + PREFIX_TOKENS


def _join(parts: list[str]) -> str:
    return "，".join(p.strip() for p in parts if p and p.strip())


def assemble_prompt(scene: dict, story: dict) -> str:
    """A scene's prompt: its own `prompt` if given, else the story template filled with the style,
    the descriptions of the characters it names, its action and setting."""
    if scene.get("prompt"):
        return scene["prompt"]
    known = story.get("characters", {})
    unknown = [name for name in scene.get("characters", []) if name not in known]
    if unknown:
        raise UserError(
            f"config key 'story.scenes' (scene {scene['id']}): unknown character(s) {unknown}; "
            f"define them under story.characters (defined: {sorted(known) or 'none'})."
        )
    fields = {
        "style": story.get("style", ""),
        "characters": _join([known[name] for name in scene.get("characters", [])]),
        "action": scene.get("action", ""),
        "setting": scene.get("setting", ""),
    }
    template = story.get("prompt_template", DEFAULT_TEMPLATE)
    check_prompt_template(template)
    return _join(re.split(r"[，,]", template.format(**fields)))  # drop the separators of empty fields


def check_prompt_template(template: str) -> None:
    """Refuse a template that str.format could not fill from the four fields: an unknown name,
    a positional `{}`, an attribute or index (`{style.x}`), or an unbalanced brace."""
    key, allowed = "config key 'story.prompt_template'", ", ".join(f"{{{f}}}" for f in TEMPLATE_FIELDS)
    try:
        names = list(_field_names(template))
    except ValueError as exc:
        raise UserError(f"{key}: {template!r} is not a valid template ({exc}); use {allowed} and "
                        "write a literal brace as {{ or }}.") from None
    unknown = sorted({repr(n) for n in names if n not in TEMPLATE_FIELDS})
    if unknown:
        raise UserError(f"{key}: unknown field(s) {', '.join(unknown)} in {template!r}; the fields "
                        f"are {allowed} (write a literal brace as {{{{ or }}}}).")


def _field_names(template: str) -> Iterator[str]:
    """Every field str.format looks up, nested ones in a format spec (`{style:{action}}`) too."""
    for _, name, spec, _ in string.Formatter().parse(template):
        if name is not None:
            yield name
            yield from _field_names(spec or "")


def check_length(scene_id: str, prompt: str, truncate: bool) -> None:
    n = count_tokens(prompt)
    if n <= MAX_TOKENS:
        return
    message = (f"scene {scene_id}: prompt has {n} tokens, more than ChatGLM's {MAX_TOKENS}; "
               "the end would be cut off.")
    if not truncate:
        raise UserError(f"config key 'story.scenes': {message} Shorten it, or set "
                        "story.truncate_long_prompts: true to accept the cut.")
    log.warning("%s (story.truncate_long_prompts is true)", message)
