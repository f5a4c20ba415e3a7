# The rules' input functions and the params computed from the plan (rules/common.smk, plan()),
# passed to input:/params: uncalled, as Snakemake asks: each reads the plan of the writer files
# there when Snakemake asks.
import functools
import json
from pathlib import Path

from snakemake.logging import logger

from kolors_story.plan.content_digest import changes, digest, listing
from kolors_story.plan.job_plan import data_key, download_key
from kolors_story.plan.outline import writes_from_outline


# ---------------------------------------------------------------- of every run (rule all)
def variant_config(wildcards):
    """The variant's validated config (with its written scenes, once written)."""
    return plan().variants[wildcards.run]


def variant_jobs(wildcards):
    """The keys of the shared jobs the variant uses (kolors_story.plan.job_plan.VariantJobs)."""
    return plan().jobs.variants[wildcards.run]


def variant_scenes(wildcards):
    return list(plan().scenes[wildcards.run])


def variant_outputs(name):
    """What rule all asks of the variant `name`."""
    variant = VARIANTS[name]
    outputs = [run_file(name, f) for f in RUN_OUTPUTS] + [run_lora_file(name, "lora")]
    if variant["upload"]["enabled"]:
        outputs.append(run_file(name, "upload"))
    if writes_from_outline(variant):
        outputs += [run_file(name, "prompts"), run_file(name, "transcript")]
    if variant["caption"]["backend"] != "none":
        outputs += [run_data_file(name, CAPTION_FILES[f]) for f in RUN_CAPTION_FILES]
    return outputs


def final_outputs(wildcards):
    """Rule all's inputs. While the prompt writer has a variant's scenes to write, its checkpoint is
    all there is to do: Snakemake runs the writer, then asks again, and every job is planned with
    every variant's scenes known (the one encode job encodes the texts of them all)."""
    now = plan()
    for name in now.waiting:
        checkpoints.write_prompts.get(key=now.writer_keys[name])
    outputs = [f for name in VARIANTS for f in variant_outputs(name)]
    if SWEEP:
        outputs += list(LEADERBOARD_FILES.values())
    return outputs


def variant_panels(wildcards):
    return [run_panel(wildcards.run, s) for s in variant_scenes(wildcards)]


def variant_candidates(wildcards):
    return [run_candidates(wildcards.run, s) for s in variant_scenes(wildcards)]


def gpu_benchmarks(wildcards):
    """Label -> benchmark file of the variant's GPU jobs (their timings go into its manifest)."""
    jobs = variant_jobs(wildcards)
    files = {} if jobs.imported else {"train_lora": gpu_benchmark("train_lora", jobs.lora)}
    files.update({f"render_anchor/{c}": gpu_benchmark("render_anchor", k, c) for c, k in jobs.anchors.items()})
    files.update({f"generate_scene/{s}": gpu_benchmark("generate_scene", k, s) for s, k in jobs.scenes.items()})
    return files


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


def model_inputs(name, ref):
    """A model's folder and the check of its layout, as a job's named inputs."""
    field = MODEL_INPUT[name]
    return {field: model_folder(ref, f"models.{name}"), f"{field}_check": model_check(name, ref)}


def key_for_model_id(wildcards):
    """The config key that names a ModelScope model id (download_model's messages say it)."""
    model_id = f"{wildcards.owner}/{wildcards.name}"
    keys = [k for c in VARIANTS.values() for k, v in model_refs(c).items() if v == model_id]
    return keys[0] if keys else "models"


# ---------------------------------------------------------------- of the prompt writer
def writer_job(wildcards):
    return plan().writers[wildcards.key]


def writer_inputs(wildcards):
    """The model folder of a local prompt writer (none for a server)."""
    ref = writer_job(wildcards)["local_model"]
    return {"model": model_folder(ref, "prompt_writer.model")} if ref else {}


def writer_params(wildcards):
    """prompt_writer.* as the job's script reads it: a local model as its folder."""
    writer = writer_job(wildcards)
    ref = writer["local_model"]
    return {**writer["prompt_writer"], **({"model": model_folder(ref, "prompt_writer.model")} if ref else {})}


def variant_writer_file(name):
    """A file (WRITER_FILES' `name`) of the variant's writer job."""
    return lambda wc: writer_file(plan().writer_keys[wc.run], name)


# ---------------------------------------------------------------- of the data rules
def download_settings(wildcards):
    return plan().jobs.downloads[wildcards.key]["dataset"]


def dataset_input(wildcards):
    ds = download_settings(wildcards)
    return [_check_local(ds["path"], "dataset.path")] if ds["source"] == "local" else []


def dataset_content(wildcards):
    """The local dataset folder's content digest (download_dataset's param); where it differs from
    what the download job last read, the log says which files changed."""
    ds = download_settings(wildcards)
    if ds["source"] != "local":
        return ""
    path = _check_local(ds["path"], "dataset.path")
    now = content_param(path)
    if now:
        say_dataset_changes(path, download_file(wildcards.key, "content"))
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


def filter_job(wildcards):
    return plan().jobs.filters[wildcards.key]


def filter_input(name):
    """A file of the download job the filter job reads from."""
    return lambda wc: download_file(filter_job(wc)["download"], name)


def caption_job(wildcards):
    return plan().jobs.captions[wildcards.key]


def caption_inputs(wildcards):
    """The filter job's kept rows (and the download's images they point into), and with backend
    data_juicer the captioning model's folder."""
    job = caption_job(wildcards)
    inputs = {"rows": filter_file(job["filter"], "rows"),
              "images": download_file(plan().jobs.filters[job["filter"]]["download"], "images")}
    if job["caption"]["backend"] == "data_juicer":
        inputs["model"] = model_folder(job["caption"]["model"], "caption.model")
    return inputs


def caption_params(wildcards):
    """caption.* as the job's script reads it, keys sorted (Snakemake compares params as written):
    the job's settings, what only reaches the server (the key's variable name, never the key) and,
    with backend data_juicer, the model as its folder. Variants that share the job may differ only
    in how the server is reached (not in the key: CaptionSettings.identity); the first one's is used."""
    name = next(n for n, j in plan().jobs.variants.items() if j.captions == wildcards.key)
    caption = dict(VARIANTS[name]["caption"])
    if caption["backend"] == "data_juicer":
        caption["model"] = model_folder(caption["model"], "caption.model")
    return dict(sorted(caption.items()))


def caption_model_content(wildcards):
    caption = caption_job(wildcards)["caption"]
    return model_content(caption.get("model")) if caption["backend"] == "data_juicer" else ""


def metadata_filter(key):
    """The filter job behind a training folder's key."""
    captions = plan().jobs.captions
    return captions[key]["filter"] if key in captions else key


def metadata_rows(wildcards):
    """build_metadata's rows: the captioner's where the key is a caption job's, else the filter's."""
    if wildcards.key in plan().jobs.captions:
        return caption_file(wildcards.key, "rows")
    return filter_file(wildcards.key, "rows")


def truncate_captions(wildcards):
    jobs = plan().jobs
    return jobs.downloads[jobs.filters[metadata_filter(wildcards.key)]["download"]]["dataset"].get("truncate_long_captions", False)


# ---------------------------------------------------------------- of the text encoder
def embeddings_inputs(encoding):
    """A training, anchor or scene job's input from its encode job: the embeddings file as
    ancient(), so that job's reruns (another text edited) rerun no consumer by themselves."""
    return {"embeddings": ancient(embeddings_file(encoding))}


def encode_job(wildcards):
    return plan().jobs.encodings[wildcards.key]


def encode_inputs(wildcards):
    job = encode_job(wildcards)
    return {**model_inputs("kolors", job["kolors"]), "datasets": [training_folder(f) for f in job["filters"]]}


def encode_steps(wildcards):
    """[training folder, one optimizer step of the strictest training on it] of the folders the
    encode job reads: a folder too small is refused there, before ChatGLM loads (a param of
    build_metadata would rebuild the folder, and rerun every training sharing it, on each change)."""
    jobs = plan().jobs
    return [[training_folder(f), step] for f in encode_job(wildcards)["filters"] if (step := jobs.step_examples(f))]


# ---------------------------------------------------------------- of the LoRA rules
def training_job(wildcards):
    return plan().jobs.trainings[wildcards.key]


def import_job(wildcards):
    return plan().jobs.imports[wildcards.key]


def init_lora_content(wildcards):
    return content_param(training_job(wildcards)["train"]["init_lora"])


def import_inputs(wildcards):
    job = import_job(wildcards)
    return {"lora": job["use_lora"], **model_inputs("kolors", job["kolors"])}


def train_inputs(wildcards):
    job = training_job(wildcards)
    inputs = {"dataset": training_folder(job["filter"]), **model_inputs("kolors", job["kolors"]),
              **embeddings_inputs(job["encoding"])}
    if job["aesthetic"]:
        inputs.update(model_inputs("aesthetic", job["aesthetic"]))
    if job["train"]["init_lora"]:
        inputs["init_lora"] = job["train"]["init_lora"]
    return inputs


def variant_lora_source(name):
    """A file of the variant's train or import job (LORA_FILES' `name`)."""
    return lambda wc: f"{lora_dir(variant_jobs(wc).lora, variant_jobs(wc).imported)}/{LORA_FILES[name]}"


def bundle_loras(wildcards):
    """The run's LoRA files the bundle carries: bundle.formats (the diffusers file always)."""
    formats = variant_config(wildcards)["bundle"]["formats"]
    return {name: run_lora_file(wildcards.run, name) for name in LORA_FORMAT_FILES if name == "lora" or name in formats}


# ---------------------------------------------------------------- of the anchor, scene and panel rules
def anchor_job(wildcards):
    return plan().jobs.anchors[wildcards.key]


def scene_job(wildcards):
    return plan().jobs.scenes[wildcards.key]


def job_lora_file(job):
    """The LoRA file a keyed generation job reads (from its train or import job)."""
    return f"{lora_dir(job['lora'], job['imported'])}/{LORA_FILES['lora']}"


def anchor_inputs(wildcards):
    job = anchor_job(wildcards)
    return {"lora": job_lora_file(job), **model_inputs("kolors", job["kolors"]),
            **embeddings_inputs(job["encoding"])}


def generate_inputs(wildcards):
    job = scene_job(wildcards)
    inputs = {
        "lora": job_lora_file(job),
        **model_inputs("kolors", job["kolors"]),
        "anchors": [anchor_file(c, k) for c, k in job["anchors"]],
        **embeddings_inputs(job["encoding"]),
    }
    if job["aesthetic"]:  # best-of-N or a LoRA-scale sweep: kolors_story.plan.config.needs_scorer
        inputs.update(model_inputs("aesthetic", job["aesthetic"]))
    return inputs


def variant_scene_file(name):
    """A file (SCENE_FILES' `name`) of the scene job that renders the variant's scene."""
    return lambda wc: scene_file(wc.scene, variant_jobs(wc).scenes[wc.scene], name)


def panel_labels(wildcards):
    """The report's columns beside a panel: read at report time from the run's own files."""
    from kolors_story.render.candidates_file import read_record

    record = read_record(Path(run_candidates(wildcards.run, wildcards.scene)))
    scores = json.loads(Path(run_file(wildcards.run, "scores")).read_text(encoding="utf-8"))["scores"]
    return {"panel": wildcards.scene, "score": round(scores[f"{wildcards.scene}.png"], 3),
            "seed": record.seed, "LoRA scale": record.lora_scale}


# ---------------------------------------------------------------- of the manifest
def manifest_inputs(wildcards):
    jobs, run = variant_jobs(wildcards), wildcards.run
    inputs = {
        "lora": run_lora_file(run, "lora"),
        "story": run_file(run, "story"),
        "scores": run_file(run, "scores"),
        "bundle": run_file(run, "bundle"),
        "dataset": filter_file(jobs.filter, "rows"),
        "training_data": training_folder(data_key(jobs)),
        "filter_stats": run_data_file(run, FILTER_FILES["stats"]),
        "models": [model_check(n, variant_config(wildcards)["models"][n]) for n in ("kolors", "aesthetic")],
        "benchmarks": list(gpu_benchmarks(wildcards).values()),
    }
    if not jobs.imported:
        inputs["summary"] = run_lora_file(run, "summary")
    return inputs
