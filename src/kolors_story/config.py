"""Config validation: JSON Schema with defaults, plus the checks a schema cannot express.

Errors name the config key (dotted path, list items as [i]) and what is allowed, so that a wrong
value is refused when the workflow is parsed, before any job runs.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from kolors_story.errors import UserError
from kolors_story.prompts import assemble_prompt, check_length

TOKEN_ENV = "MODELSCOPE_API_TOKEN"
LOCAL_PREFIXES = ("/", "./", "../", "~", "resources/")


def load_schema(path: Path) -> dict:
    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f)


def _key_path(error: jsonschema.ValidationError) -> str:
    parts = ""
    for p in error.absolute_path:
        parts += f"[{p}]" if isinstance(p, int) else (f".{p}" if parts else str(p))
    return parts or "<top level>"


def _describe(error: jsonschema.ValidationError) -> str:
    key = _key_path(error)
    if error.validator == "additionalProperties":
        allowed = ", ".join(sorted(error.schema.get("properties", {})))
        return f"config key '{key}': {error.message}. Allowed keys here: {allowed}"
    if error.validator == "enum":
        allowed = ", ".join(map(str, error.validator_value))
        return f"config key '{key}': {error.instance!r} is not allowed. Allowed: {allowed}"
    hint = error.schema.get("description", "")
    return f"config key '{key}': {error.message}." + (f" ({hint.strip()})" if hint else "")


def _fill_defaults(instance: Any, schema: dict) -> None:
    """Set schema defaults for missing keys, recursing into objects and arrays of objects."""
    if isinstance(instance, dict):
        for key, sub in schema.get("properties", {}).items():
            if key not in instance and "default" in sub:
                instance[key] = copy.deepcopy(sub["default"])
            if key in instance:
                _fill_defaults(instance[key], sub)
    elif isinstance(instance, list) and isinstance(schema.get("items"), dict):
        for item in instance:
            _fill_defaults(item, schema["items"])


def validate_config(config: dict, schema: dict) -> dict:
    """Return a copy of `config` with defaults filled in; raise UserError on any invalid value."""
    config = copy.deepcopy(config)
    _fill_defaults(config, schema)
    validator = jsonschema.Draft7Validator(schema)
    errors = sorted(validator.iter_errors(config), key=lambda e: list(e.absolute_path))
    if errors:
        lines = "\n".join(f"  - {_describe(e)}" for e in errors)
        raise UserError(f"Invalid configuration ({len(errors)} problem(s)):\n{lines}")
    _check_semantics(config)
    return config


def _check_semantics(config: dict) -> None:
    ids = [scene["id"] for scene in config["story"]["scenes"]]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise UserError(
            f"config key 'story.scenes': duplicate scene id(s) {', '.join(duplicates)}; "
            "each scene needs its own id (it names the panel file)."
        )
    for scene in config["story"]["scenes"]:
        if not scene.get("prompt") and not scene.get("action"):
            raise UserError(
                f"config key 'story.scenes' (scene {scene['id']}): give a `prompt`, or an `action` "
                "(with `characters` and `setting`) to fill story.prompt_template."
            )
    scene_settings(config)  # assembles every prompt: unknown characters and long prompts fail here
    dataset = config["dataset"]
    if dataset["source"] == "local" and not dataset.get("path"):
        raise UserError("config key 'dataset.path': required when dataset.source is 'local'.")
    if "{caption}" not in dataset["caption_template"]:
        raise UserError(
            "config key 'dataset.caption_template': must contain '{caption}', "
            f"got {dataset['caption_template']!r}."
        )
    validation = config["train"]["validation"]
    if validation["every"] and not validation["prompts"]:
        raise UserError(
            "config key 'train.validation.prompts': give at least one prompt when "
            "train.validation.every > 0 (or set every: 0)."
        )
    upload = config["upload"]
    if upload["enabled"] and not upload.get("repo_id"):
        raise UserError("config key 'upload.repo_id': required when upload.enabled is true.")


def check_upload_token(config: dict) -> None:
    """An enabled upload without a token must fail before any training, not after."""
    if config["upload"]["enabled"] and not os.environ.get(TOKEN_ENV):
        raise UserError(
            f"config key 'upload.enabled' is true but the environment variable {TOKEN_ENV} is "
            f"not set. Export your ModelScope access token (export {TOKEN_ENV}=...) or set "
            "upload.enabled: false. The token is never read from config files."
        )


def is_local_model(ref: str) -> bool:
    """A model reference is a local folder if it looks like a path or exists; else a ModelScope id."""
    return ref.startswith(LOCAL_PREFIXES) or Path(ref).expanduser().exists()


def model_dir(ref: str) -> str:
    """Where the workflow finds a model: the local folder itself, or the download target of an id."""
    if is_local_model(ref):
        return str(Path(ref).expanduser())
    return f"resources/modelscope/{ref}"


def scene_settings(config: dict) -> dict[str, dict]:
    """Each scene's fully resolved generation settings, keyed by scene id (story order kept).
    Only what a scene's image depends on is here, so editing one scene changes one entry."""
    gen, story = config["generate"], config["story"]
    resolved = {}
    for index, scene in enumerate(story["scenes"]):
        prompt = assemble_prompt(scene, story)
        check_length(scene["id"], prompt, story["truncate_long_prompts"])
        resolved[scene["id"]] = {
            "id": scene["id"],
            "index": index,
            "prompt": prompt,
            "negative_prompt": scene.get("negative_prompt", story["negative_prompt"]),
            "caption": scene.get("caption") or scene.get("action") or prompt,
            "characters": list(scene.get("characters", [])),
            "seed": scene.get("seed", gen["seed"] + index),
            "width": scene.get("width", gen["width"]),
            "height": scene.get("height", gen["height"]),
        }
    return resolved
