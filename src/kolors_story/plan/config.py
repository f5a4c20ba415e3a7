"""Config validation: JSON Schema with defaults, plus the checks a schema cannot express.

Errors name the config key (dotted path, list items as [i]) and what is allowed, so that a wrong
value is refused when the workflow is parsed, before any job runs.
"""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from kolors_story.errors import UserError
from kolors_story.render.panel_choice import needs_scorer  # noqa: F401 (the rules' and tests' name for it)
from kolors_story.plan.prompts import assemble_prompt, check_prompt_template, check_text_lengths
from kolors_story.writing.captions import check_template

TOKEN_ENV = "MODELSCOPE_API_TOKEN"
CHARACTER_NAME = re.compile(r"\w[\w.-]*")  # a file name (anchors/<name>.safetensors); CJK is fine
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
    if error.validator == "maxLength":  # a name that becomes a path (sweep.NAME_MAX): shown cut, with the count
        shown = error.instance if len(error.instance) <= 24 else error.instance[:24] + "..."
        return (f"config key '{key}': {shown!r} is too long: {len(error.instance)} characters, at most "
                f"{error.validator_value} characters (it names a file or folder)")
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
    """Return a copy of `config` with defaults filled in; raise UserError on any invalid value.
    A story given as story.outline comes back without story.scenes: the prompt writer's job gives
    them (kolors_story.plan.outline); its outline is checked here as scenes would be."""
    config = copy.deepcopy(config)
    story = config.get("story")
    for key in ("scenes", "outline"):  # null: a sweep variant turning the base's scenes into an outline
        if isinstance(story, dict) and key in story and story[key] is None:
            del story[key]
    _fill_defaults(config, schema)
    validator = jsonschema.Draft7Validator(schema)
    errors = sorted(validator.iter_errors(config), key=lambda e: list(e.absolute_path))
    if errors:
        lines = "\n".join(f"  - {_describe(e)}" for e in errors)
        raise UserError(f"Invalid configuration ({len(errors)} problem(s)):\n{lines}")
    story = config["story"]
    if "scenes" in story and "outline" in story:
        raise UserError(_BOTH)
    if "scenes" not in story and "outline" not in story:
        raise UserError("config key 'story.scenes': required: the story's scenes, in order (see config.yaml), "
                        "or story.outline for the prompt writer to write them.")
    if "outline" in story:
        _check_outline(config)
    else:
        _check_semantics(config)
    return config


_BOTH = ("config keys 'story.scenes' and 'story.outline': both given; the workflow renders story.scenes as "
         "written, or writes them from story.outline. Keep one (after pasting a prompts.yaml under "
         "story.scenes, delete story.outline; a sweep variant over a base with scenes sets `story: {scenes: null}`).")


def _outline_as_scenes(story: dict) -> list[dict]:
    """The outline as scenes with stand-in prompts (their own, or the description) for the checks."""
    keep = ("id", "characters", "negative_prompt", "seed", "width", "height")
    return [{**{k: item[k] for k in keep if k in item}, "prompt": item.get("prompt") or item["description"]}
            for item in story["outline"]]


def _check_outline(config: dict) -> None:
    """An outline gets a scene's checks (ids, characters, layout, lengths), named by its own key."""
    stand_in = {**config, "story": {**config["story"], "scenes": _outline_as_scenes(config["story"])}}
    stand_in["story"].pop("outline")
    try:
        _check_semantics(stand_in)
    except UserError as err:
        raise UserError(str(err).replace("story.scenes", "story.outline")) from None


def validate_outline(config: dict, schema: dict) -> dict:
    """For the prompt writer's command: `config` valid, with a story.outline to write from."""
    config = validate_config(config, schema)
    if "outline" not in config["story"]:
        raise UserError("config key 'story.outline': required by the prompt writer: one {id, description} a scene")
    return config


def _check_semantics(config: dict) -> None:
    """Cross-field rules the stages rely on, all reported at once, each naming its key and fix."""
    problems = [
        *_check_ids(config["story"]),
        *_check_scenes(config["story"]),
        *_check_templates(config),
        *_check_lengths(config),
        *_check_layout(config["layout"], len(config["story"]["scenes"])),
        *_check_sizes(config["train"]),
        *_check_switches(config),
    ]
    if problems:
        lines = "\n".join(f"  - {p}" for p in problems)
        raise UserError(f"Invalid configuration ({len(problems)} problem(s)):\n{lines}")
    scene_settings(config)  # assembles every prompt


def _duplicates(names: list[str]) -> list[str]:
    """Names that collide, ignoring case: on macOS and Windows s1.png and S1.png are one file."""
    folded = [n.casefold() for n in names]
    return sorted({n for n, f in zip(names, folded) if folded.count(f) > 1})


def _check_ids(story: dict) -> list[str]:
    """Scene ids and character names become wildcards and file names: unique, usable as both."""
    ids, names = [s["id"] for s in story["scenes"]], list(story["characters"])
    problems = []
    if duplicates := _duplicates(ids):
        problems.append(f"config key 'story.scenes': duplicate scene id(s) {', '.join(duplicates)}; "
                        "each scene needs its own id (it names the panel file; case is ignored).")
    if duplicates := _duplicates(names):
        problems.append(f"config key 'story.characters': names {', '.join(duplicates)} differ only in "
                        "case; each character needs its own name (it names its anchor file).")
    bad = [n for n in names if not CHARACTER_NAME.fullmatch(n)]
    if bad:
        problems.append(f"config key 'story.characters': name(s) {bad} cannot be file names; use "
                        "letters, digits, _, - and . (starting with a letter or digit).")
    if shared := sorted({i.casefold() for i in ids} & {n.casefold() for n in names}):
        problems.append(f"config keys 'story.scenes' and 'story.characters': {', '.join(shared)} names "
                        "both a scene and a character; rename one (ids are unique across both).")
    return problems


def _check_scenes(story: dict) -> list[str]:
    problems, known = [], story["characters"]
    for i, scene in enumerate(story["scenes"]):
        key = f"story.scenes[{i}]"
        if not scene.get("prompt") and not scene.get("action"):
            problems.append(f"config key '{key}' (scene {scene['id']}): give a `prompt`, or an `action` "
                            "(with `characters` and `setting`) to fill story.prompt_template.")
        shown = scene.get("characters", [])
        # Checked with or without `prompt`: the names also pick the scene's anchors and scores.
        if unknown := [n for n in shown if n not in known]:
            problems.append(f"config key '{key}.characters' (scene {scene['id']}): unknown character(s) "
                            f"{unknown}; define them under story.characters (defined: {sorted(known) or 'none'}).")
        if twice := sorted({n for n in shown if shown.count(n) > 1}):
            problems.append(f"config key '{key}.characters' (scene {scene['id']}): {twice} listed twice; "
                            "name each character once.")
        prompts = [assemble_prompt(scene, story), *scene.get("alternatives", [])]
        if len(set(prompts)) < len(prompts):
            problems.append(f"config key '{key}.alternatives' (scene {scene['id']}): a prompt given twice; each "
                            "alternative must differ from the prompt and from the others.")
    return problems


def _check_templates(config: dict) -> list[str]:
    """The stages' own template checks, run now: a bad field fails before any job starts."""
    from kolors_story.data.text_files import check_caption_template  # here: the data stage pulls in Pillow
    from kolors_story.data.images import parse_background

    problems = []
    checks = ((check_caption_template, config["dataset"]["caption_template"]),
              (check_prompt_template, config["story"]["prompt_template"]),
              (parse_background, config["dataset"]["background"]))
    if config["caption"]["backend"] != "none":
        checks += ((check_template, config["caption"]["template"]),)
    for check, value in checks:
        try:
            check(value)
        except UserError as err:
            problems.append(str(err))
    return problems


def _check_lengths(config: dict) -> list[str]:
    """Texts over ChatGLM's 256 tokens; a bad template is reported by _check_templates instead."""
    try:
        return check_text_lengths(config)
    except (UserError, KeyError, ValueError, IndexError):
        return []


def _check_layout(layout: dict, n_scenes: int) -> list[str]:
    cells = layout["columns"] * layout["rows"]
    if cells >= n_scenes:
        return []
    rows = -(-n_scenes // layout["columns"])
    return [f"config keys 'layout.columns' / 'layout.rows': {layout['columns']} x {layout['rows']} = "
            f"{cells} cells hold fewer than the {n_scenes} scenes; raise them so that columns x rows "
            f">= {n_scenes} (e.g. layout.rows: {rows})."]


def _check_sizes(train: dict) -> list[str]:
    """Panel and training sizes are multiples of 8 by the schema (KolorsPipeline.check_inputs and
    the VAE need it); bucketing also needs a bucket side no larger than the resolution."""
    if train["bucketing"] and train["bucket_step"] > train["resolution"]:
        return [f"config key 'train.bucket_step': {train['bucket_step']} is larger than "
                f"train.resolution {train['resolution']}, so every bucket would be larger than the "
                "training size; lower train.bucket_step (e.g. 64) or raise train.resolution."]
    return []


def _check_switches(config: dict) -> list[str]:
    """Options that need another key set."""
    problems = []
    dataset = config["dataset"]
    if dataset["source"] == "local" and not dataset.get("path"):
        problems.append("config key 'dataset.path': required when dataset.source is 'local'.")
    validation = config["train"]["validation"]
    if validation["every"] and not validation["prompts"]:
        problems.append("config key 'train.validation.prompts': give at least one prompt when "
                        "train.validation.every > 0 (or set every: 0).")
    caption = config["caption"]
    if caption["backend"] != "none" and not caption.get("model"):
        example = "resources/tiny/blip or a BLIP-2 ModelScope id" if caption["backend"] == "data_juicer" else "qwen-vl-plus"
        problems.append(f"config key 'caption.model': required when caption.backend is "
                        f"'{caption['backend']}' (e.g. {example}).")
    upload = config["upload"]
    if upload["enabled"] and not upload.get("repo_id"):
        problems.append("config key 'upload.repo_id': required when upload.enabled is true.")
    return problems


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
        resolved[scene["id"]] = {
            "id": scene["id"],
            "index": index,
            "prompt": prompt,
            "alternatives": list(scene.get("alternatives", [])),
            "negative_prompt": scene.get("negative_prompt", story["negative_prompt"]),
            "caption": scene.get("caption") or scene.get("action") or prompt,
            "characters": list(scene.get("characters", [])),
            "seed": scene.get("seed", gen["seed"] + index),
            "width": scene.get("width", gen["width"]),
            "height": scene.get("height", gen["height"]),
        }
    return resolved
