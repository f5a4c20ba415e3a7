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

EMBEDDINGS_FILE = "embeddings.safetensors"  # an encode job's texts, results/shared/embeddings/<key>/
DATASET_CONTENT = "content.json"  # beside a download job's rows: the files it read and their sha256
CAPTION_FILES = {"record": "captions.jsonl", "page": "captions.html"}  # a caption job's; results/<run>/data/ too
WRITTEN_FILE = "scenes.yaml"  # the prompt writer's scenes, results/shared/prompts/<key>/
TRANSCRIPT_FILE = "prompt_writer.jsonl"  # every request and raw reply of the writing; results/<run>/ too

# results/<run>/: what rule all asks of every run (more with captions, a writer or an upload).
RUN_OUTPUTS = ("story.png", "scores.csv", "scores.json", f"lora/{LORA_WEIGHT_NAME}", "bundle", "manifest.json",
               "config.yaml")
UPLOAD_RECORD = "upload.json"
WRITTEN_PROMPTS = "prompts.yaml"  # results/<run>/: the writer's scenes, to paste into story.scenes
