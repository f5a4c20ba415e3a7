"""Sweeps: variants merged over the base, grids expanded and named, each variant validated, and
the job plan sharing every job whose settings match (no Snakemake here: tests/test_workflow.py
plans the same sweeps with a dry run)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from kolors_story.plan.config import load_schema, validate_config
from kolors_story.errors import UserError
from kolors_story.plan.job_plan import data_key, plan_jobs
from kolors_story.dotted import differing_settings, flatten
from kolors_story.plan.sweep import deep_merge, expand_sweep, job_key

ROOT = Path(__file__).resolve().parents[2]
SCHEMA = load_schema(ROOT / "schemas/config.schema.yaml")


def validate(config: dict) -> dict:
    return validate_config(config, SCHEMA)


@pytest.fixture(scope="module")
def demo() -> dict:
    base = yaml.safe_load((ROOT / "config.yaml").read_text(encoding="utf-8"))
    return deep_merge(base, yaml.safe_load((ROOT / "demo/config.yaml").read_text(encoding="utf-8")))


def variants_of(demo: dict, sweep: list) -> dict[str, dict]:
    return expand_sweep(validate({**demo, "sweep": sweep}), validate)


def test_without_a_sweep_the_base_is_the_one_variant(demo):
    variants = variants_of(demo, [])
    assert list(variants) == ["demo"] and variants["demo"]["sweep"] == []
    assert variants["demo"] == validate(demo)


def test_named_variants_merge_over_the_base(demo):
    variants = variants_of(demo, [{"name": "rank8", "train": {"rank": 8}}, {"name": "same"}])
    assert list(variants) == ["rank8", "same"]
    assert variants["rank8"]["train"]["rank"] == 8 and variants["same"]["train"]["rank"] == 4
    assert variants["rank8"]["train"]["steps"] == 40  # the rest of train: kept from the base
    assert variants["rank8"]["run"] == "rank8" and variants["rank8"]["sweep"] == []


def test_a_grid_expands_to_every_combination_named_from_its_values(demo):
    grid = {"train.rank": [8, 16], "generate.lora_scale": [0.8, 1.0]}
    variants = variants_of(demo, [{"grid": grid}, {"name": "g", "grid": {"generate.sampler": ["ddim"]}}])
    assert list(variants) == ["rank8-lora_scale0.8", "rank8-lora_scale1.0", "rank16-lora_scale0.8",
                              "rank16-lora_scale1.0", "g-samplerddim"]
    assert variants["rank16-lora_scale0.8"]["train"]["rank"] == 16
    assert variants["rank16-lora_scale0.8"]["generate"]["lora_scale"] == 0.8
    assert variants["g-samplerddim"]["generate"]["sampler"] == "ddim"


def test_a_bad_value_in_a_variant_names_the_variant_and_the_key(demo):
    with pytest.raises(UserError, match=r"(?s)sweep variant .rank-1.*train\.rank"):
        variants_of(demo, [{"name": "rank-1", "train": {"rank": -1}}])
    with pytest.raises(UserError, match=r"(?s)sweep variant .ranktypo8.*ranktypo"):
        variants_of(demo, [{"grid": {"train.ranktypo": [8]}}])


def test_variant_names_must_be_unique_folders_and_not_shared(demo):
    with pytest.raises(UserError, match="occur twice"):
        variants_of(demo, [{"name": "a", "train": {"rank": 8}}, {"name": "A"}])
    with pytest.raises(UserError, match="not 'shared'"):
        variants_of(demo, [{"name": "shared"}])
    with pytest.raises(UserError, match=r"sweep\[0\]"):
        variants_of(demo, [{"train": {"rank": 8}}])
    with pytest.raises(UserError, match="'run' and 'sweep'"):
        variants_of(demo, [{"name": "x", "run": "y"}])


def test_the_schema_refuses_a_grid_that_is_not_lists_of_values(demo):
    with pytest.raises(UserError, match=r"sweep\[0\]\.grid"):
        validate({**demo, "sweep": [{"grid": {"train.rank": 8}}]})


def test_flatten_merge_and_differing_settings():
    assert flatten({"a": {"b": 1, "c": {"d": [1, 2]}}, "e": {}}) == {"a.b": 1, "a.c.d": [1, 2], "e": {}}
    assert deep_merge({"a": {"b": 1, "c": 2}}, {"a": {"c": 3}, "d": [1]}) == {"a": {"b": 1, "c": 3}, "d": [1]}
    configs = {"x": {"run": "x", "t": {"r": 8, "s": 1}, "l": [1]}, "y": {"run": "y", "t": {"r": 16, "s": 1}, "l": [2]}}
    assert differing_settings(configs) == ["t.r", "l"]


def test_job_keys_ignore_key_order_and_see_every_value():
    assert job_key({"a": 1, "b": [1, 2]}) == job_key({"b": [1, 2], "a": 1})
    assert job_key({"a": 1}) != job_key({"a": 1.5}) and len(job_key({})) == 12


# ---------------------------------------------------------------- sharing
def test_a_generation_only_grid_plans_one_data_chain_and_one_training(demo):
    plan = plan_jobs(variants_of(demo, [{"grid": {"generate.lora_scale": [0.8, 1.0],
                                                   "generate.guidance_scale": [3.0, 5.0]}}]))
    assert len(plan.variants) == 4
    assert (len(plan.downloads), len(plan.filters), len(plan.trainings)) == (1, 1, 1)
    assert len(plan.scenes) == 4 * 8  # every scene's image depends on the sampler
    assert len({v.lora for v in plan.variants.values()}) == 1


def test_the_compile_backend_keys_a_scene_only_while_compile_is_on(demo):
    """generate.compile_backend came later: eager jobs keep the keys (the images) they had."""
    plan = plan_jobs(variants_of(demo, [{"name": "plain"}, {"name": "other", "generate": {"compile_backend": "eager"}},
                                        {"name": "aot", "generate": {"compile": True, "compile_backend": "aot_eager"}},
                                        {"name": "inductor", "generate": {"compile": True}}]))
    scenes = {name: jobs.scenes for name, jobs in plan.variants.items()}
    assert scenes["plain"] == scenes["other"]
    assert all("compile_backend" not in plan.scenes[k]["sampler"] for k in scenes["plain"].values())
    assert len({tuple(s.values()) for s in scenes.values()}) == 3
    assert {plan.scenes[scenes["aot"]["s1_class"]]["sampler"]["compile_backend"],
            plan.scenes[scenes["inductor"]["s1_class"]]["sampler"]["compile_backend"]} == {"aot_eager", "inductor"}
    assert len({jobs.lora for jobs in plan.variants.values()}) == 1


def test_a_rank_grid_plans_three_trainings_on_one_filter(demo):
    plan = plan_jobs(variants_of(demo, [{"grid": {"train.rank": [8, 16, 32]}}]))
    assert (len(plan.downloads), len(plan.filters), len(plan.trainings)) == (1, 1, 3)
    assert len(plan.anchors) == 3 * 2 and len(plan.scenes) == 3 * 8


def test_settings_that_only_describe_a_run_share_every_job(demo):
    plan = plan_jobs(variants_of(demo, [{"name": "a"}, {"name": "b", "layout": {"style": "grid"},
                                         "bundle": {"title": "other"}, "score": {"threshold": 5.0}}]))
    a, b = plan.variants["a"], plan.variants["b"]
    assert (a.filter, a.lora, a.anchors, a.scenes) == (b.filter, b.lora, b.anchors, b.scenes)
    assert len(plan.scenes) == 8


def test_one_scene_edited_in_one_variant_adds_one_scene_job(demo):
    scenes = [dict(s) for s in demo["story"]["scenes"]]
    scenes[2]["setting"] += "，月夜"
    plan = plan_jobs(variants_of(demo, [{"name": "a"}, {"name": "b", "story": {"scenes": scenes}}]))
    a, b = plan.variants["a"], plan.variants["b"]
    assert [s for s in a.scenes if a.scenes[s] != b.scenes[s]] == ["s3_dream"]
    assert len(plan.scenes) == 9 and a.lora == b.lora


def test_a_filter_grid_shares_the_download(demo):
    ops = [{"image_shape_filter": {"min_width": w, "min_height": 64}} for w in (64, 70)]
    plan = plan_jobs(variants_of(demo, [{"name": f"w{i}", "filter": {"ops": [op]}} for i, op in enumerate(ops)]))
    assert (len(plan.downloads), len(plan.filters), len(plan.trainings)) == (1, 2, 2)


def test_variants_of_one_model_share_one_text_encoder_job_with_every_text(demo):
    variants = variants_of(demo, [{"name": "a"}, {"name": "b", "story": {"negative_prompt": "另一个负面提示"}}])
    plan = plan_jobs(variants)
    assert len(plan.encodings) == 1
    (job,) = plan.encodings.values()
    assert "另一个负面提示" in job["texts"] and demo["story"]["negative_prompt"] in job["texts"]
    assert job["filters"] == [plan.variants["a"].filter] and job["texts"] == sorted(set(job["texts"]))
    assert {plan.scenes[k]["encoding"] for v in plan.variants.values() for k in v.scenes.values()} == set(plan.encodings)
    assert {plan.anchors[k]["encoding"] for v in plan.variants.values() for k in v.anchors.values()} == set(plan.encodings)
    assert {t["encoding"] for t in plan.trainings.values()} == set(plan.encodings)
    read = {t for scene in plan.scenes.values() for t in (scene["scene"]["prompt"], scene["scene"]["negative_prompt"])}
    assert read <= set(job["texts"])  # every scene's texts are encoded (the rest: anchors, validation)


def test_one_text_encoder_precision_serves_training_and_generation(demo):
    """models.text_encoder_precision is the encoder's one precision: training and generation
    precisions do not reach the encode job, so a precision sweep still encodes once and a
    generation-only one still trains once; another encoder precision is another job (and LoRA)."""
    plan = plan_jobs(variants_of(demo, [{"name": "a"}, {"name": "b", "generate": {"precision": "bf16"}},
                                        {"name": "c", "train": {"precision": "fp16"}}]))
    assert len(plan.encodings) == 1 and len(plan.trainings) == 2
    assert plan.variants["a"].lora == plan.variants["b"].lora
    (job,) = plan.encodings.values()
    assert job["precision"] == "fp16" and job["kolors"] == demo["models"]["kolors"]
    other = plan_jobs(variants_of(demo, [{"name": "a"}, {"name": "b", "models": {"text_encoder_precision": "bf16"}}]))
    assert len(other.encodings) == 2 and len(other.trainings) == 2  # one per model and precision


# ---------------------------------------------------------------- captions (caption_images)
CAPTIONED = {"caption": {"backend": "data_juicer", "model": "resources/tiny/blip"}}


def test_without_a_captioner_no_caption_job_and_training_reads_the_filter(demo):
    plan = plan_jobs(variants_of(demo, [{"name": "a"}]))
    jobs = plan.variants["a"]
    assert plan.captions == {} and jobs.captions is None
    assert plan.trainings[jobs.lora]["filter"] == jobs.filter and plan.encodings[jobs.encoding]["filters"] == [jobs.filter]


def test_a_captioned_variant_shares_the_filter_and_trains_on_its_captions(demo):
    plan = plan_jobs(variants_of(demo, [{"name": "a"}, {"name": "b", **CAPTIONED}]))
    a, b = plan.variants["a"], plan.variants["b"]
    assert (len(plan.downloads), len(plan.filters), len(plan.captions), len(plan.trainings)) == (1, 1, 1, 2)
    assert a.filter == b.filter and b.captions and plan.captions[b.captions]["filter"] == b.filter
    assert plan.trainings[b.lora]["filter"] == b.captions  # the training folder's key
    assert sorted(plan.encodings[b.encoding]["filters"]) == sorted([a.filter, b.captions])


def test_a_template_edit_is_a_new_caption_job_and_reaching_the_server_is_none(demo):
    template = {"caption": {**CAPTIONED["caption"], "template": "{caption}"}}
    runtime = {"caption": {**CAPTIONED["caption"], "timeout_s": 5.0, "max_retries": 0, "api_key_env": None}}
    plan = plan_jobs(variants_of(demo, [{"name": "a", **CAPTIONED}, {"name": "b", **template}, {"name": "c", **runtime}]))
    a, b, c = (plan.variants[n] for n in "abc")
    assert a.captions != b.captions and a.captions == c.captions and a.lora == c.lora
    assert "timeout_s" not in plan.captions[a.captions]["caption"]
    assert plan.captions[a.captions]["trigger"] == demo["bundle"]["trigger_words"]


@pytest.mark.parametrize("caption, words", [
    ({"backend": "openai"}, "config key 'caption.model': required when caption.backend is 'openai'"),
    ({"backend": "data_juicer", "model": "m", "template": "{style}，{caption}"},
     "config key 'caption.template': unknown field {style}"),
    ({"backend": "none", "template": "{style}"}, None),  # not checked: nothing is captioned
])
def test_caption_settings_are_checked_at_parse_time_naming_the_key(demo, caption, words):
    if words is None:
        validate({**demo, "caption": caption})
        return
    with pytest.raises(UserError) as err:
        validate({**demo, "caption": caption})
    assert words in str(err.value)


def test_the_metadata_job_gets_the_strictest_step_of_the_trainings_sharing_its_folder(demo):
    """build_metadata refuses a too small dataset for every training that reads its folder."""
    plan = plan_jobs(variants_of(demo, [
        {"name": "a", "train": {"batch_size": 2}},
        {"name": "b", "train": {"batch_size": 1, "gradient_accumulation": 2, "processes": 2}},
        {"name": "c", "train": {"batch_size": 3}},
        {"name": "imported", "train": {"use_lora": "resources/some_lora.safetensors"}},
    ]))
    (folder,) = {data_key(jobs) for jobs in plan.variants.values()}
    assert plan.step_examples(folder) == {"batch_size": 1, "gradient_accumulation": 2, "processes": 2}
    assert plan.step_examples("no-such-folder") is None
    alone = plan_jobs(variants_of(demo, [{"name": "imported", "train": {"use_lora": "resources/x.safetensors"}}]))
    assert alone.step_examples(data_key(alone.variants["imported"])) is None
