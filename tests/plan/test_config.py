"""Config validation: defaults, and refusals that name the key and what is allowed."""

import re
import subprocess
from pathlib import Path

import pytest
import yaml

from kolors_story.plan.config import (
    check_upload_token,
    is_local_model,
    load_schema,
    model_dir,
    needs_scorer,
    scene_settings,
    validate_config,
)
from kolors_story.errors import UserError
from workflow_copy import snakemake

ROOT = Path(__file__).resolve().parents[2]
SCHEMA = load_schema(ROOT / "schemas" / "config.schema.yaml")


def default_config() -> dict:
    return yaml.safe_load((ROOT / "config.yaml").read_text(encoding="utf-8"))


def test_default_config_is_valid_and_keeps_the_baseline_values():
    config = validate_config(default_config(), SCHEMA)
    assert config["train"]["rank"] == 16 and config["train"]["alpha"] == 4
    assert config["train"]["steps"] == 500 and config["train"]["resolution"] == 1024
    assert len(config["story"]["scenes"]) == 8
    assert config["layout"] == {"columns": 2, "rows": 4, "gap": 0, "margin": None, "style": "grid"}


def test_minimal_config_gets_every_default_from_the_schema():
    config = validate_config({"story": {"scenes": [{"id": "a", "prompt": "p"}]}}, SCHEMA)
    assert config["run"] == "baseline"
    assert config["models"]["kolors"] == "Kwai-Kolors/Kolors-diffusers"
    assert config["filter"]["ops"][0] == {"image_shape_filter": {"min_width": 1024, "min_height": 1024}}
    assert config["train"]["target_modules"] == ["to_q", "to_k", "to_v", "to_out.0"]
    assert config["upload"]["enabled"] is False


def test_every_schema_property_has_a_description():
    def walk(schema, path):
        for key, sub in schema.get("properties", {}).items():
            assert sub.get("description"), f"{path}{key} has no description"
            walk(sub, f"{path}{key}.")
            if isinstance(sub.get("items"), dict):
                walk(sub["items"], f"{path}{key}[].")

    walk(SCHEMA, "")


@pytest.mark.parametrize(
    "edit, expected",
    [
        (lambda c: c.update(colour="red"), "'colour' was unexpected"),
        (lambda c: c["train"].update(steps=-5), "config key 'train.steps'"),
        (lambda c: c["train"].update(precision="fp8"), "Allowed: fp32, bf16, fp16"),
        (lambda c: c["story"]["scenes"][2].pop("prompt"), "scene s3_dream"),
        (lambda c: c["story"]["scenes"][1].update(id=c["story"]["scenes"][0]["id"]), "duplicate scene id"),
        (lambda c: c["generate"].update(sampler="plms"), "Allowed: euler, ddim, dpmpp_2m"),
        (lambda c: c["dataset"].update(source="local", path=None), "dataset.path"),
        (lambda c: c["dataset"].update(caption_template="no placeholder"), "dataset.caption_template"),
        (lambda c: c["upload"].update(enabled=True, repo_id=None), "upload.repo_id"),
    ],
)
def test_bad_values_are_refused_with_the_key(edit, expected):
    config = default_config()
    edit(config)
    with pytest.raises(UserError, match=expected.replace("[", r"\[").replace("(", r"\(")):
        validate_config(config, SCHEMA)


def test_missing_scene_prompt_message_says_what_is_required():
    config = default_config()
    config["story"]["scenes"][0].pop("prompt")
    with pytest.raises(UserError) as err:
        validate_config(config, SCHEMA)
    assert "give a `prompt`, or an `action`" in str(err.value)


def test_upload_without_token_fails_before_anything_runs(monkeypatch):
    config = validate_config(default_config(), SCHEMA)
    config["upload"].update(enabled=True, repo_id="me/lora")
    monkeypatch.delenv("MODELSCOPE_API_TOKEN", raising=False)
    with pytest.raises(UserError, match="MODELSCOPE_API_TOKEN"):
        check_upload_token(config)
    monkeypatch.setenv("MODELSCOPE_API_TOKEN", "secret")
    check_upload_token(config)


def test_scene_settings_resolve_overrides_and_derived_seeds():
    config = default_config()
    config["generate"]["seed"] = 100
    config["story"]["scenes"][1].update(seed=7, width=768, negative_prompt="no")
    scenes = scene_settings(validate_config(config, SCHEMA))
    first, second, third = list(scenes.values())[:3]
    assert first["seed"] == 100 and third["seed"] == 102
    assert second["seed"] == 7 and second["width"] == 768 and second["height"] == 1024
    assert second["negative_prompt"] == "no"
    assert first["negative_prompt"] == config["story"]["negative_prompt"]


def test_model_references_are_ids_or_local_folders(tmp_path):
    assert not is_local_model("Kwai-Kolors/Kolors-diffusers")
    assert model_dir("Kwai-Kolors/Kolors-diffusers") == "resources/modelscope/Kwai-Kolors/Kolors-diffusers"
    assert is_local_model("resources/tiny/kolors") and is_local_model("./models/k")
    assert is_local_model(str(tmp_path))


# ---------------------------------------------------------------- cross-field rules at parse time
def demo_config() -> dict:
    """The demo merged over config.yaml, as snakemake --configfile demo/config.yaml does."""
    config = default_config()
    for key, value in yaml.safe_load((ROOT / "demo" / "config.yaml").read_text(encoding="utf-8")).items():
        config[key] = {**config.get(key, {}), **value} if isinstance(value, dict) else value
    return config


def set_characters(c, names):
    c["story"]["characters"] = {n: "someone" for n in names}


@pytest.mark.parametrize(
    "edit, expected",
    [
        (lambda c: c["dataset"].update(caption_template="{caption} {style}"),
         "dataset.caption_template '{caption} {style}' uses unknown placeholder(s) ['style']"),
        (lambda c: c["story"].update(prompt_template="{style}，{mood}"), "story.prompt_template': unknown field(s) 'mood'"),
        (lambda c: c["story"].update(prompt_template="{style}，{}"), "story.prompt_template': unknown field(s) ''"),
        (lambda c: c["story"].update(prompt_template="{style"), "story.prompt_template': '{style' is not a valid"),
        (lambda c: c["layout"].update(columns=2, rows=3), "'layout.columns' / 'layout.rows': 2 x 3 = 6 cells hold "
                                                          "fewer than the 8 scenes"),
        (lambda c: c["generate"].update(width=1020), "config key 'generate.width': 1020 is not a multiple of 8"),
        (lambda c: c["story"]["scenes"][1].update(height=500), "config key 'story.scenes[1].height': 500 is not a multiple of 8"),
        (lambda c: c["train"].update(resolution=1020), "config key 'train.resolution'"),
        (lambda c: c["train"]["validation"].update(size=100), "config key 'train.validation.size'"),
        (lambda c: c["train"].update(bucketing=True, resolution=64, bucket_step=128), "'train.bucket_step': 128 is larger"),
        (lambda c: c["story"]["scenes"][3].update(characters=["ghost"]),
         "'story.scenes[3].characters' (scene s4_prince): unknown character(s) ['ghost']"),
        (lambda c: c["story"]["scenes"][0].update(characters=["girl", "girl"]), "['girl'] listed twice"),
        (lambda c: c["story"]["scenes"][1].update(id="S1_Class"), "duplicate scene id(s) S1_Class, s1_class"),
        (lambda c: set_characters(c, ["girl", "Girl"]), "names Girl, girl differ only in case"),
        (lambda c: set_characters(c, ["a/b", "少女"]), "name(s) ['a/b'] cannot be file names"),
        (lambda c: set_characters(c, ["s1_class"]), "s1_class names both a scene and a character"),
        (lambda c: c["dataset"].update(background="transparent-ish"), "dataset.background 'transparent-ish' is not a colour"),
    ],
)
def test_cross_field_rules_are_refused_with_the_key(edit, expected):
    assert_refused(edit, expected)


def assert_refused(edit, expected):
    config = default_config()
    config["story"]["characters"] = {"girl": "一个黑色长发少女"}
    edit(config)
    with pytest.raises(UserError) as err:
        validate_config(config, SCHEMA)
    assert expected in str(err.value)


def test_scenes_with_their_own_prompt_still_name_known_characters():
    config = default_config()  # every scene has a prompt: the template is not used
    config["story"]["scenes"][0]["characters"] = ["girl"]
    with pytest.raises(UserError, match=r"story\.scenes\[0\]\.characters.*defined: none"):
        validate_config(config, SCHEMA)


def test_every_problem_is_reported_at_once():
    config = default_config()
    config["layout"]["rows"] = 1
    config["dataset"]["caption_template"] = "{caption} {style}"
    config["upload"].update(enabled=True, repo_id=None)
    with pytest.raises(UserError, match=r"3 problem\(s\)") as err:
        validate_config(config, SCHEMA)
    for key in ("layout.rows", "dataset.caption_template", "upload.repo_id"):
        assert key in str(err.value)


def test_demo_config_and_unicode_character_names_pass():
    validate_config(demo_config(), SCHEMA)
    config = demo_config()
    config["story"]["characters"] = {"少女": "一个黑色长发少女", "prince.v2": "王子"}
    for scene in config["story"]["scenes"]:
        scene["characters"] = ["少女" if n == "girl" else "prince.v2" for n in scene["characters"]]
    validate_config(config, SCHEMA)


# ---------------------------------------------------------------- one decision: the scorer
@pytest.mark.parametrize("candidates, lora_scale, expected", [
    (1, 1.0, False), (1, [0.8], False), (3, 1.0, True), (1, [0.5, 1.0], True), (2, (0.5, 1.0), True),
])
def test_needs_scorer_counts_every_image_a_scene_job_renders(candidates, lora_scale, expected):
    assert needs_scorer(candidates, lora_scale) is expected


def test_render_scene_refuses_a_sweep_without_the_predictor_before_loading_anything(tmp_path):
    from kolors_story.render.scenes import RenderInputs, SamplerSettings, Scene, render_scene

    settings = SamplerSettings(lora_scale=(0.5, 1.0))  # no model folder: it must fail before loading
    with pytest.raises(ValueError, match="generate.lora_scale.*models.aesthetic"):
        render_scene(RenderInputs(tmp_path / "none", tmp_path / "none.safetensors"), Scene("a", "p"), settings,
                     tmp_path / "a.png")


def dry_run(tmp_path: Path, overrides: dict) -> subprocess.CompletedProcess:
    """snakemake -n with the demo config plus overrides, in a copy of the workflow."""
    (tmp_path / "override.yaml").write_text(yaml.safe_dump(overrides), encoding="utf-8")
    return snakemake(tmp_path, "-n", "--configfile", "demo/config.yaml", "override.yaml")


def scene_inputs(out: str) -> list[str]:
    return re.findall(r"rule generate_scene:\n\s+input: (.*)", out)


def test_the_rules_give_a_sweep_its_scorer_and_refuse_bad_configs_at_parse_time(tmp_path):
    sweep = dry_run(tmp_path, {"generate": {"candidates": 1, "lora_scale": [0.5, 1.0], "consistency": {"enabled": False}}})
    assert sweep.returncode == 0, sweep.stderr[-3000:]
    inputs = scene_inputs(sweep.stdout)
    assert len(inputs) == 8 and all("resources/tiny/aesthetic" in i for i in inputs)
    single = dry_run(tmp_path, {"generate": {"candidates": 1, "lora_scale": 1.0}})
    assert single.returncode == 0 and not any("aesthetic" in i for i in scene_inputs(single.stdout))
    refused = dry_run(tmp_path, {"layout": {"rows": 3}})
    assert refused.returncode != 0
    assert "'layout.columns' / 'layout.rows': 2 x 3 = 6 cells" in refused.stdout + refused.stderr


LONG = "水墨画，山水，" * 70
LONG_TEXTS = [
    (lambda c: c["story"].update(negative_prompt=LONG), "config key 'story.negative_prompt'"),
    (lambda c: c["story"]["scenes"][2].update(negative_prompt=LONG), "config key 'story.scenes[2].negative_prompt'"),
    (lambda c: c["story"]["scenes"][0].update(prompt=LONG), "config key 'story.scenes[0].prompt' (scene s1_class)"),
    (lambda c: c["train"]["validation"].update(prompts=[{"prompt": LONG, "negative_prompt": ""}]),
     "config key 'train.validation.prompts[0].prompt'"),
    (lambda c: c["dataset"].update(caption_template=LONG + "{caption}"),
     "config key 'dataset.caption_template' (its own words, with an empty caption)"),
]


@pytest.mark.parametrize("edit, expected", LONG_TEXTS)
def test_every_text_that_reaches_chatglm_is_held_to_256_tokens_naming_its_key(edit, expected):
    from kolors_story.chatglm_tokens import count_tokens

    assert_refused(edit, f"{expected}: {count_tokens(LONG)} tokens, more than ChatGLM's 256")


def test_truncation_opted_in_accepts_every_long_text_at_parse_time(caplog):
    config = default_config()
    config["story"]["truncate_long_prompts"] = True
    for edit, _ in LONG_TEXTS:
        edit(config)
    validate_config(config, SCHEMA)
    assert "tokens" not in caplog.text  # said once, in the encode job's log (test_prompt_embeddings)
    # ...and the run's manifest and report list each cut with the words it loses
    from kolors_story.plan.prompts import cut_texts

    cuts = cut_texts(config)
    assert [c["where"] for c in cuts] == [LONG_TEXTS[i][1] for i in (0, 2, 1, 3, 4)]  # the config's order
    assert all(c["dropped"] and c["dropped"].replace(" ", "") in LONG + "{caption}" for c in cuts)


def rule_block(out: str, rule: str) -> str:
    """The dry run's description of rule `rule`'s first job ("" when none is planned)."""
    match = re.search(rf"^(?:local)?rule {rule}:\n((?:\s+.*\n)+)", out, re.M)
    return match.group(1) if match else ""


def test_the_rules_plan_a_captioner_only_where_asked_with_its_model_and_gpu(tmp_path):
    plain = dry_run(tmp_path, {})
    assert plain.returncode == 0 and not rule_block(plain.stdout, "caption_images")
    hub = dry_run(tmp_path, {"caption": {"backend": "data_juicer", "model": "Salesforce/blip-image-captioning-base"}})
    assert hub.returncode == 0, hub.stderr[-3000:]
    job = rule_block(hub.stdout, "caption_images")
    assert "resources/modelscope/Salesforce/blip-image-captioning-base" in job and "gpu=1" in job
    assert "output: resources/modelscope/Salesforce/blip-image-captioning-base" in rule_block(hub.stdout, "download_model")
    assert "results/shared/captions/" in rule_block(hub.stdout, "build_metadata")
    api = dry_run(tmp_path, {"caption": {"backend": "openai", "model": "qwen-vl-plus"}})
    job = rule_block(api.stdout, "caption_images")
    assert api.returncode == 0 and job and "gpu=1" not in job and "modelscope" not in job
    missing = dry_run(tmp_path, {"caption": {"backend": "data_juicer", "model": "resources/nope"}})
    assert missing.returncode != 0 and "caption.model: local folder 'resources/nope' does not exist" in missing.stdout + missing.stderr


LONG_NAME = "s" + "x" * 260  # 261 characters: passed validation, then died with OSError File name too long


@pytest.mark.parametrize(
    "change, key",
    [
        (lambda c: c["story"]["scenes"][0].update(id=LONG_NAME), "story.scenes[0].id"),
        (lambda c: c.update(run=LONG_NAME), "run"),
        (lambda c: c["story"].setdefault("characters", {}).update({LONG_NAME: "someone"}), "story.characters"),
        (lambda c: c.update(sweep=[{"name": LONG_NAME}]), "sweep[0].name"),
        (lambda c: c["story"].update(outline=[{"id": LONG_NAME, "description": "d"}], scenes=None), "story.outline[0].id"),
    ],
    ids=["scene", "run", "character", "variant", "outline"],
)
def test_names_that_become_paths_are_bounded_at_parse_time(change, key):
    """Every name that becomes a file or folder name is refused when the config is parsed, naming
    the key and the limit, not late with a raw OSError (the 255-byte file name limit)."""
    config = default_config()
    change(config)
    with pytest.raises(UserError) as info:
        validate_config(config, SCHEMA)
    message = str(info.value)
    assert f"config key '{key}'" in message and "is too long" in message and "at most 64 characters" in message


def test_the_name_limit_is_one_number_in_the_schema_and_the_code():
    from kolors_story.plan.sweep import NAME_MAX

    story = SCHEMA["properties"]["story"]["properties"]
    limits = [SCHEMA["properties"]["run"]["maxLength"], story["characters"]["propertyNames"]["maxLength"],
              story["scenes"]["items"]["properties"]["id"]["maxLength"],
              story["outline"]["items"]["properties"]["id"]["maxLength"],
              SCHEMA["properties"]["sweep"]["items"]["properties"]["name"]["maxLength"]]
    assert limits == [NAME_MAX] * 5


def test_a_grid_name_grown_past_the_limit_is_refused_naming_it():
    from kolors_story.plan.sweep import expand_sweep

    config = {**default_config(), "sweep": [{"name": "n" * 60, "grid": {"train.rank": [8, 16]}}]}
    with pytest.raises(UserError, match=r"config key 'sweep': variant name\(s\) \['n{60}-rank8', 'n{60}-rank16'\] "
                                        r"are longer than 64 characters"):
        expand_sweep(validate_config(config, SCHEMA), lambda c: validate_config(c, SCHEMA))
