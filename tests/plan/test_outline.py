"""A story given as story.outline: validated like scenes (named by its own key), its writer's job
keyed by what it sends, and the written file read back into a config that renders like a hand-written one."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from kolors_story.errors import UserError
from kolors_story.plan.config import load_schema, scene_settings, validate_config
from kolors_story.plan.outline import (
    read_written_scenes, with_written_scenes, writer_key, writer_settings, writes_from_outline,
)
from kolors_story.plan.sweep import expand_sweep
from kolors_story.seals import seal

ROOT = Path(__file__).resolve().parents[2]
SCHEMA = load_schema(ROOT / "schemas/config.schema.yaml")
BASE = yaml.safe_load((ROOT / "demo/config.yaml").read_text(encoding="utf-8"))
OUTLINE = [{"id": "s1", "description": "坐在书院教室里认真听讲", "characters": ["girl"]},
           {"id": "s2", "description": "骑着白马", "characters": ["prince"], "seed": 7}]


def outlined(outline=OUTLINE, **writer) -> dict:
    story = {k: v for k, v in BASE["story"].items() if k != "scenes"}
    return validate_config({**BASE, "story": {**story, "outline": outline}, "prompt_writer": writer}, SCHEMA)


def test_an_outline_config_is_valid_and_waits_for_its_writer():
    config = outlined()
    assert writes_from_outline(config) and "scenes" not in config["story"]
    assert not writes_from_outline(validate_config(BASE, SCHEMA))


def test_scenes_and_an_outline_together_are_refused_naming_both_keys():
    both = {**BASE, "story": {**BASE["story"], "outline": OUTLINE}}
    with pytest.raises(UserError, match=r"'story.scenes' and 'story.outline': both given.*delete story.outline"):
        validate_config(both, SCHEMA)


def test_a_sweep_variant_turns_the_base_scenes_into_an_outline_with_null():
    config = {**BASE, "sweep": [{"name": "hand"}, {"name": "written", "story": {"scenes": None, "outline": OUTLINE}}]}
    variants = expand_sweep(config, lambda c: validate_config(c, SCHEMA))
    assert not writes_from_outline(variants["hand"]) and writes_from_outline(variants["written"])


def test_an_outline_is_checked_like_scenes_under_its_own_key():
    bad = [*OUTLINE, {"id": "S1", "description": "x", "characters": ["nobody"]}]
    with pytest.raises(UserError) as err:
        outlined(bad)
    assert "config key 'story.outline': duplicate scene id(s) S1, s1" in str(err.value)
    assert "config key 'story.outline[2].characters' (scene S1): unknown character(s) ['nobody']" in str(err.value)
    with pytest.raises(UserError, match=r"'layout.columns' / 'layout.rows'"):  # 2 x 1 cells, 3 scenes
        validate_config({**outlined(), "layout": {"style": "grid", "columns": 2, "rows": 1},
                         "story": {**outlined()["story"], "outline": [*OUTLINE, {"id": "s3", "description": "x"}]}},
                        SCHEMA)


def test_the_writer_key_follows_what_is_sent_not_how_long_to_wait():
    assert writer_key(outlined()) == writer_key(outlined(timeout_s=5, max_retries=0, api_key_env="OTHER"))
    assert writer_key(outlined()) != writer_key(outlined(model="qwen-max"))
    edited = [OUTLINE[0], {**OUTLINE[1], "description": "骑着黑马"}]
    assert writer_key(outlined()) != writer_key(outlined(edited))


def test_written_scenes_render_as_hand_written_ones(tmp_path):
    config = outlined()
    entries = [{"id": "s1", "prompt": "古风，一个黑色长发少女，听讲", "caption": "听讲", "characters": ["girl"]},
               {"id": "s2", "prompt": "古风，一位身穿银色盔甲的年轻王子，骑马", "characters": ["prince"], "seed": 7}]
    path = tmp_path / "scenes.yaml"
    path.write_text(yaml.safe_dump({"scenes": entries}, allow_unicode=True), encoding="utf-8")
    seal(path, "write_prompts")
    resolved = validate_config(with_written_scenes(config, read_written_scenes(path, OUTLINE)), SCHEMA)
    assert "outline" not in resolved["story"] and not writes_from_outline(resolved)
    scenes = scene_settings(resolved)
    assert scenes["s1"]["prompt"] == entries[0]["prompt"] and scenes["s2"]["seed"] == 7
    assert scenes == scene_settings(validate_config({**BASE, "story": {**BASE["story"], "scenes": entries}}, SCHEMA))


def test_a_written_file_for_another_outline_or_changed_since_its_job_is_refused(tmp_path):
    path = tmp_path / "scenes.yaml"
    path.write_text(yaml.safe_dump({"scenes": [{"id": "s1", "prompt": "x"}]}), encoding="utf-8")
    seal(path, "write_prompts")
    with pytest.raises(UserError, match=r"its scenes \['s1'\] are not the outline's; delete it and rerun"):
        read_written_scenes(path, OUTLINE)
    path.write_text(yaml.safe_dump({"scenes": [{"id": "s1", "prompt": "y"}]}), encoding="utf-8")
    with pytest.raises(UserError, match="changed since its job"):
        read_written_scenes(path, OUTLINE)


def test_a_sweep_varies_the_writer_as_an_axis_and_equal_writers_share_one_job():
    config = {**BASE, "story": {**{k: v for k, v in BASE["story"].items() if k != "scenes"}, "outline": OUTLINE},
              "sweep": [{"grid": {"prompt_writer.model": ["qwen-plus", "qwen-max"], "generate.lora_scale": [0.5, 1.0]}}]}
    variants = expand_sweep(config, lambda c: validate_config(c, SCHEMA))
    keys = {name: writer_key(c) for name, c in variants.items()}
    assert len(variants) == 4 and len(set(keys.values())) == 2  # the LoRA scale does not reach the writer
    rules = {**config, "sweep": [{"name": "plain"}, {"name": "strict", "story": {"prompt_rules": "只写全身像。"}}]}
    assert len({writer_key(c) for c in expand_sweep(rules, lambda c: validate_config(c, SCHEMA)).values()}) == 2


def test_the_writers_params_do_not_follow_the_order_of_keys_in_the_yaml():
    """Snakemake compares params as written: an outline with its keys in another order (a YAML
    written by yaml.safe_dump sorts them) must give the same params, or the writer reruns."""
    import json

    reordered = [dict(sorted(item.items(), reverse=True)) for item in OUTLINE]
    first, second = (json.dumps(writer_settings(outlined(o)), ensure_ascii=False) for o in (OUTLINE, reordered))
    assert first == second
