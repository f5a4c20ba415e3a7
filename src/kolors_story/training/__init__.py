"""LoRA fine-tuning of the Kolors UNet with diffusers + peft.

Modules: settings (what can be set), data (examples, buckets, crops, batch order), caches and
encoding (text embeddings and latents computed once, on disk), objective (noise, min-SNR),
lora_adapter (the LoRA on the UNet being trained: added, its state, saved as the run's diffusers
file), checkpoints (exact resume), validation (render + challenge score per checkpoint), loop
(train_lora), processes (data-parallel ranks under accelerate launch), launch (one process or N),
report (CSV/PNG).
"""

from importlib import import_module

# Names resolved on first use (PEP 562): importing one module of the package (gpu_check takes
# training.data) must not load the loop, its validation and the aesthetic predictor with it.
_EXPORTS = {
    "encode_latents": "encoding", "add_lora": "lora_adapter", "save_lora": "lora_adapter",
    "TrainingDiverged": "loop", "TrainResult": "loop", "train_lora": "loop",
    "write_loss_log": "report", "write_validation_log": "report", "TrainSettings": "settings", "TrainJob": "settings",
    "ValidationSettings": "settings",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f"{__name__}.{_EXPORTS[name]}"), name)
