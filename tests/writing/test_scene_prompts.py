"""The prompt writer against a local OpenAI-compatible server (pytest-httpserver speaking the
chat completions API as DashScope's compatible mode does), through the real `openai` client:
correct, malformed, too-long and missing-scene replies, the error codes, a dead endpoint, the
cache, the key kept out of every file, and the prompts file pasted back into a valid config."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import pytest
import yaml
from werkzeug import Response

from kolors_story.chatglm_tokens import count_tokens
from kolors_story.errors import UserError
from kolors_story.tools import write_prompts as cli
from kolors_story.plan.config import load_schema, validate_config
from kolors_story.writing.llm_client import ChatSettings, LLMError
from kolors_story.writing.reply_cache import ReplyCache
from kolors_story.writing.scene_prompts import ScenePrompt, Transcript, scenes_file_entries, write_prompts

ROOT = Path(__file__).resolve().parents[2]
SCHEMA = load_schema(ROOT / "schemas/config.schema.yaml")
KEY = "sk-test-0123456789abcdef-never-written"
GIRL = "一个黑色长发少女，穿红色长裙"
STORY = {
    "title": "小红的一天", "style": "古风，水墨画", "characters": {"girl": GIRL},
    "outline": [{"id": "s1", "description": "女主正在上课", "characters": ["girl"]},
                {"id": "s2", "description": "放学路上看见小猫"},
                {"id": "s3", "description": "回家", "prompt": "古风，水墨画，一座小院，黄昏"}],
}
RULES = "你是一个文生图专家。风格为古风。"
LONG = "水墨画，山水，" * 120
GOOD = {"scenes": [{"id": "s1", "prompt": f"古风，水墨画，{GIRL}，坐在教室里，上半身", "negative_prompt": "模糊"},
                   {"id": "s2", "prompt": "古风，水墨画，小路旁一只小猫，全身", "negative_prompt": ""}]}


def completion(content: str) -> dict:
    return {"id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": "qwen-plus",
            "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": content}}]}


@pytest.fixture
def settings(httpserver, monkeypatch) -> ChatSettings:
    monkeypatch.setenv("DASHSCOPE_API_KEY", KEY)
    return ChatSettings(base_url=httpserver.url_for("/compatible-mode/v1"), timeout_s=1.0, max_retries=1)


def serve(httpserver, *replies: str | dict) -> None:
    for reply in replies:
        content = reply if isinstance(reply, str) else json.dumps(reply, ensure_ascii=False)
        httpserver.expect_ordered_request("/compatible-mode/v1/chat/completions", method="POST").respond_with_json(
            completion(content))


def sent(httpserver) -> list[dict]:
    return [json.loads(request.get_data()) for request, _ in httpserver.log]


def test_a_good_reply_gives_one_checked_prompt_per_outline_scene(httpserver, settings, tmp_path):
    serve(httpserver, GOOD)
    prompts = write_prompts(STORY, RULES, settings, ReplyCache(tmp_path / "cache"))
    assert [(p.id, p.negative_prompt) for p in prompts] == [("s1", "模糊"), ("s2", "")]
    (request, _), = httpserver.log
    body = json.loads(request.get_data())
    assert request.headers["Authorization"] == f"Bearer {KEY}"
    assert body["model"] == "qwen-plus" and body["response_format"] == {"type": "json_object"} and body["seed"] == 0
    system, user = body["messages"]
    assert system["content"].startswith(RULES) and "JSON" in system["content"]  # DashScope needs the word
    assert f"girl：{GIRL}" in user["content"] and "id s1：女主正在上课（人物：girl）" in user["content"]
    assert "s3" not in user["content"]  # written by hand: not sent


def test_the_same_request_is_answered_from_the_cache(httpserver, settings, tmp_path):
    serve(httpserver, GOOD)
    cache = ReplyCache(tmp_path / "cache")
    first = write_prompts(STORY, RULES, settings, cache)
    transcript = Transcript()
    assert write_prompts(STORY, RULES, settings, cache, transcript) == first
    assert len(httpserver.log) == 1 and transcript.turns[0]["cached"]
    changed = {**STORY, "outline": [{**STORY["outline"][0], "description": "女主在读书"}, *STORY["outline"][1:]]}
    serve(httpserver, GOOD)
    write_prompts(changed, RULES, settings, cache)  # one outline line edited: asked again
    assert len(httpserver.log) == 2


def test_a_bad_reply_is_sent_back_with_its_problems_until_it_is_right(httpserver, settings, tmp_path):
    missing_girl = {"scenes": [{"id": "s1", "prompt": "古风，一个少女在上课"}, GOOD["scenes"][1]]}
    serve(httpserver, "这是提示词：……", missing_girl, GOOD)
    transcript = Transcript()
    prompts = write_prompts(STORY, RULES, settings, ReplyCache(None), transcript)
    assert [p.id for p in prompts] == ["s1", "s2"]
    assert [bool(t["problems"]) for t in transcript.turns] == [True, True, False]
    assert "not JSON" in transcript.turns[0]["problems"][0]
    assert transcript.turns[1]["problems"] == [f"scene s1: the prompt lacks character girl's description, word for word: {GIRL}"]
    third = sent(httpserver)[2]["messages"]
    assert [m["role"] for m in third] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert "lacks character girl's description" in third[-1]["content"]


@pytest.mark.parametrize("reply, problem", [
    ({"scenes": [GOOD["scenes"][0]]}, "scene s2: missing"),
    ({"scenes": [GOOD["scenes"][0], {**GOOD["scenes"][1], "prompt": LONG}]},
     f"scene s2: the prompt has {count_tokens(LONG)} tokens, more than ChatGLM's 256"),
    ({"scenes": [*GOOD["scenes"], {"id": "s9", "prompt": "x"}]}, "scene s9: not in the outline (its ids: s1, s2)"),
    ({"scenes": [GOOD["scenes"][0], {"id": "s2", "prompt": " "}]}, "scene s2: the prompt is empty"),
    ({"prompts": []}, "the reply is not JSON of the form"),
])
def test_replies_that_never_pass_stop_the_writer_naming_the_scene_and_showing_the_reply(
        httpserver, settings, reply, problem):
    serve(httpserver, reply, reply, reply)
    with pytest.raises(LLMError) as err:
        write_prompts(STORY, RULES, settings, ReplyCache(None))
    message = str(err.value)
    assert "3 replies of qwen-plus failed their checks" in message and problem in message
    assert json.dumps(reply, ensure_ascii=False)[:200] in message  # the raw reply, shown
    assert len(httpserver.log) == 3


def test_a_fenced_json_reply_is_read(httpserver, settings):
    serve(httpserver, "```json\n" + json.dumps(GOOD, ensure_ascii=False) + "\n```")
    assert len(write_prompts(STORY, RULES, settings, ReplyCache(None))) == 2


@pytest.mark.parametrize("status, expected", [
    (401, "401, the key in $DASHSCOPE_API_KEY was refused"),
    (404, "404, no such model or path; check prompt_writer.model"),
    (429, "429 (rate limit or quota) after 2 tries with backoff"),
    (500, "500 after 2 tries"),
])
def test_each_error_code_is_one_line_in_seconds(httpserver, settings, status, expected):
    httpserver.expect_request("/compatible-mode/v1/chat/completions").respond_with_json(
        {"error": {"message": "nope", "type": "x", "code": str(status)}}, status=status)
    t0 = time.monotonic()
    with pytest.raises(LLMError) as err:
        write_prompts(STORY, RULES, settings, ReplyCache(None))
    assert expected in str(err.value) and KEY not in str(err.value) and "\n" not in str(err.value)
    assert time.monotonic() - t0 < 10


def test_a_server_that_does_not_answer_times_out_in_seconds(httpserver, settings):
    def slow(_request):
        time.sleep(1.5)
        return Response("{}", content_type="application/json")

    httpserver.expect_request("/compatible-mode/v1/chat/completions").respond_with_handler(slow)
    t0 = time.monotonic()
    with pytest.raises(LLMError, match=r"no reply within 1 s, 2 tries; check the server, or raise prompt_writer.timeout_s"):
        write_prompts(STORY, RULES, settings, ReplyCache(None))
    assert time.monotonic() - t0 < 10


def test_a_dead_endpoint_and_a_missing_key_are_one_line(monkeypatch):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("DASHSCOPE_API_KEY", KEY)
    dead = ChatSettings(base_url=f"http://127.0.0.1:{port}/v1", max_retries=0, timeout_s=2)
    with pytest.raises(LLMError, match=rf"127.0.0.1:{port}/v1 \(model qwen-plus\): cannot connect .*check prompt_writer.base_url"):
        write_prompts(STORY, RULES, dead, ReplyCache(None))
    monkeypatch.delenv("DASHSCOPE_API_KEY")
    with pytest.raises(LLMError, match="the environment variable DASHSCOPE_API_KEY is not set"):
        write_prompts(STORY, RULES, dead, ReplyCache(None))


def write_config(tmp_path: Path, base_url: str) -> Path:
    config = {"run": "outlined", "story": {**STORY, "negative_prompt": "低质量"},
              "prompt_writer": {"base_url": base_url, "max_retries": 0, "timeout_s": 2}}
    path = tmp_path / "outlined.yaml"
    path.write_text(yaml.safe_dump(config, allow_unicode=True), encoding="utf-8")
    return path


def test_the_command_writes_a_prompts_file_that_pastes_into_a_valid_config(httpserver, settings, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # the schema; every output goes to tmp_path
    serve(httpserver, GOOD)
    config_file = write_config(tmp_path, settings.base_url)
    out = tmp_path / "results/outlined/prompts.yaml"
    assert cli.main([str(config_file), "--out", str(out), "--cache", str(tmp_path / "cache")]) == 0
    scenes = yaml.safe_load(out.read_text(encoding="utf-8"))["scenes"]
    assert scenes == [
        {"id": "s1", "prompt": GOOD["scenes"][0]["prompt"], "negative_prompt": "模糊", "caption": "女主正在上课",
         "characters": ["girl"]},
        {"id": "s2", "prompt": GOOD["scenes"][1]["prompt"], "caption": "放学路上看见小猫"},
        {"id": "s3", "prompt": STORY["outline"][2]["prompt"], "caption": "回家"},  # the hand-written prompt
    ]
    turns = [json.loads(line) for line in (out.parent / "prompt_writer.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(turns) == 1 and turns[0]["reply"] == json.dumps(GOOD, ensure_ascii=False)
    pasted = yaml.safe_load(config_file.read_text(encoding="utf-8"))
    pasted["story"]["scenes"] = scenes  # as the file's header says: pasted, and the outline deleted
    del pasted["story"]["outline"]
    assert [s["prompt"] for s in validate_config(pasted, SCHEMA)["story"]["scenes"]] == [s["prompt"] for s in scenes]
    # the key is in no file the writer left: prompts, transcript, cache
    leftovers = [p for p in tmp_path.rglob("*") if p.is_file() and KEY.encode() in p.read_bytes()]
    assert leftovers == []


def test_an_outline_with_an_unknown_character_or_a_repeated_id_is_refused_before_asking(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    bad = {**STORY, "outline": [*STORY["outline"], {"id": "S1", "description": "x", "characters": ["boy"]}]}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"story": bad}, allow_unicode=True), encoding="utf-8")
    with pytest.raises(UserError) as err:
        cli.read_config([path])
    assert "config key 'story.outline': duplicate scene id(s) S1, s1" in str(err.value)
    assert "config key 'story.outline[3].characters' (scene S1): unknown character(s) ['boy']" in str(err.value)


def test_variants_ask_for_several_distinct_prompts_each_checked_and_written_as_alternatives(httpserver, settings,
                                                                                          tmp_path):
    two = ChatSettings(**{**vars(settings), "variants": 2})
    short = {**STORY, "outline": STORY["outline"][:1]}  # s1 shows the girl
    same = {"scenes": [{"id": "s1", "prompts": [f"古风，{GIRL}，听讲", f"古风，{GIRL}，听讲"]}]}
    missing = {"scenes": [{"id": "s1", "prompts": [f"古风，{GIRL}，听讲", "古风，一个少年，听讲"]}]}
    good = {"scenes": [{"id": "s1", "prompts": [f"古风，{GIRL}，听讲", f"水墨画，{GIRL}，窗边读书"]}]}
    serve(httpserver, same, missing, good)
    transcript = Transcript()
    prompts = write_prompts(short, RULES, two, ReplyCache(tmp_path), transcript)
    assert "Give 2 different prompts for each scene" in sent(httpserver)[0]["messages"][0]["content"]
    assert transcript.turns[0]["problems"] == ['scene s1: 1 distinct non-empty prompt(s) in "prompts", 2 asked']
    assert transcript.turns[1]["problems"] == [
        f"scene s1: the prompt 2 lacks character girl's description, word for word: {GIRL}"]
    assert prompts == [ScenePrompt("s1", good["scenes"][0]["prompts"][0], "", (good["scenes"][0]["prompts"][1],))]
    entry, = scenes_file_entries(short, prompts)
    assert entry["prompt"] == good["scenes"][0]["prompts"][0] and entry["alternatives"] == [good["scenes"][0]["prompts"][1]]
