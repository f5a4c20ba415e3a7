"""Config validation: defaults, and refusals that name the key and what is allowed."""

from pathlib import Path

import pytest
import yaml

from kolors_story.config import (
    check_upload_token,
    is_local_model,
    load_schema,
    model_dir,
    scene_settings,
    validate_config,
)
from kolors_story.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = load_schema(ROOT / "schemas" / "config.schema.yaml")


def default_config() -> dict:
    return yaml.safe_load((ROOT / "config.yaml").read_text(encoding="utf-8"))


def test_default_config_is_valid_and_keeps_the_baseline_values():
    config = validate_config(default_config(), SCHEMA)
    assert config["train"]["rank"] == 16 and config["train"]["alpha"] == 4
    assert config["train"]["steps"] == 500 and config["train"]["resolution"] == 1024
    assert len(config["story"]["scenes"]) == 8
    assert config["layout"] == {"columns": 2, "rows": 4, "gap": 0, "style": "grid"}


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
