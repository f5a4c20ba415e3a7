# Config validation, run paths and input functions shared by every rule.
import os
import re
from pathlib import Path

from kolors_story.config import (
    check_upload_token,
    is_local_model,
    load_schema,
    model_dir,
    needs_scorer,
    scene_settings,
    validate_config,
)
from kolors_story.errors import UserError
from kolors_story.panel_record import FORMAT as RECORD_FORMAT

try:
    config = validate_config(config, load_schema(Path(workflow.basedir) / "schemas/config.schema.yaml"))
    check_upload_token(config)
except UserError as err:
    raise WorkflowError(str(err)) from None

RUN = config["run"]
OUT = f"results/{RUN}"
LOGS = f"{OUT}/logs"
CACHE = "resources/cache"  # content-keyed caches (text embeddings, latents, prompts); not outputs
SCENES = scene_settings(config)
SCENE_IDS = list(SCENES)
ENV = "../envs/kolors-story.yaml"
NETWORK_RETRIES = 2  # jobs that download or upload try again after a failure (a dropped connection)
try:  # the trainer takes every core; --report, --lint and --dry-run work without --cores
    ALL_CORES = workflow.cores
except WorkflowError:
    ALL_CORES = 1

# Folders that rules of this workflow build (the demo's data and tiny models).
BUILT_DIRS = {"resources/demo/dataset", "resources/tiny/kolors", "resources/tiny/aesthetic"}


SAMPLER = {k: v for k, v in config["generate"].items() if k not in ("seed", "width", "height", "consistency")}
CONSISTENCY = {k: v for k, v in config["generate"]["consistency"].items() if k not in ("enabled", "seed")}
# What an anchor's recording depends on (strength and selection only matter in scene jobs).
ANCHOR_CONSISTENCY = {k: CONSISTENCY[k] for k in ("steps_fraction", "max_tokens")}
CHARACTERS = sorted(config["story"]["characters"])


wildcard_constraints:
    scene="|".join(SCENE_IDS),
    character="|".join(map(re.escape, CHARACTERS)) or "no-characters",  # names may hold "."
    model_name="kolors|aesthetic",


def _check_local(ref, key):
    path = model_dir(ref)
    if path not in BUILT_DIRS and not os.path.isdir(path):
        raise WorkflowError(
            f"{key}: local folder '{path}' does not exist. Give a ModelScope id (owner/name) "
            "or an existing folder."
        )
    return path


def model_path(name):
    """The folder a model is read from: a local path, or where its ModelScope id downloads to."""
    ref = config["models"][name]
    return _check_local(ref, f"models.{name}") if is_local_model(ref) else model_dir(ref)


for _name in ("kolors", "aesthetic"):
    model_path(_name)  # refuse a missing local folder at parse time


def _key_for_model_id(wildcards):
    model_id = f"{wildcards.owner}/{wildcards.name}"
    keys = [f"models.{k}" for k, v in config["models"].items() if v == model_id]
    return keys[0] if keys else "models"


def dataset_input(wildcards):
    ds = config["dataset"]
    return [_check_local(ds["path"], "dataset.path")] if ds["source"] == "local" else []


def train_inputs(wildcards):
    inputs = {
        "dataset": f"{OUT}/dataset",
        "model": model_path("kolors"),
        "model_check": f"{OUT}/models/kolors.json",
    }
    if config["train"]["validation"]["every"]:
        inputs["aesthetic"] = model_path("aesthetic")
        inputs["aesthetic_check"] = f"{OUT}/models/aesthetic.json"
    if config["train"]["init_lora"]:
        inputs["init_lora"] = config["train"]["init_lora"]
    return inputs


def scene_anchors(wildcards):
    """Anchor files of the characters a scene shows (none when consistency is off)."""
    if not config["generate"]["consistency"]["enabled"]:
        return []
    return [f"{OUT}/anchors/{c}.safetensors" for c in SCENES[wildcards.scene]["characters"]]


def gpu_benchmarks():
    """The benchmark files of the run's GPU jobs (their timings go into the manifest)."""
    files = [] if config["train"]["use_lora"] else [f"{OUT}/benchmarks/train_lora.tsv"]
    files += [f"{OUT}/benchmarks/generate_scene/{s}.tsv" for s in SCENE_IDS]
    if config["generate"]["consistency"]["enabled"]:
        shown = sorted({c for s in SCENES.values() for c in s["characters"]})
        files += [f"{OUT}/benchmarks/render_anchor/{c}.tsv" for c in shown]
    return files


def anchor_params(wildcards):
    """A character's anchor: style + description, the story's negative prompt, the panel size."""
    story, gen = config["story"], config["generate"]
    prompt = "，".join(p for p in (story["style"], story["characters"][wildcards.character]) if p)
    return {"id": wildcards.character, "prompt": prompt, "negative_prompt": story["negative_prompt"],
            "seed": gen["consistency"]["seed"], "width": gen["width"], "height": gen["height"]}


def generate_inputs(wildcards):
    inputs = {
        "lora": f"{OUT}/lora/pytorch_lora_weights.safetensors",
        "model": model_path("kolors"),
        "model_check": f"{OUT}/models/kolors.json",
        "anchors": scene_anchors(wildcards),
    }
    if needs_scorer(config["generate"]["candidates"], config["generate"]["lora_scale"]):  # best-of-N or sweep
        inputs["aesthetic"] = model_path("aesthetic")
        inputs["aesthetic_check"] = f"{OUT}/models/aesthetic.json"
    return inputs


IMAGE_KEYS = ("id", "prompt", "negative_prompt", "seed", "width", "height")


def scene_params(wildcards):
    """Only what a scene's image depends on: a new caption must not re-render the panel."""
    return {k: SCENES[wildcards.scene][k] for k in IMAGE_KEYS}


def scene_png(scene_id):
    return f"{OUT}/scenes/{scene_id}.png"


def final_outputs():
    outputs = [
        f"{OUT}/story.png",
        f"{OUT}/scores.csv",
        f"{OUT}/scores.json",
        f"{OUT}/lora/pytorch_lora_weights.safetensors",
        f"{OUT}/bundle",
        f"{OUT}/manifest.json",
        f"{OUT}/config.yaml",
    ]
    if config["upload"]["enabled"]:
        outputs.append(f"{OUT}/upload.json")
    return outputs
