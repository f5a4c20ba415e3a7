# Config validation, the variants of a sweep, the keyed jobs they share, and input functions.
#
# Each variant is a run under results/<variant>/. The jobs that make its data, LoRA, anchors and
# panels write to results/shared/<stage>/<key>/, the key hashing what the job depends on
# (kolors_story.plan.job_plan), so variants with equal settings share one job; small copy rules put
# each variant's LoRA, panels and filter statistics under results/<variant>/.
import json
import os
import re
from pathlib import Path

from kolors_story.plan.config import (
    check_upload_token,
    is_local_model,
    load_schema,
    model_dir,
    scene_settings,
    validate_config,
)
from kolors_story.errors import UserError
from kolors_story.plan.job_plan import IMAGE_KEYS, plan_jobs
from kolors_story.render.candidates_file import FORMAT as RECORD_FORMAT
from kolors_story.plan.sweep import SHARED as SHARED_NAME, expand_sweep, job_key
from kolors_story.plan.prompts import cut_texts

SCHEMA = load_schema(Path(workflow.basedir) / "schemas/config.schema.yaml")
try:
    config = validate_config(config, SCHEMA)
    VARIANTS = expand_sweep(config, lambda c: validate_config(c, SCHEMA))
    for _variant in VARIANTS.values():
        check_upload_token(_variant)
except UserError as err:
    raise WorkflowError(str(err)) from None

PLAN = plan_jobs(VARIANTS)
SWEEP = bool(config["sweep"])
SHARED = f"results/{SHARED_NAME}"  # keyed jobs' outputs, shared by every variant that needs them
RUN_DIR = "results/{run}"
# The report's category of the leaderboard: the report sorts categories by name, variant names
# start with a letter or digit, so the star puts the leaderboard first.
LEADERBOARD = "★ Leaderboard"
CACHE = "resources/cache"  # content-keyed caches (text embeddings, latents, prompts); not outputs
ENV = "../envs/kolors-story.yaml"
NETWORK_RETRIES = 2  # jobs that download or upload try again after a failure (a dropped connection)
try:  # the trainer takes every core; --report, --lint and --dry-run work without --cores
    ALL_CORES = workflow.cores
except WorkflowError:
    ALL_CORES = 1

# Folders that rules of this workflow build (the demo's data and tiny models).
BUILT_DIRS = {"resources/demo/dataset", "resources/tiny/kolors", "resources/tiny/aesthetic"}
SCENES = {name: scene_settings(c) for name, c in VARIANTS.items()}  # resolved once: prompts are tokenized
ALL_SCENES = sorted({s for scenes in SCENES.values() for s in scenes})
ALL_CHARACTERS = sorted({c for v in PLAN.variants.values() for c in v.anchors})


wildcard_constraints:
    run="|".join(map(re.escape, VARIANTS)),
    scene="|".join(map(re.escape, ALL_SCENES)),
    character="|".join(map(re.escape, ALL_CHARACTERS)) or "no-characters",  # names may hold "."
    model_name="kolors|aesthetic",
    key="[0-9a-f]{12}",


def variant_config(wildcards):
    """The variant's validated config."""
    return VARIANTS[wildcards.run]


def variant_jobs(wildcards):
    """The keys of the shared jobs the variant uses (kolors_story.plan.job_plan.VariantJobs)."""
    return PLAN.variants[wildcards.run]


def _check_local(ref, key):
    path = model_dir(ref)
    if path not in BUILT_DIRS and not os.path.isdir(path):
        raise WorkflowError(
            f"{key}: local folder '{path}' does not exist. Give a ModelScope id (owner/name) "
            "or an existing folder."
        )
    return path


def model_folder(ref, key):
    """The folder a model is read from: a local path, or where its ModelScope id downloads to."""
    return _check_local(ref, key) if is_local_model(ref) else model_dir(ref)


for _name, _variant in VARIANTS.items():  # refuse a missing local folder at parse time
    for _model in ("kolors", "aesthetic"):
        _where = f"models.{_model}" + (f" (sweep variant '{_name}')" if SWEEP else "")
        model_folder(_variant["models"][_model], _where)


def model_check(name, ref):
    """The file rule prepare_model writes once a model folder's layout is checked."""
    return f"{SHARED}/models/{name}/{job_key(ref)}.json"


MODEL_INPUT = {"kolors": "model", "aesthetic": "aesthetic"}  # the input names the scripts read


def model_inputs(name, ref):
    """A model's folder and the check of its layout, as a job's named inputs."""
    field = MODEL_INPUT[name]
    return {field: model_folder(ref, f"models.{name}"), f"{field}_check": model_check(name, ref)}


def _key_for_model_id(wildcards):
    model_id = f"{wildcards.owner}/{wildcards.name}"
    keys = [f"models.{k}" for c in VARIANTS.values() for k, v in c["models"].items() if v == model_id]
    return keys[0] if keys else "models"


# ModelScope ids whose folder is not there yet: id -> the folder it downloads to
MODEL_DOWNLOADS = {r: model_dir(r) for c in VARIANTS.values() for r in (c["models"]["kolors"], c["models"]["aesthetic"])
                   if not is_local_model(r) and not os.path.isdir(model_dir(r))}
MODEL_REFS = {(n, job_key(c["models"][n])): c["models"][n] for c in VARIANTS.values() for n in ("kolors", "aesthetic")}


def lora_dir(key, imported):
    """Where a LoRA job writes: trained and imported LoRAs keep apart."""
    return f"{SHARED}/{'imported' if imported else 'lora'}/{key}"


def anchor_file(character, key):
    return f"{SHARED}/anchors/{character}/{key}.safetensors"


def scene_dir(scene, key):
    return f"{SHARED}/scenes/{scene}/{key}"


def variant_scenes(wildcards):
    return list(SCENES[wildcards.run])


def variant_panels(wildcards):
    return [f"results/{wildcards.run}/scenes/{s}.png" for s in variant_scenes(wildcards)]


def variant_candidates(wildcards):
    return [f"results/{wildcards.run}/candidates/{s}" for s in variant_scenes(wildcards)]


def gpu_benchmarks(wildcards):
    """Label -> benchmark file of the variant's GPU jobs (their timings go into its manifest)."""
    jobs = variant_jobs(wildcards)
    files = {} if jobs.imported else {"train_lora": f"{SHARED}/benchmarks/train_lora/{jobs.lora}.tsv"}
    files.update({f"render_anchor/{c}": f"{SHARED}/benchmarks/render_anchor/{c}/{k}.tsv"
                  for c, k in jobs.anchors.items()})
    files.update({f"generate_scene/{s}": f"{SHARED}/benchmarks/generate_scene/{s}/{k}.tsv"
                  for s, k in jobs.scenes.items()})
    return files


def variant_outputs(name):
    outputs = [
        f"results/{name}/{f}"
        for f in ("story.png", "scores.csv", "scores.json", "lora/pytorch_lora_weights.safetensors",
                  "bundle", "manifest.json", "config.yaml")
    ]
    if VARIANTS[name]["upload"]["enabled"]:
        outputs.append(f"results/{name}/upload.json")
    return outputs


def final_outputs():
    outputs = [f for name in VARIANTS for f in variant_outputs(name)]
    if SWEEP:
        outputs += ["results/leaderboard.csv", "results/leaderboard.png"]
    return outputs


# ---------------------------------------------------------------- inputs and params of the data rules
def download_settings(wildcards):
    return PLAN.downloads[wildcards.key]["dataset"]


def dataset_input(wildcards):
    ds = download_settings(wildcards)
    return [_check_local(ds["path"], "dataset.path")] if ds["source"] == "local" else []


def filter_input(name):
    """A file of the download job the filter job reads from."""
    return lambda wc: f"{SHARED}/download/{PLAN.filters[wc.key]['download']}/{name}"


# ---------------------------------------------------------------- of the text encoder
EMBEDDINGS_FILE = "embeddings.safetensors"


def embeddings_inputs(encoding):
    """A training, anchor or scene job's input from its encode job: the embeddings file as
    ancient(), so that job's reruns (another text edited) rerun no consumer by themselves."""
    return {"embeddings": ancient(f"{SHARED}/embeddings/{encoding}/{EMBEDDINGS_FILE}")}


def encode_inputs(wildcards):
    job = PLAN.encodings[wildcards.key]
    return {**model_inputs("kolors", job["kolors"]),
            "datasets": [f"{SHARED}/data/{f}/dataset" for f in job["filters"]]}


# ---------------------------------------------------------------- of the LoRA rules
LORA_FILES = {
    "lora": "pytorch_lora_weights.safetensors",
    "diffsynth": "diffsynth_lora.ckpt",
    "loss_csv": "loss.csv",
    "loss_png": "loss.png",
    "validation_csv": "validation.csv",
    "validation_png": "validation.png",
    "summary": "training_summary.json",
}
IMPORTED_FILES = {k: LORA_FILES[k] for k in ("lora", "diffsynth")}


def import_inputs(wildcards):
    job = PLAN.imports[wildcards.key]
    return {"lora": job["use_lora"], **model_inputs("kolors", job["kolors"])}


def train_inputs(wildcards):
    job = PLAN.trainings[wildcards.key]
    inputs = {"dataset": f"{SHARED}/data/{job['filter']}/dataset", **model_inputs("kolors", job["kolors"]),
              **embeddings_inputs(job["encoding"])}
    if job["aesthetic"]:
        inputs.update(model_inputs("aesthetic", job["aesthetic"]))
    if job["train"]["init_lora"]:
        inputs["init_lora"] = job["train"]["init_lora"]
    return inputs


def variant_lora_source(name):
    return lambda wc: f"{lora_dir(variant_jobs(wc).lora, variant_jobs(wc).imported)}/{LORA_FILES[name]}"


CURVES = {k: v for k, v in LORA_FILES.items() if k not in IMPORTED_FILES}


# ---------------------------------------------------------------- of the anchor, scene and panel rules
def job_lora_file(job):
    """The LoRA file a keyed generation job reads (from its train or import job)."""
    return f"{lora_dir(job['lora'], job['imported'])}/{LORA_FILES['lora']}"


def anchor_inputs(wildcards):
    job = PLAN.anchors[wildcards.key]
    return {"lora": job_lora_file(job), **model_inputs("kolors", job["kolors"]),
            **embeddings_inputs(job["encoding"])}


def generate_inputs(wildcards):
    job = PLAN.scenes[wildcards.key]
    inputs = {
        "lora": job_lora_file(job),
        **model_inputs("kolors", job["kolors"]),
        "anchors": [anchor_file(c, k) for c, k in job["anchors"]],
        **embeddings_inputs(job["encoding"]),
    }
    if job["aesthetic"]:  # best-of-N or a LoRA-scale sweep: kolors_story.plan.config.needs_scorer
        inputs.update(model_inputs("aesthetic", job["aesthetic"]))
    return inputs


def scene_job_dir(wildcards):
    return scene_dir(wildcards.scene, variant_jobs(wildcards).scenes[wildcards.scene])


def panel_labels(wildcards):
    """The report's columns beside a panel: read at report time from the run's own files."""
    from kolors_story.render.candidates_file import read_record

    run_dir = Path(f"results/{wildcards.run}")
    record = read_record(run_dir / "candidates" / wildcards.scene)
    scores = json.loads((run_dir / "scores.json").read_text(encoding="utf-8"))["scores"]
    return {"panel": wildcards.scene, "score": round(scores[f"{wildcards.scene}.png"], 3),
            "seed": record.seed, "LoRA scale": record.lora_scale}


# ---------------------------------------------------------------- of the manifest
def manifest_inputs(wildcards):
    jobs, run_dir = variant_jobs(wildcards), f"results/{wildcards.run}"
    inputs = {
        "lora": f"{run_dir}/lora/{LORA_FILES['lora']}",
        "story": f"{run_dir}/story.png",
        "scores": f"{run_dir}/scores.json",
        "bundle": f"{run_dir}/bundle",
        "dataset": f"{SHARED}/data/{jobs.filter}/filtered.jsonl",
        "training_data": f"{SHARED}/data/{jobs.filter}/dataset",
        "filter_stats": f"{run_dir}/data/filter_stats.json",
        "models": [model_check(n, variant_config(wildcards)["models"][n]) for n in ("kolors", "aesthetic")],
        "benchmarks": list(gpu_benchmarks(wildcards).values()),
    }
    if not jobs.imported:
        inputs["summary"] = f"{run_dir}/lora/{LORA_FILES['summary']}"
    return inputs
