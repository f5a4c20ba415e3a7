# What the workflow runs: the config checked, its variants, and the plan that keys every job
# (kolors_story.plan.workflow_plan), which the rules and input functions only read; the names a
# wildcard may take; the models and hub downloads the variants need, checked at parse time.
# Where files go: rules/paths.smk. The rules' input functions: rules/inputs.smk.
import functools
import os
import re
from pathlib import Path

from kolors_story.errors import UserError
from kolors_story.modelscope_endpoint import HubDownload, StillNeeded
from kolors_story.plan.config import is_local_model, load_schema, model_dir
from kolors_story.plan.job_plan import download_key
from kolors_story.plan.workflow_plan import expand_variants, local_writer_model, outline_writers, plan_workflow

SCHEMA = load_schema(Path(workflow.basedir) / "schemas/config.schema.yaml")
try:
    VARIANTS = expand_variants(config, SCHEMA)  # name -> validated config, as the config files give it
except UserError as err:
    raise WorkflowError(str(err)) from None
SWEEP = bool(config.get("sweep"))
# A story given as an outline has its scenes once its writer's file exists (a checkpoint's output).
SCENES_FILES = {key: writer_file(key, "scenes") for key in set(outline_writers(VARIANTS).values())}


def plan():
    """The workflow's plan for the writer files there now: before a writer's checkpoint has run, its
    variants wait (rule all asks for the checkpoint); once it has, they have their scenes."""
    return plan_for(frozenset(key for key, path in SCENES_FILES.items() if os.path.isfile(path)))


@functools.cache
def plan_for(written):
    return plan_workflow(VARIANTS, SCHEMA, {key: Path(SCENES_FILES[key]) for key in written})


try:
    plan()  # a writer's file that is not its outline's is refused now, before any job
except UserError as err:
    raise WorkflowError(str(err)) from None

# The report's category of the leaderboard: the report sorts categories by name, variant names
# start with a letter or digit, so the star puts the leaderboard first.
LEADERBOARD = "★ Leaderboard"
ENV = "../envs/kolors-story.yaml"
NETWORK_RETRIES = 2  # the upload job tries again after a failure (a dropped connection)
try:  # the trainer takes every core; --report, --lint and --dry-run work without --cores
    ALL_CORES = workflow.cores
except WorkflowError:
    ALL_CORES = 1

OUTLINE_IDS = {s["id"] for c in VARIANTS.values() for s in c["story"].get("outline", [])}
ALL_SCENES = sorted({s for scenes in plan().scenes.values() for s in scenes} | OUTLINE_IDS)
ALL_CHARACTERS = sorted({c for v in VARIANTS.values() for c in v["story"]["characters"]})  # anchors' names


wildcard_constraints:
    run="|".join(map(re.escape, VARIANTS)),
    scene="|".join(map(re.escape, ALL_SCENES)),
    character="|".join(map(re.escape, ALL_CHARACTERS)) or "no-characters",  # names may hold "."
    model_name="kolors|aesthetic",
    key="[0-9a-f]{12}",


# ---------------------------------------------------------------- models
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


MODEL_INPUT = {"kolors": "model", "aesthetic": "aesthetic"}  # the input names the scripts read


def model_refs(config):
    """Config key -> model id or folder, of every model the variant loads."""
    refs = {f"models.{k}": v for k, v in config["models"].items() if k in MODEL_INPUT}
    if local_writer_model(config):
        refs["prompt_writer.model"] = local_writer_model(config)
    if config["caption"]["backend"] == "data_juicer":
        refs["caption.model"] = config["caption"]["model"]
    return refs


for _name, _variant in VARIANTS.items():  # refuse a missing local folder at parse time
    for _key, _ref in model_refs(_variant).items():
        model_folder(_ref, _key + (f" (sweep variant '{_name}')" if SWEEP else ""))

MODEL_REFS = {(n, job_key(c["models"][n])): c["models"][n] for c in VARIANTS.values() for n in ("kolors", "aesthetic")}


# ---------------------------------------------------------------- hub downloads
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
    return os.path.isfile(download_file(download_key(config), "rows"))


# Every hub download the run still needs, computed once: whichever download job fails first offline
# names them all (a param Snakemake does not compare: see StillNeeded).
STILL_NEEDED = StillNeeded(d for c in VARIANTS.values() for d in hub_downloads(c) if not downloaded(d, c))
