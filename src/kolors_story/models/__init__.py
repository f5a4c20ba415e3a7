"""The outside things a run loads, each with one owner: the Kolors folder (kolors_folder), its text
embeddings and their content-keyed cache (prompt_embeddings, tensor_cache), LoRA files in the
diffusers, DiffSynth-Studio and kohya/ComfyUI formats (the lora subpackage), the real Kolors UNet's
config (kolors_configs), the challenge's aesthetic predictor (aesthetic), model downloads (hub),
precisions and devices (devices), and random-weight models in the real layouts, tiny and full size
(random_kolors, random_aesthetic, random_blip).

Uses nothing of the workflow: only the shared modules at the package root (errors, files).
"""
