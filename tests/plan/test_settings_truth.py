"""One source of truth: schemas/config.schema.yaml. The library's settings dataclasses match it
field for field (names, types, defaults), and every config key an error message names exists.

Adding a setting to the schema or to a dataclass and forgetting the other fails here; a deliberate
difference is listed below with its reason.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import operator
import re
import typing
from pathlib import Path

import pytest

from kolors_story.writing.llm_client import ChatSettings
from kolors_story.writing.captions import CaptionSettings
from kolors_story.render import character_sharing

from kolors_story.plan import prompts
from kolors_story.plan.config import load_schema, validate_config
from kolors_story.render.scenes import Consistency, SamplerSettings, Scene
from kolors_story.training.settings import TrainSettings

ROOT = Path(__file__).resolve().parents[2]
SCHEMA = load_schema(ROOT / "schemas" / "config.schema.yaml")
SCALARS = {"integer": int, "number": float, "boolean": bool, "string": str, "null": type(None)}

# Config keys a dataclass does not hold, by schema path, with the reason.
ONLY_IN_SCHEMA = {
    "train": {
        "processes": "how many processes launch the trainer (rule resources, accelerate launch), "
                     "not a setting of the optimisation; the train_lora rule passes it apart",
        "use_lora": "selects rule import_lora instead of training; the trainer never sees it",
    },
    "generate": {
        "seed": "per scene: Scene.seed (base + position unless the scene sets one)",
        "width": "per scene: Scene.width", "height": "per scene: Scene.height",
        "consistency": "its own dataclass, Consistency",
    },
    "generate.consistency": {
        "enabled": "the rules' switch (whether anchors are rendered and passed), not a job setting",
        "seed": "the anchors' seed: the Scene.seed of each anchor job",
    },
}
# Dataclass fields that are not config keys, by schema path, with the reason.
ONLY_IN_DATACLASS: dict[str, dict[str, str]] = {
    "prompt_writer": {"owner": "the config section its errors name: prompt_writer, or caption when the "
                               "captioner uses the same client (CaptionSettings.chat_settings)"},
}
PAIRS = [(TrainSettings, "train"), (SamplerSettings, "generate"), (Consistency, "generate.consistency"),
         (ChatSettings, "prompt_writer"), (CaptionSettings, "caption")]

# Scene gathers each field from another key (config.scene_settings resolves them).
SCENE_SOURCES = {
    "id": "story.scenes[].id", "prompt": "story.scenes[].prompt",
    "negative_prompt": "story.negative_prompt", "seed": "generate.seed",
    "width": "generate.width", "height": "generate.height", "alternatives": "story.scenes[].alternatives",
}
SCENE_KEYS_NOT_IN_SCENE = {
    "characters": "pick the scene's anchors and fill {characters}; the prompt holds the result",
    "action": "fills {action} of the prompt", "setting": "fills {setting} of the prompt",
    "caption": "text under the panel on the story page, not an input of the image",
}


def schema_at(key: str) -> dict | None:
    """The schema of a dotted key (`train.validation.every`, `story.scenes[3].id`), or None."""
    node = SCHEMA
    for part in re.findall(r"[^.\[\]]+|\[\w*\]", key):
        node = node.get("items") if part.startswith("[") else node.get("properties", {}).get(part)
        if not isinstance(node, dict):
            return None
    return node


def schema_hint(sub: dict) -> object:
    """The Python type a dataclass field holding this schema value should be annotated with."""
    if "oneOf" in sub:
        return functools.reduce(operator.or_, [schema_hint(s) for s in sub["oneOf"]])
    if "enum" in sub:
        return functools.reduce(operator.or_, sorted({type(v) for v in sub["enum"]}, key=str))
    kinds = sub["type"] if isinstance(sub["type"], list) else [sub["type"]]
    hints = [tuple[schema_hint(sub["items"]), ...] if k == "array" else SCALARS[k] for k in kinds]
    return functools.reduce(operator.or_, hints)


def field_default(f: dataclasses.Field) -> object:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def plain(value: object) -> object:
    """Tuples as lists, as the YAML and JSON of the config hold them."""
    return [plain(v) for v in value] if isinstance(value, (tuple, list)) else value


def mismatches(cls: type, schema: dict, path: str) -> list[str]:
    """Differences between a dataclass and the schema object at `path`, nested ones included."""
    props, hints = schema["properties"], typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    problems = []
    missing = set(props) - names - set(ONLY_IN_SCHEMA.get(path, {}))
    extra = names - set(props) - set(ONLY_IN_DATACLASS.get(path, {}))
    if missing:
        problems.append(f"{cls.__name__} lacks {path} key(s) {sorted(missing)}")
    if extra:
        problems.append(f"{cls.__name__} field(s) {sorted(extra)} are not keys of {path}")
    for f in dataclasses.fields(cls):
        if f.name in props:
            problems += field_mismatches(f, hints[f.name], props[f.name], f"{path}.{f.name}")
    return problems


def field_mismatches(f: dataclasses.Field, hint: object, sub: dict, key: str) -> list[str]:
    if sub.get("type") == "object":  # a nested dataclass, compared key by key
        if not dataclasses.is_dataclass(hint):
            return [f"{key}: an object in the schema, but the field is {hint}"]
        return mismatches(hint, sub, key)
    problems = []
    items = sub.get("items", {})
    if items.get("type") == "object":  # tuple[<dataclass>, ...]
        element = typing.get_args(hint)[0]
        problems += mismatches(element, items, f"{key}[]")
    elif hint != schema_hint(sub):
        problems.append(f"{key}: the schema says {schema_hint(sub)}, the field is annotated {hint}")
    default, schema_default = plain(field_default(f)), sub.get("default", dataclasses.MISSING)
    if default != schema_default or type(default) is bool and type(schema_default) is not bool:
        problems.append(f"{key}: schema default {schema_default!r}, dataclass default {default!r}")
    return problems


@pytest.mark.parametrize("cls, path", PAIRS, ids=[p for _, p in PAIRS])
def test_settings_dataclasses_match_the_schema_field_for_field(cls, path):
    assert mismatches(cls, schema_at(path), path) == []


def test_scene_fields_come_from_schema_keys_with_the_same_types_and_defaults():
    hints = typing.get_type_hints(Scene)
    assert {f.name for f in dataclasses.fields(Scene)} == set(SCENE_SOURCES)
    problems = []
    for f in dataclasses.fields(Scene):
        problems += field_mismatches(f, hints[f.name], schema_at(SCENE_SOURCES[f.name]), SCENE_SOURCES[f.name])
    assert problems == []
    scene_keys = set(schema_at("story.scenes[]")["properties"])
    # Every key of a scene either feeds a Scene field (an override) or is listed with its reason.
    overrides = {k.split(".")[-1] for k in SCENE_SOURCES.values()}
    assert scene_keys - overrides == set(SCENE_KEYS_NOT_IN_SCENE)


def test_module_defaults_match_the_schema():
    assert prompts.DEFAULT_TEMPLATE == schema_at("story.prompt_template")["default"]
    assert character_sharing.DEFAULT_MAX_TOKENS == schema_at("generate.consistency.max_tokens")["default"]
    assert character_sharing.DEFAULT_STEPS_FRACTION == schema_at("generate.consistency.steps_fraction")["default"]


def test_the_rules_build_dataclasses_equal_to_their_defaults_from_a_minimal_config():
    """What the rules pass (plan.job_plan's sampler and consistency settings, train.smk's train params)."""
    config = validate_config({"story": {"scenes": [{"id": "a", "prompt": "p"}]}}, SCHEMA)
    gen, train = config["generate"], config["train"]
    sampler = {k: v for k, v in gen.items() if k not in ONLY_IN_SCHEMA["generate"]}
    assert SamplerSettings(**sampler) == SamplerSettings()
    anchor = {k: v for k, v in gen["consistency"].items() if k not in ONLY_IN_SCHEMA["generate.consistency"]}
    assert Consistency(**anchor) == Consistency()
    assert TrainSettings.from_dict({k: v for k, v in train.items() if k not in ONLY_IN_SCHEMA["train"]}) == TrainSettings()


def test_a_forgotten_setting_is_caught():
    @dataclasses.dataclass(frozen=True)
    class Broken:
        sampler: str = "euler"
        steps: float = 30  # wrong type and default
        stride: int = 2  # not a config key

    problems = "\n".join(mismatches(Broken, schema_at("generate"), "generate"))
    assert "lacks generate key(s)" in problems and "guidance_scale" in problems
    assert "'stride'" in problems and "generate.steps: the schema says" in problems
    assert "schema default 50, dataclass default 30" in problems


# ---------------------------------------------------------------- keys named in messages
TOP_KEYS = "|".join(SCHEMA["properties"])
# A top-level key, then .name or [i] parts; not preceded by a word, a dot or a slash (module paths,
# file paths). File names such as story.png are not keys.
KEY = re.compile(rf"(?<![\w./\-])(?:{TOP_KEYS})(?:\.[A-Za-z_]\w*|\[\w*\])+")
FILE_SUFFIXES = {"png", "jpg", "json", "jsonl", "csv", "yaml", "txt", "safetensors", "ckpt", "log", "py", "tsv"}


def strings_in_python(path: Path) -> list[tuple[int, str]]:
    """Every string literal (f-string parts too) with its line."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return [(n.lineno, n.value) for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)]


def strings_in_rules(path: Path) -> list[tuple[int, str]]:
    literal = re.compile(r"""(["'])((?:\\.|(?!\1).)*)\1""")
    return [(i, m.group(2)) for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
            for m in literal.finditer(line)]


def named_keys() -> list[tuple[str, int, str]]:
    sources = [(p, strings_in_python(p)) for p in sorted((ROOT / "src").rglob("*.py"))]
    sources += [(p, strings_in_python(p)) for p in sorted((ROOT / "scripts").glob("*.py"))]
    sources += [(p, strings_in_rules(p)) for p in [ROOT / "Snakefile", *sorted((ROOT / "rules").glob("*.smk"))]]
    found = []
    for path, strings in sources:
        for line, text in strings:
            for key in KEY.findall(text):
                if key.rsplit(".", 1)[-1] not in FILE_SUFFIXES:
                    found.append((str(path.relative_to(ROOT)), line, key))
    return found


def test_every_config_key_named_in_a_message_exists_in_the_schema():
    found = named_keys()
    assert len(found) > 50  # the pattern still finds the keys the messages name
    unknown = [f"{path}:{line}: {key}" for path, line, key in found if schema_at(key) is None]
    assert unknown == [], "messages name config keys the schema lacks:\n" + "\n".join(unknown)


def test_the_key_pattern_and_lookup():
    assert KEY.findall("set `train.validation.every` or 'story.scenes[2].characters'; see models.kolors.") == \
        ["train.validation.every", "story.scenes[2].characters", "models.kolors"]
    assert KEY.findall("kolors_story.models.hub.py results/x/story.png") == []
    assert schema_at("story.scenes[2].characters") and schema_at("train.validation.prompts[].seed")
    assert schema_at("layout.padding") is None and schema_at("dataset.image_colum") is None
