"""Captions of the style images (kolors_story.writing.captions): the real Data-Juicer
image_captioning_mapper on the tiny random BLIP (kolors_story.models.random_blip), and the
OpenAI-compatible vision backend against a local server (pytest-httpserver, tests/llm_stub.py)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kolors_story.chatglm_tokens import MAX_TOKENS, count_tokens
from kolors_story.errors import UserError
from kolors_story.writing.captions import CaptionRun, CaptionSettings, captioner_for, check_template, fill_template
from kolors_story.writing.llm_client import LLMError
from kolors_story.writing.reply_cache import ReplyCache

KEY = "sk-caption-test-never-written"


@pytest.fixture(scope="module")
def blips(tmp_path_factory) -> dict[str, Path]:
    from kolors_story.models.random_blip import build_tiny_blip

    root = tmp_path_factory.mktemp("blip")
    return {"talks": build_tiny_blip(root / "blip"), "mute": build_tiny_blip(root / "mute", mute=True)}


def images(folder: Path, n: int, start: int = 0) -> list[dict]:
    """Rows of n distinct random images, no captions of their own (as download_dataset writes them)."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(start, start + n):
        path = folder / f"img{i}.png"
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(path)
        rows.append({"id": f"img{i}", "image": str(path), "text": "二次元", "caption": "",
                     "caption_from": "dataset.default_caption"})
    return rows


def run(model: Path, cache: Path, **settings) -> CaptionRun:
    caption = CaptionSettings(backend="data_juicer", model=str(model), **settings)
    return CaptionRun(caption, captioner_for(caption), ReplyCache(cache), trigger="水墨风", default_caption="二次元")


def test_the_real_data_juicer_op_captions_every_image_the_same_way_twice(blips, tmp_path):
    rows = images(tmp_path / "img", 3)
    first = run(blips["talks"], tmp_path / "cache1")
    out, records = first.caption_rows(rows)
    assert first.asked == 3 and [r.source for r in records] == ["generated"] * 3
    assert all(r.generated and r.text == f"水墨风，{r.generated}" for r in records)
    assert [o["text"] for o in out] == [r.text for r in records] and out[0]["caption_source"] == "generated"
    assert len({r.generated for r in records}) == 3  # seeded per image, not one draw for all
    assert all(r.tokens == count_tokens(r.text) and r.model == str(blips["talks"]) for r in records)
    # a fresh op and an empty cache, the images in another order: the same caption for each image
    again, records2 = run(blips["talks"], tmp_path / "cache2").caption_rows(rows[::-1])
    assert [r.generated for r in records2] == [r.generated for r in records][::-1]
    # another seed samples other captions
    _, other = run(blips["talks"], tmp_path / "cache3", seed=1).caption_rows(rows[:1])
    assert other[0].generated != records[0].generated


def test_cached_captions_ask_nothing_and_an_added_image_asks_once(blips, tmp_path):
    rows = images(tmp_path / "img", 2)
    run(blips["talks"], tmp_path / "cache").caption_rows(rows)
    cached = run(blips["talks"], tmp_path / "cache", template="{caption}")  # a template edit
    _, records = cached.caption_rows(rows)
    assert cached.asked == 0 and cached._captioner is None and all(r.cached for r in records)
    assert records[0].text == records[0].generated
    more = run(blips["talks"], tmp_path / "cache")
    more.caption_rows(rows + images(tmp_path / "img", 1, start=2))
    assert more.asked == 1
    prompted = run(blips["talks"], tmp_path / "cache", prompt="a picture of")  # the prompt is in the key
    prompted.caption_rows(rows[:1])
    assert prompted.asked == 1


def test_a_user_caption_is_kept_and_not_sent(blips, tmp_path):
    rows = images(tmp_path / "img", 2)
    rows[0].update(caption="少女在窗前读书", caption_from="img0.txt", text="ink，少女在窗前读书")
    captioner = run(blips["talks"], tmp_path / "cache")
    out, records = captioner.caption_rows(rows)
    assert captioner.asked == 1 and records[0].source == "user" and out[0]["text"] == "ink，少女在窗前读书"
    replaced = run(blips["talks"], tmp_path / "cache", keep_existing=False, template="{caption}，{user_caption}")
    _, records = replaced.caption_rows(rows)
    assert replaced.asked == 1 and records[0].source == "generated"
    assert records[0].text == f"{records[0].generated}，少女在窗前读书"
    assert records[1].text == records[1].generated  # no caption of its own: the separator is dropped


def test_an_empty_caption_falls_back_with_a_warning_naming_the_image(blips, tmp_path, caplog):
    rows = images(tmp_path / "img", 2)
    rows[1].update(caption="桥", caption_from="metadata.csv", text="桥")
    with caplog.at_level(logging.WARNING):
        out, records = run(blips["mute"], tmp_path / "cache", keep_existing=False).caption_rows(rows)
    assert [r.source for r in records] == ["fallback", "fallback"] and [r.generated for r in records] == ["", ""]
    assert [o["text"] for o in out] == ["水墨风，二次元", "水墨风，桥"]
    assert "empty caption for img0.png" in caplog.text and "dataset.default_caption" in caplog.text


@pytest.mark.parametrize("template", ["{trigger}，{caption}", "{caption}", "{user_caption}；{caption}", "{{x}}{caption}"])
def test_templates_with_known_fields_pass(template):
    check_template(template)


@pytest.mark.parametrize("template, words", [("{style}，{caption}", "unknown field {style}"),
                                             ("{0}{caption}", "unknown field {0}"),
                                             ("{caption:>5}", "unknown field {caption}"),
                                             ("{trigger}", "neither {caption} nor {user_caption}"),
                                             ("{caption", "not a valid template")])
def test_a_template_with_an_unknown_field_is_refused_naming_the_key(template, words):
    with pytest.raises(UserError, match="caption.template") as err:
        check_template(template)
    assert words in str(err.value)


def test_fill_template_drops_separators_an_empty_field_leaves():
    assert fill_template("{trigger}，{caption}", "", "桥", "") == "桥"
    assert fill_template("{trigger}，{caption}", "水墨", "桥", "") == "水墨，桥"


# ---------------------------------------------------------------- the OpenAI-compatible backend
@pytest.fixture
def api(httpserver, monkeypatch) -> CaptionSettings:
    monkeypatch.setenv("KOLORS_TEST_CAPTION_KEY", KEY)
    return CaptionSettings(backend="openai", model="qwen-vl-plus", base_url=httpserver.url_for("/v1"),
                           api_key_env="KOLORS_TEST_CAPTION_KEY", timeout_s=2.0, max_retries=0)


def api_run(settings: CaptionSettings, cache: Path) -> CaptionRun:
    return CaptionRun(settings, captioner_for(settings), ReplyCache(cache), trigger="", default_caption="二次元")


def test_a_vision_server_captions_each_image_in_chinese_and_is_asked_once(httpserver, api, tmp_path):
    from llm_stub import caption_answer, caption_of, sent_image

    httpserver.expect_request("/v1/chat/completions", method="POST").respond_with_handler(caption_answer)
    rows = images(tmp_path / "img", 2)
    out, records = api_run(api, tmp_path / "cache").caption_rows(rows)
    bodies = [json.loads(r.get_data()) for r, _ in httpserver.log]
    assert len(bodies) == 2 and all(r.headers["Authorization"] == f"Bearer {KEY}" for r, _ in httpserver.log)
    assert sent_image(bodies[0]).startswith("data:image/png;base64,") and bodies[0]["model"] == "qwen-vl-plus"
    assert "中文" in bodies[0]["messages"][0]["content"][1]["text"] and "response_format" not in bodies[0]
    assert [r.text for r in records] == [caption_of(sent_image(b)) for b in bodies]
    assert out[1]["text"] == records[1].text and records[0].text != records[1].text
    again = api_run(api, tmp_path / "cache")
    again.caption_rows(rows)
    assert again.asked == 0 and len(httpserver.log) == 2
    assert [p for p in (tmp_path / "cache").rglob("*") if p.is_file() and KEY.encode() in p.read_bytes()] == []


def test_an_empty_reply_falls_back_and_a_long_one_is_cut(httpserver, api, tmp_path, caplog):
    from llm_stub import completion

    rows = images(tmp_path / "img", 2)
    httpserver.expect_ordered_request("/v1/chat/completions").respond_with_json(completion(""))
    httpserver.expect_ordered_request("/v1/chat/completions").respond_with_json(completion("长" * 400))
    with caplog.at_level(logging.WARNING):
        _, records = api_run(api, tmp_path / "cache").caption_rows(rows)
    assert records[0].source == "fallback" and records[0].text == "二次元"
    assert "empty caption for img0.png" in caplog.text
    assert records[1].tokens <= MAX_TOKENS and records[1].warnings[0].startswith("generated caption of img1.png: ")
    assert f"more than ChatGLM's {MAX_TOKENS}; cut" in caplog.text


def test_an_error_reply_names_the_image_and_the_endpoint_and_caches_nothing(httpserver, api, tmp_path):
    httpserver.expect_request("/v1/chat/completions").respond_with_json({"error": {"message": "boom"}}, status=500)
    rows = images(tmp_path / "img", 1)
    with pytest.raises(LLMError) as err:
        api_run(api, tmp_path / "cache").caption_rows(rows)
    message = str(err.value)
    assert rows[0]["image"] in message and api.base_url in message and "500" in message and KEY not in message
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


def test_a_missing_key_names_the_variable_and_the_caption_section(api, monkeypatch, tmp_path):
    monkeypatch.delenv("KOLORS_TEST_CAPTION_KEY")
    with pytest.raises(LLMError, match="caption: the environment variable KOLORS_TEST_CAPTION_KEY is not set"):
        api_run(api, tmp_path / "cache").caption_rows(images(tmp_path / "img", 1))


def test_a_run_s_captions_record_seeds_an_empty_cache_so_nothing_is_asked_again(blips, tmp_path, capsys):
    """Reproducing in a fresh folder: results/<run>/data/captions.jsonl fills the cache (the command
    kolors-story-captions-cache), and the job then asks the captioner nothing."""
    from kolors_story.tools.captions_cache import main

    rows = images(tmp_path / "img", 2)
    rows[0].update(caption="桥", caption_from="a.txt", text="桥")
    _, records = run(blips["talks"], tmp_path / "cache").caption_rows(rows)
    record_file = tmp_path / "run/data/captions.jsonl"
    record_file.parent.mkdir(parents=True)
    record_file.write_text("".join(json.dumps(r.to_json(), ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    assert main([str(tmp_path / "run"), "--cache", str(tmp_path / "fresh")]) == 0
    assert "1 caption(s)" in capsys.readouterr().out
    again = run(blips["talks"], tmp_path / "fresh")
    _, records2 = again.caption_rows(rows)
    assert again.asked == 0 and [r.text for r in records2] == [r.text for r in records]
    assert main([str(tmp_path / "nowhere")]) == 1 and "no captions record" in capsys.readouterr().err


def test_the_caption_job_seeds_its_cache_from_every_run_under_results(blips, tmp_path):
    """What scripts/caption_images.py does first: a fresh folder holding results/<run>/ asks no
    captioner; an unreadable record is skipped (its images are captioned again)."""
    from kolors_story.writing.captions import RECORDS, seed_from_results
    from kolors_story.writing.reply_cache import ReplyCache

    rows = images(tmp_path / "img", 2)
    _, records = run(blips["talks"], tmp_path / "cache").caption_rows(rows)
    results = tmp_path / "results"
    (results / "demo" / RECORDS).parent.mkdir(parents=True)
    (results / "demo" / RECORDS).write_text("".join(json.dumps(r.to_json(), ensure_ascii=False) + "\n" for r in records),
                                            encoding="utf-8")
    (results / "broken" / RECORDS).parent.mkdir(parents=True)
    (results / "broken" / RECORDS).write_text("{not json\n", encoding="utf-8")
    assert seed_from_results(results, ReplyCache(tmp_path / "fresh")) == 2
    again = run(blips["talks"], tmp_path / "fresh")
    _, records2 = again.caption_rows(rows)
    assert again.asked == 0 and [r.text for r in records2] == [r.text for r in records]
