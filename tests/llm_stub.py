"""An OpenAI-compatible chat server's answer to the prompt writer (for pytest-httpserver): it reads
the outline the writer sends (kolors_story.writing.scene_prompts.outline_message) and writes each
scene's prompt from its description and its characters' descriptions, as a careful model would.
Deterministic, so an outline line edited changes exactly that scene's prompt."""

from __future__ import annotations

import json
import re

from werkzeug import Request, Response

SCENE_LINE = re.compile(r"^\d+\. id (?P<id>[^：\s]+)：(?P<text>.+?)(?:（人物：(?P<who>[^）]+)）)?$")
CHARACTER_LINE = re.compile(r"^- (?P<name>[^：]+)：(?P<text>.+)$")


def completion(content: str) -> dict:
    return {"id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": "qwen-plus",
            "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": content}}]}


def scenes_reply(outline_text: str) -> dict:
    characters = {m["name"]: m["text"] for line in outline_text.splitlines() if (m := CHARACTER_LINE.match(line))}
    scenes = []
    for line in outline_text.splitlines():
        if m := SCENE_LINE.match(line):
            who = [characters[name] for name in (m["who"] or "").split("、") if name]
            scenes.append({"id": m["id"], "prompt": "，".join(["古风，水墨画", *who, m["text"]]), "negative_prompt": ""})
    return {"scenes": scenes}


def answer(request: Request) -> Response:
    body = json.loads(request.get_data())
    user = next(m["content"] for m in body["messages"] if m["role"] == "user")
    return Response(json.dumps(completion(json.dumps(scenes_reply(user), ensure_ascii=False))),
                    content_type="application/json")


# ---------------------------------------------------------------- a vision model's captions
def sent_image(body: dict) -> str:
    """The data URL of the image a caption request sends (kolors_story.writing.captioners)."""
    parts = next(m["content"] for m in body["messages"] if m["role"] == "user")
    return next(p["image_url"]["url"] for p in parts if p["type"] == "image_url")


def caption_of(data_url: str) -> str:
    """The stub's caption of an image: Chinese, and different for different image bytes."""
    import hashlib

    return f"一幅水墨小景，编号{hashlib.sha256(data_url.encode()).hexdigest()[:6]}"


def caption_answer(request: Request) -> Response:
    """A vision model that describes every image (deterministic: the same bytes, the same caption)."""
    body = json.loads(request.get_data())
    return Response(json.dumps(completion(caption_of(sent_image(body))), ensure_ascii=False),
                    content_type="application/json")
