# Where files go. Each variant is a run under results/<variant>/ (RUN_DIR). The jobs that make its
# data, LoRA, anchors and panels write to results/shared/<stage>/<key>/, the key hashing what the
# job depends on (kolors_story.plan.job_plan), so variants with equal settings share one job; small
# copy rules put each variant's LoRA, panels and statistics under results/<variant>/. File names
# are kolors_story.run_files'; the folders are here.
import os

from kolors_story.plan.content_digest import CACHE_FOLDER as CONTENT_CACHE
from kolors_story.plan.sweep import SHARED as SHARED_NAME, job_key
from kolors_story.run_files import (
    CAPTION_FILES,
    DOWNLOAD_FILES,
    EMBEDDINGS_FILE,
    FILTER_FILES,
    LORA_FILES,
    LORA_FORMAT_FILES,
    RUN_CAPTION_FILES,
    RUN_FILES,
    RUN_OUTPUTS,
    SCENE_FILES,
    TRAINING_CURVE_FILES,
    TRAINING_FOLDER,
    WRITER_FILES,
)

SHARED = f"results/{SHARED_NAME}"  # keyed jobs' outputs, shared by every variant that needs them
RUN_DIR = "results/{run}"
CACHE = "resources/cache"  # content-keyed caches (text embeddings, latents, prompts); not outputs
# Folders that rules of this workflow build (the demo's data and tiny models).
BUILT_DIRS = {"resources/demo/dataset", "resources/tiny/kolors", "resources/tiny/aesthetic", "resources/tiny/qwen",
              "resources/tiny/blip"}


LEADERBOARD_FILES = {"csv": "results/leaderboard.csv", "png": "results/leaderboard.png"}  # a sweep's ranking


def run_file(run, name):
    """A file of results/<run>/ by its RUN_FILES name."""
    return f"{RUN_DIR.format(run=run)}/{RUN_FILES[name]}"


def run_lora_file(run, name):
    """A LoRA or training file (LORA_FILES' `name`) of results/<run>/lora/."""
    return f"{RUN_DIR.format(run=run)}/lora/{LORA_FILES[name]}"


def run_data_file(run, file):
    """A file of results/<run>/data/ (the filter's statistics, the captions)."""
    return f"{RUN_DIR.format(run=run)}/data/{file}"


def run_panel(run, scene):
    return f"{RUN_DIR.format(run=run)}/scenes/{scene}.png"


def run_candidates(run, scene):
    return f"{RUN_DIR.format(run=run)}/candidates/{scene}"


def download_file(key, name):
    """A download job's file (DOWNLOAD_FILES)."""
    return f"{SHARED}/download/{key}/{DOWNLOAD_FILES[name]}"


def filter_file(key, name):
    """A filter job's file (FILTER_FILES)."""
    return f"{SHARED}/data/{key}/{FILTER_FILES[name]}"


def training_folder(key):
    """The training folder (metadata.csv + images) build_metadata writes; key: data_key."""
    return f"{SHARED}/data/{key}/{TRAINING_FOLDER}"


def caption_file(key, name):
    """A caption job's file (CAPTION_FILES)."""
    return f"{SHARED}/captions/{key}/{CAPTION_FILES[name]}"


def embeddings_file(key):
    return f"{SHARED}/embeddings/{key}/{EMBEDDINGS_FILE}"


def writer_file(key, name):
    """A prompt writer job's file (WRITER_FILES; rules/prompts.smk)."""
    return f"{SHARED}/prompts/{key}/{WRITER_FILES[name]}"


def model_check_file(name, key):
    """The file rule prepare_model writes once a model folder's layout is checked."""
    return f"{SHARED}/models/{name}/{key}.json"


def model_check(name, ref):
    """model_check_file of the model `ref` (an id or a folder)."""
    return model_check_file(name, job_key(ref))


def lora_dir(key, imported):
    """Where a LoRA job writes: trained and imported LoRAs keep apart."""
    return f"{SHARED}/{'imported' if imported else 'lora'}/{key}"


def anchor_file(character, key):
    return f"{SHARED}/anchors/{character}/{key}.safetensors"


def scene_file(scene, key, name):
    """A scene job's file (SCENE_FILES)."""
    return f"{SHARED}/scenes/{scene}/{key}/{SCENE_FILES[name]}"


def gpu_benchmark(rule, key, item=None):
    """The benchmark file of a GPU job, per character or scene where `item` is given (the manifest
    reads their timings)."""
    return os.path.join(SHARED, "benchmarks", rule, *([item] if item else []), f"{key}.tsv")
