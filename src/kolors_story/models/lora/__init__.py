"""The one owner of Kolors UNet LoRA files (../shared/FACTS.md, docs/lora-formats.md).

any_format: the entry point, recognise a file's format, read it checked against a UNet, convert
it (read_lora, convert_lora, lora_rank). One module a format reads and writes it:
diffusers_format (diffusers/peft `pytorch_lora_weights.safetensors`), diffsynth_format
(DiffSynth-Studio 1.1 `.ckpt`), kohya_format (kohya/ComfyUI keys). weights: the LoRA in memory
whatever its file (LoraWeights, folding, putting it on a UNet). tensor_files: the containers on
disk (safetensors, torch checkpoints).

Imports only models/ and the shared modules at the package root.
"""
