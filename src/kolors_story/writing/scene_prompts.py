"""The story outline (`story.outline`: one line a scene) turned into one checked prompt per scene by
a language model, the step a challenge participant otherwise does by hand in a chat window.

The editable requirements (`story.prompt_rules`) go first; the reply format is this module's and
is checked: JSON, one entry per outline id, a non-empty prompt within ChatGLM's 256 tokens that
holds, word for word, the description of each character the scene lists (so the character looks
the same in every panel). A reply that fails is sent back with its problems, a bounded number of
times. Every request and raw reply is recorded; replies come from the cache when the same request
was asked before. A scene with its own `prompt` keeps it and is not sent.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kolors_story.chatglm_tokens import MAX_TOKENS, count_tokens
from kolors_story.writing.llm_client import ChatSettings, LLMError, chat
from kolors_story.writing.reply_cache import ReplyCache

SHOW_RAW = 2000  # characters of a failed raw reply shown in the error


def reply_format(variants: int = 1) -> str:
    """The reply's form, added after story.prompt_rules: one prompt a scene, or `variants` distinct
    ones (prompt_writer.variants) for the scene's best-of-N to choose from."""
    if variants == 1:
        shape, each = '"prompt": "<the prompt>"', "Each prompt"
    else:
        shape = f'"prompts": [{", ".join(f"<prompt {k}>" for k in range(1, variants + 1))}]'
        each = f"Give {variants} different prompts for each scene (other wording, framing or details). Each prompt"
    return (f'Reply with JSON only, in this form: {{"scenes": [{{"id": "<scene id>", {shape}, '
            '"negative_prompt": "<what to avoid, may be empty>"}]}, one entry for each scene id below, in order. '
            f"{each} must contain, word for word, the description of every character its scene lists, "
            f"and must stay within {MAX_TOKENS} tokens (about 150 Chinese characters).")



@dataclass(frozen=True)
class ScenePrompt:
    id: str
    prompt: str
    negative_prompt: str = ""
    alternatives: tuple[str, ...] = ()  # prompt_writer.variants > 1: the other prompts, for best-of-N


@dataclass
class Transcript:
    """Every request and raw reply of one writing, in order (results/<run>/prompt_writer.jsonl)."""
    turns: list[dict[str, Any]] = field(default_factory=list)

    def add(self, request: dict[str, Any], reply: str, cached: bool, problems: list[str]) -> None:
        self.turns.append({"request": request, "reply": reply, "cached": cached, "problems": problems})

    def jsonl(self) -> str:
        return "".join(json.dumps(t, ensure_ascii=False, sort_keys=True) + "\n" for t in self.turns)


def outline_message(story: dict, todo: list[dict]) -> str:
    """The user turn: the story, its characters and the scenes to write, by id."""
    lines = [f"故事：{story['title']}"] if story.get("title") else []
    if story.get("style"):
        lines.append(f"风格：{story['style']}")
    if story.get("characters"):
        lines.append("人物：")
        lines += [f"- {name}：{text}" for name, text in story["characters"].items()]
    lines.append("场景：")
    for i, item in enumerate(todo, 1):
        who = f"（人物：{'、'.join(item['characters'])}）" if item.get("characters") else ""
        lines.append(f"{i}. id {item['id']}：{item['description']}{who}")
    return "\n".join(lines)


def first_messages(story: dict, rules: str, todo: list[dict], variants: int = 1) -> list[dict[str, str]]:
    return [{"role": "system", "content": f"{rules.strip()}\n\n{reply_format(variants)}"},
            {"role": "user", "content": outline_message(story, todo)}]


def _json_object(raw: str) -> Any:
    text = raw.strip()
    fenced = re.fullmatch(r"```(?:json)?\s*(.*?)\s*```", text, flags=re.S)  # models often fence it
    return json.loads(fenced.group(1) if fenced else text)


def check_reply(raw: str, story: dict, todo: list[dict], variants: int = 1) -> tuple[list[ScenePrompt], list[str]]:
    """The reply as scene prompts, and its problems (none: every scene is fine)."""
    key = "prompt" if variants == 1 else "prompts"
    try:
        data = _json_object(raw)
        entries = data["scenes"]
        if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
            raise TypeError
    except (ValueError, KeyError, TypeError):
        return [], [f'the reply is not JSON of the form {{"scenes": [{{"id": ..., "{key}": ..., "negative_prompt": ...}}]}}']
    by_id: dict[str, dict] = {}
    problems = []
    for entry in entries:
        sid = str(entry.get("id", ""))
        if sid in by_id:
            problems.append(f"scene {sid}: given twice")
        by_id[sid] = entry
    wanted = [item["id"] for item in todo]
    problems += [f"scene {sid}: not in the outline (its ids: {', '.join(wanted)})" for sid in by_id if sid not in wanted]
    prompts = []
    for item in todo:
        entry = by_id.get(item["id"])
        if entry is None:
            problems.append(f"scene {item['id']}: missing")
            continue
        scene, shape = _entry_prompts(entry, item["id"], variants)
        problems += shape + scene_problems(scene, item, story)
        prompts.append(scene)
    return prompts, problems


def _entry_prompts(entry: dict, scene_id: str, variants: int) -> tuple[ScenePrompt, list[str]]:
    """One reply entry as a ScenePrompt, and what is wrong with the number of its prompts."""
    negative = str(entry.get("negative_prompt") or "").strip()
    if variants == 1:
        return ScenePrompt(scene_id, str(entry.get("prompt") or "").strip(), negative), []
    given = entry.get("prompts")
    texts = [str(t).strip() for t in given] if isinstance(given, list) else []
    distinct = list(dict.fromkeys(t for t in texts if t))
    problems = [] if len(distinct) == variants else [
        f"scene {scene_id}: {len(distinct)} distinct non-empty prompt(s) in \"prompts\", {variants} asked"]
    first = distinct[0] if distinct else ""
    return ScenePrompt(scene_id, first, negative, tuple(distinct[1:variants])), problems


def scene_problems(scene: ScenePrompt, item: dict, story: dict) -> list[str]:
    if not scene.prompt:
        return [f"scene {scene.id}: the prompt is empty"]
    problems = []
    prompts = [(scene.prompt, "prompt")] + [(t, f"prompt {k}") for k, t in enumerate(scene.alternatives, 2)]
    for text, what in (*prompts, (scene.negative_prompt, "negative_prompt")):
        if text and (n := count_tokens(text)) > MAX_TOKENS:
            problems.append(f"scene {scene.id}: the {what} has {n} tokens, more than ChatGLM's {MAX_TOKENS}")
    for name in item.get("characters", []):
        described = story.get("characters", {}).get(name, name)
        for text, what in prompts:
            if described not in text:
                problems.append(f"scene {scene.id}: the {what} lacks character {name}'s description, word for "
                                f"word: {described}")
    return problems


def feedback(raw: str, problems: list[str]) -> list[dict[str, str]]:
    """The turns that send a failed reply back with its problems."""
    listed = "\n".join(f"- {p}" for p in problems)
    return [{"role": "assistant", "content": raw},
            {"role": "user", "content": f"This reply has problems:\n{listed}\nReply again with the whole JSON, fixed."}]


def scenes_to_write(story: dict) -> list[dict]:
    """The outline's scenes the model writes: those without a prompt of their own."""
    return [item for item in story["outline"] if not item.get("prompt")]


def write_prompts(story: dict, rules: str, settings: ChatSettings, cache: ReplyCache,
                  transcript: Transcript | None = None,
                  ask: Callable[[list[dict[str, str]], ChatSettings], str] = chat) -> list[ScenePrompt]:
    """One prompt per outline scene without its own `prompt`, checked; LLMError naming each
    failing scene and showing the last raw reply after settings.attempts replies that failed."""
    todo = scenes_to_write(story)
    transcript = transcript if transcript is not None else Transcript()
    if not todo:
        return []
    messages = first_messages(story, rules, todo, settings.variants)
    exchange: list[tuple[dict[str, Any], str]] = []
    for _ in range(settings.attempts):
        request = {"settings": settings.identity(), "messages": messages}
        reply = cache.get(request)
        cached = reply is not None
        if reply is None:
            reply = ask(messages, settings)
        prompts, problems = check_reply(reply, story, todo, settings.variants)
        transcript.add(request, reply, cached, problems)
        exchange.append((request, reply))
        if not problems:  # the whole exchange is kept once it succeeds; after a failure a rerun asks anew
            for asked, answered in exchange:
                cache.put(asked, answered)
            return prompts
        messages = messages + feedback(reply, problems)
    shown = reply if len(reply) <= SHOW_RAW else reply[:SHOW_RAW] + f"... ({len(reply)} characters)"
    raise LLMError(f"prompt_writer: {settings.attempts} replies of {settings.model} failed their checks; the last one's "
                   f"problems: {'; '.join(problems)}. Its raw reply:\n{shown}\n(every request and reply is in "
                   "the transcript; edit story.prompt_rules or give those scenes a prompt of their own)")


def scenes_file_entries(story: dict, written: list[ScenePrompt]) -> list[dict[str, Any]]:
    """story.outline with its prompts: entries that can be pasted into story.scenes as they are."""
    by_id = {p.id: p for p in written}
    entries = []
    for item in story["outline"]:
        entry: dict[str, Any] = {"id": item["id"]}
        written_here = by_id.get(item["id"])
        entry["prompt"] = item.get("prompt") or written_here.prompt  # a prompt written by hand wins
        if not item.get("prompt") and written_here.alternatives:
            entry["alternatives"] = list(written_here.alternatives)
        negative = item.get("negative_prompt") or (written_here.negative_prompt if written_here else "")
        if negative:
            entry["negative_prompt"] = negative
        entry["caption"] = item.get("caption", item["description"])
        for key in ("characters", "seed", "width", "height"):
            if item.get(key) not in (None, []):
                entry[key] = item[key]
        entries.append(entry)
    return entries


def prompts_file_text(settings: ChatSettings, entries: list[dict[str, Any]]) -> str:
    """The prompts file a person reads, edits and pastes back: its `scenes` are story.scenes entries."""
    where = "run locally through transformers" if settings.backend == "local" else settings.base_url
    header = (f"# Scene prompts written by {settings.model} ({where}) from story.outline.\n"
              "# Read and edit them; to render your edits, paste `scenes` under story.scenes of your config and\n"
              "# delete story.outline. Every request and raw reply: prompt_writer.jsonl beside this file.\n")
    return header + yaml.safe_dump({"scenes": entries}, allow_unicode=True, sort_keys=False, width=120)


def write_scenes_file(story: dict, rules: str, settings: ChatSettings, cache: ReplyCache, out: Path,
                      transcript_out: Path, ask: Callable[[list[dict[str, str]], ChatSettings], str] = chat) -> int:
    """Write the outline's scenes to `out` (prompts_file_text) and every request and raw reply to
    `transcript_out`, also when the writer fails (its raw replies are what the user needs to see).
    Returns how many replies were asked of the model (not found in the cache)."""
    transcript = Transcript()
    if settings.backend == "local" and ask is chat:
        from kolors_story.writing.local_model import LocalWriter  # here: torch and transformers

        ask = LocalWriter(settings, [item["id"] for item in scenes_to_write(story)]).ask
    try:
        written = write_prompts(story, rules, settings, cache, transcript, ask)
    finally:  # also when the writer fails (empty when every scene had its own prompt)
        transcript_out.parent.mkdir(parents=True, exist_ok=True)
        transcript_out.write_text(transcript.jsonl(), encoding="utf-8")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(prompts_file_text(settings, scenes_file_entries(story, written)), encoding="utf-8")
    asked = sum(not turn["cached"] for turn in transcript.turns)
    logging.getLogger(__name__).info(
        "%d scene prompt(s) written by %s: %d reply(ies), %d asked, %d from the cache -> %s", len(written),
        settings.model, len(transcript.turns), asked, len(transcript.turns) - asked, out)
    return asked
