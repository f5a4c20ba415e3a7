"""Scene prompts from characters defined once, and the 256-token limit."""


import pytest

from kolors_story.errors import UserError
from kolors_story.chatglm_tokens import MAX_TOKENS, PREFIX_TOKENS, dropped_text
from kolors_story.plan.prompts import assemble_prompt, count_tokens, tokenizer_model

STORY = {
    "style": "古风，水墨画",
    "characters": {"girl": "一个黑色长发少女，绿色长裙", "prince": "一位身穿银色盔甲的年轻王子"},
}


def test_template_assembles_style_characters_action_and_setting():
    scene = {"id": "s5", "characters": ["girl", "prince"], "action": "微笑交谈，上半身", "setting": "桃花盛开的小路"}
    assert assemble_prompt(scene, STORY) == \
        "古风，水墨画，一个黑色长发少女，绿色长裙，一位身穿银色盔甲的年轻王子，微笑交谈，上半身，桃花盛开的小路"


def test_empty_fields_leave_no_stray_separators():
    assert assemble_prompt({"id": "a", "action": "远山"}, {"style": "水墨画"}) == "水墨画，远山"


def test_a_full_prompt_is_used_as_written():
    assert assemble_prompt({"id": "a", "prompt": "手写的提示词", "characters": ["girl"]}, STORY) == "手写的提示词"


def test_custom_template_and_unknown_field():
    story = {**STORY, "prompt_template": "{characters} | {action} | {style}"}
    assert assemble_prompt({"id": "a", "characters": ["girl"], "action": "读书"}, story) == \
        "一个黑色长发少女，绿色长裙 | 读书 | 古风，水墨画"
    with pytest.raises(UserError, match="story.prompt_template.*'mood'"):
        assemble_prompt({"id": "a", "action": "x"}, {**STORY, "prompt_template": "{mood}"})


def test_unknown_character_is_refused_naming_scene_and_known_names():
    with pytest.raises(UserError, match=r"scene s2.*'dragon'.*\['girl', 'prince'\]"):
        assemble_prompt({"id": "s2", "characters": ["dragon"], "action": "飞"}, STORY)


def test_token_count_matches_the_real_chatglm_tokenizer():
    from diffusers.pipelines.kolors.tokenizer import ChatGLMTokenizer

    tokenizer = ChatGLMTokenizer.from_pretrained(str(tokenizer_model().parent))
    for text in ["古风，水墨画，一个黑色长发少女，坐在古代书院的教室里", "ink style, a boat", ""]:
        assert count_tokens(text) == len(tokenizer(text)["input_ids"])


def test_dropped_text_is_what_the_real_tokenizer_cuts_off():
    from diffusers.pipelines.kolors.tokenizer import ChatGLMTokenizer

    tokenizer = ChatGLMTokenizer.from_pretrained(str(tokenizer_model().parent))
    text = "水墨画，山水，" * 60 + "结尾的小船"
    kept = tokenizer(text, max_length=MAX_TOKENS, truncation=True)["input_ids"]
    assert len(kept) == MAX_TOKENS
    dropped = dropped_text(text)
    assert dropped.endswith("结尾的小船") and text.endswith(dropped)
    assert tokenizer.decode(kept[PREFIX_TOKENS:]) + dropped == text
    assert dropped_text("水墨画") is None
