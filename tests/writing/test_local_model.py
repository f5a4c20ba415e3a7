"""The prompt writer's local backend on the tiny random Qwen2 (the real tokenizer, random weights):
the reply is JSON of the asked form whatever the model writes (its skeleton fixed by the outline),
the same request gives the same reply, and words that fail the checks end in the writer's error."""

from __future__ import annotations

import json

import pytest

from kolors_story.writing.llm_client import ChatSettings, LLMError
from kolors_story.writing.local_model import LocalWriter
from kolors_story.writing.reply_cache import ReplyCache
from kolors_story.writing.scene_prompts import Transcript, first_messages, write_prompts

STORY = {"title": "桃花梦", "style": "古风", "characters": {"girl": "一个黑色长发少女"},
         "outline": [{"id": "o1", "description": "在桃花园中读书"}, {"id": "o2", "description": "小桥流水"},
                     {"id": "o3", "description": "回家", "prompt": "古风，小院"}]}
RULES = "你是一个文生图专家。"


@pytest.fixture(scope="module")
def settings(tiny_qwen) -> ChatSettings:
    return ChatSettings(backend="local", model=str(tiny_qwen), max_new_tokens=12)


def test_the_reply_is_the_outline_skeleton_with_the_models_strings(settings):
    writer = LocalWriter(settings, ["o1", "o2"])
    reply = writer.ask(first_messages(STORY, RULES, STORY["outline"][:2]), settings)
    scenes = json.loads(reply)["scenes"]
    assert [s["id"] for s in scenes] == ["o1", "o2"] and all(set(s) == {"id", "prompt", "negative_prompt"} for s in scenes)
    assert all('"' not in s["prompt"] and "\n" not in s["prompt"] for s in scenes)
    assert writer.ask(first_messages(STORY, RULES, STORY["outline"][:2]), settings) == reply  # greedy: the same


def test_sampling_is_seeded(settings):
    hot = ChatSettings(**{**vars(settings), "temperature": 1.0, "seed": 3})
    writer = LocalWriter(hot, ["o1"])
    messages = first_messages(STORY, RULES, STORY["outline"][:1])
    assert writer.ask(messages, hot) == writer.ask(messages, hot)


def test_a_writing_sends_only_scenes_without_a_prompt_and_checks_the_words(settings, tmp_path):
    transcript = Transcript()
    prompts = write_prompts(STORY, RULES, settings, ReplyCache(tmp_path), transcript,
                            ask=LocalWriter(settings, ["o1", "o2"]).ask)
    assert [p.id for p in prompts] == ["o1", "o2"] and all(p.prompt for p in prompts)
    assert len(transcript.turns) == 1 and "o3" not in transcript.turns[0]["request"]["messages"][1]["content"]
    # a scene that shows a character: random words never hold its description, so the writer
    # sends them back (attempts) and then stops, naming the scene and showing the raw reply
    story = {**STORY, "outline": [{"id": "o1", "description": "读书", "characters": ["girl"]}]}
    with pytest.raises(LLMError) as err:
        write_prompts(story, RULES, settings, ReplyCache(tmp_path), ask=LocalWriter(settings, ["o1"]).ask)
    assert "scene o1: the prompt lacks character girl's description, word for word: 一个黑色长发少女" in str(err.value)
    assert '{"scenes": [{"id": "o1", "prompt": ' in str(err.value)


def test_a_folder_without_a_model_is_one_line(tmp_path):
    with pytest.raises(LLMError, match="is not a model folder"):
        LocalWriter(ChatSettings(backend="local", model=str(tmp_path)), ["o1"]).load()


def test_variants_fill_a_prompts_list_in_the_skeleton(settings):
    two = ChatSettings(**{**vars(settings), "variants": 2})
    reply = LocalWriter(two, ["o1"]).ask(first_messages(STORY, RULES, STORY["outline"][:1], 2), two)
    (scene,) = json.loads(reply)["scenes"]
    assert set(scene) == {"id", "prompts", "negative_prompt"} and len(scene["prompts"]) == 2
