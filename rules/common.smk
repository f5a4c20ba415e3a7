# Config validation, the variants of a sweep, the keyed jobs they share, and input functions.
#
# Each variant is a run under results/<variant>/. The jobs that make its data, LoRA, anchors and
# panels write to results/shared/<stage>/<key>/, the key hashing what the job depends on
# (kolors_story.plan.job_plan), so variants with equal settings share one job; small copy rules put
# each variant's LoRA, panels and filter statistics under results/<variant>/.
import functools
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
from snakemake.logging import logger

from kolors_story.errors import UserError
from kolors_story.modelscope_endpoint import HubDownload, StillNeeded
from kolors_story.plan.content_digest import CACHE_FOLDER as CONTENT_CACHE, changes, digest, listing
from kolors_story.plan.job_plan import IMAGE_KEYS, data_key, download_key, plan_jobs
from kolors_story.render.candidates_file import FORMAT as RECORD_FORMAT
from kolors_story.plan.sweep import SHARED as SHARED_NAME, expand_sweep, job_key
from kolors_story.plan.prompts import cut_texts
from kolors_story.plan.outline import (
    TRANSCRIPT_FILE,
    WRITTEN_FILE,
    read_written_scenes,
    sorted_keys,
    with_written_scenes,
    writer_key,
    writer_settings,
    writes_from_outline,
)

SCHEMA = load_schema(Path(workflow.basedir) / "schemas/config.schema.yaml")
try:
    config = validate_config(config, SCHEMA)
    VARIANTS = expand_sweep(config, lambda c: validate_config(c, SCHEMA))
    for _variant in VARIANTS.values():
        check_upload_token(_variant)
except UserError as err:
    raise WorkflowError(str(err)) from None

SWEEP = bool(config["sweep"])
SHARED = f"results/{SHARED_NAME}"  # keyed jobs' outputs, shared by every variant that needs them

def local_writer_model(config):
    """The prompt writer's model id or folder, where its backend runs one in the job (else None)."""
    writer = config["prompt_writer"]
    return writer["model"] if writes_from_outline(config) and writer["backend"] == "local" else None


# Variants whose story is an outline: the prompt writer's job (rules/prompts.smk) writes their scenes.
WRITER_KEYS = {name: writer_key(c) for name, c in VARIANTS.items() if writes_from_outline(c)}
WRITERS = {key: {**writer_settings(VARIANTS[name]), "prompt_writer": sorted_keys(VARIANTS[name]["prompt_writer"]),
                 "local_model": local_writer_model(VARIANTS[name])}
           for name, key in WRITER_KEYS.items()}
OUTLINE_IDS = {s["id"] for c in VARIANTS.values() for s in c["story"].get("outline", [])}


def writer_inputs(wildcards):
    """The model folder of a local prompt writer (none for a server)."""
    ref = WRITERS[wildcards.key]["local_model"]
    return {"model": model_folder(ref, "prompt_writer.model")} if ref else {}


def writer_params(wildcards):
    """prompt_writer.* as the job's script reads it: a local model as its folder."""
    writer = WRITERS[wildcards.key]
    ref = writer["local_model"]
    return {**writer["prompt_writer"], **({"model": model_folder(ref, "prompt_writer.model")} if ref else {})}


def written_scenes_file(name):
    return f"{SHARED}/prompts/{WRITER_KEYS[name]}/{WRITTEN_FILE}"


def plan_written_scenes():
    """Every variant whose writer's file exists gets its scenes from it; the jobs are planned again
    (called at parse time, and by rule all once a writer's checkpoint is done)."""
    global PLAN, SCENES
    for name in WRITER_KEYS:
        path = Path(written_scenes_file(name))
        if writes_from_outline(VARIANTS[name]) and path.is_file():
            entries = read_written_scenes(path, VARIANTS[name]["story"]["outline"])
            VARIANTS[name] = validate_config(with_written_scenes(VARIANTS[name], entries), SCHEMA)
    ready = {name: c for name, c in VARIANTS.items() if not writes_from_outline(c)}
    PLAN = plan_jobs(ready)
    SCENES = {name: scene_settings(c) for name, c in ready.items()}  # resolved once: prompts are tokenized


try:
    plan_written_scenes()
except UserError as err:
    raise WorkflowError(str(err)) from None
RUN_DIR = "results/{run}"
# The report's category of the leaderboard: the report sorts categories by name, variant names
# start with a letter or digit, so the star puts the leaderboard first.
LEADERBOARD = "★ Leaderboard"
CACHE = "resources/cache"  # content-keyed caches (text embeddings, latents, prompts); not outputs
ENV = "../envs/kolors-story.yaml"
NETWORK_RETRIES = 2  # the upload job tries again after a failure (a dropped connection)
try:  # the trainer takes every core; --report, --lint and --dry-run work without --cores
    ALL_CORES = workflow.cores
except WorkflowError:
    ALL_CORES = 1

# Folders that rules of this workflow build (the demo's data and tiny models).
BUILT_DIRS = {"resources/demo/dataset", "resources/tiny/kolors", "resources/tiny/aesthetic", "resources/tiny/qwen",
              "resources/tiny/blip"}
ALL_SCENES = sorted({s for scenes in SCENES.values() for s in scenes} | OUTLINE_IDS)
ALL_CHARACTERS = sorted({c for v in VARIANTS.values() for c in v["story"]["characters"]})  # anchors' names


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


# ---------------------------------------------------------------- local inputs' contents
# A local input a config names (dataset.path, a model folder, a LoRA file) reaches its job as a
# content digest param (kolors_story.plan.content_digest): an edited, added, removed or renamed
# file changes it, and Snakemake reruns a job whose params changed, then everything after it.
# Folders that rules build, and ModelScope ids, are outputs that Snakemake tracks itself.
# CONTENT_CACHE holds each file's sha256 by its identity: a rerun hashes only what changed.


@functools.cache
def local_listing(path):
    return listing(Path(path), Path(CONTENT_CACHE))


def content_param(path):
    """The content digest of a local file or folder; '' for one that a rule of this workflow builds."""
    return "" if path is None or path in BUILT_DIRS else digest(local_listing(path))


def model_content(ref):
    """content_param of a model given as a local folder; '' for a ModelScope id."""
    return content_param(model_dir(ref)) if ref and is_local_model(ref) else ""


def model_check(name, ref):
    """The file rule prepare_model writes once a model folder's layout is checked."""
    return f"{SHARED}/models/{name}/{job_key(ref)}.json"


MODEL_INPUT = {"kolors": "model", "aesthetic": "aesthetic"}  # the input names the scripts read


def model_inputs(name, ref):
    """A model's folder and the check of its layout, as a job's named inputs."""
    field = MODEL_INPUT[name]
    return {field: model_folder(ref, f"models.{name}"), f"{field}_check": model_check(name, ref)}


def model_refs(config):
    """Config key -> model id or folder, of every model the variant loads."""
    refs = {f"models.{k}": v for k, v in config["models"].items() if k in MODEL_INPUT}
    if local_writer_model(config):
        refs["prompt_writer.model"] = local_writer_model(config)
    if config["caption"]["backend"] == "data_juicer":
        refs["caption.model"] = config["caption"]["model"]
    return refs


def _key_for_model_id(wildcards):
    model_id = f"{wildcards.owner}/{wildcards.name}"
    keys = [k for c in VARIANTS.values() for k, v in model_refs(c).items() if v == model_id]
    return keys[0] if keys else "models"


for _name, _variant in VARIANTS.items():  # refuse a missing local folder at parse time
    for _key, _ref in model_refs(_variant).items():
        model_folder(_ref, _key + (f" (sweep variant '{_name}')" if SWEEP else ""))


def hub_downloads(config):
    """Every ModelScope download the variant implies, whether there or not: its models (Kolors,
    scorer, captioner, local prompt writer) go to their folder under resources/modelscope; its
    dataset to a folder it is read from with dataset.source: local (the modelscope source asks the
    hub even when MsDataset.load's cache holds it, so that cache does not help a host offline)."""
    items = [HubDownload("model", ref, model_dir(ref), key) for key, ref in model_refs(config).items()
             if not is_local_model(ref)]
    ds = config["dataset"]
    if ds["source"] == "modelscope":
        items.append(HubDownload("dataset", ds["id"], f"resources/datasets/{ds['id']}", "dataset.path"))
    return items


def downloaded(item, config):
    """Whether the run needs no download for `item`: a model's folder is there; a dataset's download
    job has written its rows (Snakemake then runs no job that asks the hub for it)."""
    if item.kind == "model":
        return os.path.isdir(item.folder)
    return os.path.isfile(f"{SHARED}/download/{download_key(config)}/rows.jsonl")


# Every hub download the run still needs, computed once: whichever download job fails first offline
# names them all (a param Snakemake does not compare: see StillNeeded).
STILL_NEEDED = StillNeeded(d for c in VARIANTS.values() for d in hub_downloads(c) if not downloaded(d, c))
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
    if name in WRITER_KEYS:
        outputs += [f"results/{name}/prompts.yaml", f"results/{name}/{TRANSCRIPT_FILE}"]
    if VARIANTS[name]["caption"]["backend"] != "none":
        outputs += [f"results/{name}/data/{f}" for f in CAPTION_FILES.values()]
    return outputs


def final_outputs(wildcards):
    """Rule all's inputs. While the prompt writer has a variant's scenes to write, its checkpoint is
    all there is to do: Snakemake runs the writer, then asks again, and every job is planned with
    every variant's scenes known (the one encode job encodes the texts of them all)."""
    waiting = [name for name in WRITER_KEYS if writes_from_outline(VARIANTS[name])]
    for name in waiting:
        checkpoints.write_prompts.get(key=WRITER_KEYS[name])
    if waiting:  # every writer done: plan once with all their scenes
        plan_written_scenes()
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


DATASET_CONTENT = "content.json"  # beside the download job's rows: the files it read and their sha256


def dataset_content(wildcards):
    """The local dataset folder's content digest (download_dataset's param); where it differs from
    what the download job last read, the log says which files changed."""
    ds = download_settings(wildcards)
    if ds["source"] != "local":
        return ""
    path = _check_local(ds["path"], "dataset.path")
    now = content_param(path)
    if now:
        say_dataset_changes(path, f"{SHARED}/download/{wildcards.key}/{DATASET_CONTENT}")
    return now


@functools.cache
def say_dataset_changes(path, record):
    try:
        before = json.loads(Path(record).read_text(encoding="utf-8"))["files"]
    except (OSError, ValueError, KeyError):
        return  # never read, or a record of another format: the job runs anyway
    if (changed := changes(before, local_listing(path))):
        logger.warning(f"dataset.path '{path}' changed since its download job read it: {changed}. "
                       "That job and the chain after it run again.")


def filter_input(name):
    """A file of the download job the filter job reads from."""
    return lambda wc: f"{SHARED}/download/{PLAN.filters[wc.key]['download']}/{name}"


# ---------------------------------------------------------------- of the captioner
CAPTION_FILES = {"record": "captions.jsonl", "page": "captions.html"}  # under results/<run>/data/ too


def caption_job(wildcards):
    return PLAN.captions[wildcards.key]


def caption_inputs(wildcards):
    """The filter job's kept rows (and the download's images they point into), and with backend
    data_juicer the captioning model's folder."""
    job = caption_job(wildcards)
    inputs = {"rows": f"{SHARED}/data/{job['filter']}/filtered.jsonl",
              "images": f"{SHARED}/download/{PLAN.filters[job['filter']]['download']}/images"}
    if job["caption"]["backend"] == "data_juicer":
        inputs["model"] = model_folder(job["caption"]["model"], "caption.model")
    return inputs


def caption_params(wildcards):
    """caption.* as the job's script reads it, keys sorted (Snakemake compares params as written):
    the job's settings, what only reaches the server (the key's variable name, never the key) and,
    with backend data_juicer, the model as its folder."""
    name = next(n for n, j in PLAN.variants.items() if j.captions == wildcards.key)
    caption = dict(VARIANTS[name]["caption"])
    if caption["backend"] == "data_juicer":
        caption["model"] = model_folder(caption["model"], "caption.model")
    return dict(sorted(caption.items()))


def metadata_rows(wildcards):
    """build_metadata's rows: the captioner's where the key is a caption job's, else the filter's."""
    if wildcards.key in PLAN.captions:
        return f"{SHARED}/captions/{wildcards.key}/captioned.jsonl"
    return f"{SHARED}/data/{wildcards.key}/filtered.jsonl"


def metadata_filter(key):
    """The filter job behind a training folder's key."""
    return PLAN.captions[key]["filter"] if key in PLAN.captions else key


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


def encode_steps(wildcards):
    """[training folder, one optimizer step of the strictest training on it] of the folders the
    encode job reads: a folder too small is refused there, before ChatGLM loads (a param of
    build_metadata would rebuild the folder, and rerun every training sharing it, on each change)."""
    job = PLAN.encodings[wildcards.key]
    return [[f"{SHARED}/data/{f}/dataset", step] for f in job["filters"] if (step := PLAN.step_examples(f))]


# ---------------------------------------------------------------- of the LoRA rules
LORA_FILES = {
    "lora": "pytorch_lora_weights.safetensors",
    "diffsynth": "diffsynth_lora.ckpt",
    "comfyui": "comfyui_lora.safetensors",  # kohya keys: ComfyUI's LoraLoaderModelOnly (docs/lora-formats.md)
    "loss_csv": "loss.csv",
    "loss_png": "loss.png",
    "validation_csv": "validation.csv",
    "validation_png": "validation.png",
    "summary": "training_summary.json",
}
IMPORTED_FILES = {k: LORA_FILES[k] for k in ("lora", "diffsynth", "comfyui")}


def init_lora_content(wildcards):
    return content_param(PLAN.trainings[wildcards.key]["train"]["init_lora"])


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


def bundle_loras(wildcards):
    """The run's LoRA files the bundle carries: bundle.formats (the diffusers file always)."""
    formats = variant_config(wildcards)["bundle"]["formats"]
    return {name: f"{RUN_DIR.format(run=wildcards.run)}/lora/{LORA_FILES[name]}" for name in ("lora", "diffsynth", "comfyui")
            if name == "lora" or name in formats}


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
        "training_data": f"{SHARED}/data/{data_key(jobs)}/dataset",
        "filter_stats": f"{run_dir}/data/filter_stats.json",
        "models": [model_check(n, variant_config(wildcards)["models"][n]) for n in ("kolors", "aesthetic")],
        "benchmarks": list(gpu_benchmarks(wildcards).values()),
    }
    if not jobs.imported:
        inputs["summary"] = f"{run_dir}/lora/{LORA_FILES['summary']}"
    return inputs
