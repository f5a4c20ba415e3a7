"""Scene prompts: assembled from characters defined once, a style prefix and a template, and
checked against ChatGLM's 256-token context before anything runs.

Kept free of torch imports: the Snakefile calls it when the workflow is parsed. Every other
text that reaches ChatGLM (negative and validation prompts, the caption template) is checked by
check_text_lengths.
"""

from __future__ import annotations

import logging
import re
import string
from collections.abc import Iterator

from kolors_story.chatglm_tokens import MAX_TOKENS, count_tokens, dropped_text, over_limit, tokenizer_model  # noqa: F401 (tests' names)
from kolors_story.errors import UserError

log = logging.getLogger(__name__)

DEFAULT_TEMPLATE = "{style}，{characters}，{action}，{setting}"
TEMPLATE_FIELDS = ("style", "characters", "action", "setting")


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


def texts_for_chatglm(config: dict) -> list[tuple[str, str]]:
    """(where, text) for every text of a config that reaches ChatGLM, `where` naming its config
    key: prompts assembled, the caption template filled with an empty caption (its own words
    alone must leave room for the image's caption)."""
    from kolors_story.data.text_files import apply_template  # here: the data stage pulls in Pillow

    story, validation = config["story"], config["train"]["validation"]
    texts = [("config key 'story.negative_prompt'", story["negative_prompt"])]
    for i, scene in enumerate(story["scenes"]):
        field = "prompt" if scene.get("prompt") else "prompt_template"
        texts.append((f"config key 'story.scenes[{i}].{field}' (scene {scene['id']})", assemble_prompt(scene, story)))
        texts += [(f"config key 'story.scenes[{i}].alternatives[{k}]' (scene {scene['id']})", text)
                  for k, text in enumerate(scene.get("alternatives", []))]
        if "negative_prompt" in scene:
            texts.append((f"config key 'story.scenes[{i}].negative_prompt'", scene["negative_prompt"]))
    for i, item in enumerate(validation["prompts"]):
        texts += [(f"config key 'train.validation.prompts[{i}].prompt'", item["prompt"]),
                  (f"config key 'train.validation.prompts[{i}].negative_prompt'", item["negative_prompt"])]
    prefix = apply_template(config["dataset"]["caption_template"], "")
    texts.append(("config key 'dataset.caption_template' (its own words, with an empty caption)", prefix))
    return texts


def cut_texts(config: dict) -> list[dict[str, str]]:
    """The texts ChatGLM's 256 tokens cut (only possible with story.truncate_long_prompts), each
    with its key and the words it loses: the run's manifest records them."""
    return [{"where": where, "dropped": dropped} for where, text in texts_for_chatglm(config)
            if (dropped := dropped_text(text))]


def check_text_lengths(config: dict) -> list[str]:
    """Every text over ChatGLM's 256 tokens, named by its key with its count. With
    story.truncate_long_prompts the cut is accepted here; the encode job logs what it drops."""
    if config["story"]["truncate_long_prompts"]:
        return []
    fix = ("shorten it, or set story.truncate_long_prompts: true to accept the cut (the encode job's "
           "log then shows the dropped words)")
    return [f"{problem}; {fix}." for where, text in texts_for_chatglm(config) if (problem := over_limit(text, where))]
