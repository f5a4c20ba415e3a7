"""The names of the files a run leaves: under results/<run>/ and in the shared jobs' folders
(results/shared/<stage>/<key>/). The rules and the library read them here, so a name is spelled
once. Folders (where a key goes) are the rules' business (rules/paths.smk)."""

from __future__ import annotations

# What diffusers' `load_lora_weights` looks for by default (diffusers.loaders.lora_base
# LORA_WEIGHT_NAME_SAFE): the run's LoRA keeps it, so the folder loads with no weight_name.
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
DIFFSYNTH_LORA_NAME = "diffsynth_lora.ckpt"  # DiffSynth-Studio's keys, as the challenge's baseline saved them
COMFYUI_LORA_NAME = "comfyui_lora.safetensors"  # kohya keys: ComfyUI's LoraLoaderModelOnly (docs/lora-formats.md)

# A LoRA job's files (results/shared/lora/<key>/, and results/<run>/lora/), by the rules' output name.
LORA_FORMAT_FILES = {"lora": LORA_WEIGHT_NAME, "diffsynth": DIFFSYNTH_LORA_NAME, "comfyui": COMFYUI_LORA_NAME}
TRAINING_CURVE_FILES = {
    "loss_csv": "loss.csv",
    "loss_png": "loss.png",
    "validation_csv": "validation.csv",
    "validation_png": "validation.png",
    "summary": "training_summary.json",
}
LORA_FILES = {**LORA_FORMAT_FILES, **TRAINING_CURVE_FILES}  # what a training job writes

# A keyed job's files, by the rule's output name.
DOWNLOAD_FILES = {
    "rows": "rows.jsonl",
    "images": "images",
    "stats": "download_stats.json",
    "content": "content.json",  # the local files it read and their sha256: the next plan names what changed
}
FILTER_FILES = {"rows": "filtered.jsonl", "stats": "filter_stats.json", "dropped": "dropped.png"}  # stats, dropped: results/<run>/data/ too
CAPTION_FILES = {"rows": "captioned.jsonl", "record": "captions.jsonl", "page": "captions.html"}
RUN_CAPTION_FILES = ("record", "page")  # the ones results/<run>/data/ holds too
TRAINING_FOLDER = "dataset"  # build_metadata's: metadata.csv and the images
EMBEDDINGS_FILE = "embeddings.safetensors"  # an encode job's texts, results/shared/embeddings/<key>/
SCENE_FILES = {"panel": "panel.png", "candidates": "candidates"}
WRITTEN_FILE = "scenes.yaml"  # the prompt writer's scenes, results/shared/prompts/<key>/
TRANSCRIPT_FILE = "prompt_writer.jsonl"  # every request and raw reply of the writing; results/<run>/ too
WRITER_FILES = {"scenes": WRITTEN_FILE, "transcript": TRANSCRIPT_FILE}

# results/<run>/'s own files (beside data/, lora/, scenes/<id>.png, candidates/<id>/), by output name.
RUN_FILES = {
    "story": "story.png",
    "contact_sheet": "contact_sheet.png",
    "scores_csv": "scores.csv",
    "scores": "scores.json",
    "bundle": "bundle",
    "manifest": "manifest.json",
    "config": "config.yaml",  # the variant's resolved config: what reproduces it
    "timings": "timings.png",
    "upload": "upload.json",
    "prompts": "prompts.yaml",  # the writer's scenes, to paste into story.scenes
    "transcript": TRANSCRIPT_FILE,
}
RUN_OUTPUTS = ("story", "scores_csv", "scores", "bundle", "manifest", "config")  # what rule all asks of every run
