"""The workflow's plan (kolors_story.plan.workflow_plan): one immutable value, built from the config
and the prompt writer's files there, which the rules only read."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import yaml

from kolors_story.errors import UserError
from kolors_story.plan.config import load_schema
from kolors_story.plan.job_plan import plan_jobs
from kolors_story.plan.workflow_plan import expand_variants, plan_workflow
from kolors_story.seals import seal

ROOT = Path(__file__).resolve().parents[2]
SCHEMA = load_schema(ROOT / "schemas/config.schema.yaml")
BASE = yaml.safe_load((ROOT / "demo/config.yaml").read_text(encoding="utf-8"))
OUTLINE = [{"id": "s1", "description": "坐在书院教室里认真听讲", "characters": ["girl"]},
           {"id": "s2", "description": "骑着白马", "characters": ["prince"], "seed": 7}]
WRITTEN = [{"id": "s1", "prompt": "古风，一个黑色长发少女，听讲", "characters": ["girl"]},
           {"id": "s2", "prompt": "古风，一位身穿银色盔甲的年轻王子，骑马", "characters": ["prince"], "seed": 7}]


def sweep_with_an_outline() -> dict[str, dict]:
    config = {**BASE, "sweep": [{"name": "hand"}, {"name": "written", "story": {"scenes": None, "outline": OUTLINE}}]}
    return expand_variants(config, SCHEMA)


def written_file(folder: Path, entries: list[dict]) -> Path:
    path = folder / "scenes.yaml"
    path.write_text(yaml.safe_dump({"scenes": entries}, allow_unicode=True), encoding="utf-8")
    seal(path, "write_prompts")
    return path


def test_a_variant_waits_for_its_writer_and_has_no_jobs_until_its_file_is_there(tmp_path):
    variants = sweep_with_an_outline()
    before = plan_workflow(variants, SCHEMA, {})
    key = before.writer_keys["written"]
    assert before.waiting == ("written",) and list(before.writers) == [key]
    assert set(before.jobs.variants) == set(before.scenes) == {"hand"}

    after = plan_workflow(variants, SCHEMA, {key: written_file(tmp_path, WRITTEN)})
    assert after.waiting == () and after.writer_keys == before.writer_keys and after.writers == before.writers
    assert [s["prompt"] for s in after.scenes["written"].values()] == [e["prompt"] for e in WRITTEN]
    assert after.variants["written"]["story"]["scenes"] and "outline" not in after.variants["written"]["story"]
    assert "outline" in variants["written"]["story"], "the variants given are not changed"
    # The plan's jobs are the job plan of the resolved variants: nothing else decides them.
    assert after.jobs == plan_jobs(dict(after.variants))


def test_the_plan_s_fields_and_tables_cannot_be_reassigned():
    plan = plan_workflow(sweep_with_an_outline(), SCHEMA, {})
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.waiting = ()
    with pytest.raises(TypeError):
        plan.variants["hand"] = {}
    with pytest.raises(TypeError):
        plan.scenes["other"] = {}


def test_a_written_file_of_another_outline_is_refused_naming_it(tmp_path):
    variants = sweep_with_an_outline()
    key = plan_workflow(variants, SCHEMA, {}).writer_keys["written"]
    path = written_file(tmp_path, WRITTEN[:1])
    with pytest.raises(UserError, match=re.escape(f"{path}: its scenes ['s1'] are not the outline's")):
        plan_workflow(variants, SCHEMA, {key: path})


def test_a_bad_config_is_refused_when_the_variants_are_expanded():
    with pytest.raises(UserError, match=r"sweep variant 'bad'"):
        expand_variants({**BASE, "sweep": [{"name": "bad", "train": {"rank": -1}}]}, SCHEMA)


def test_no_rule_file_rebinds_a_global():
    """rules/*.smk read the plan through plan(); none assigns module state from inside a function."""
    sources = [ROOT / "Snakefile", *sorted((ROOT / "rules").glob("*.smk"))]
    found = [f"{p.name}:{i}" for p in sources for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
             if re.match(r"\s*global\s", line)]
    assert found == []
