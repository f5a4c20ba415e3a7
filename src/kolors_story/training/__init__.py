"""LoRA fine-tuning of the Kolors UNet with diffusers + peft.

Modules: settings (what can be set), data (examples, buckets, crops, batch order), caches and
encoding (text embeddings and latents computed once, on disk), objective (noise, min-SNR),
lora_file (the adapter and its diffusers file), checkpoints (exact resume), validation
(render + challenge score per checkpoint), loop (train_lora), processes (data-parallel ranks under
accelerate launch), launch (one process or N), report (CSV/PNG).
"""

from kolors_story.training.encoding import encode_latents
from kolors_story.training.lora_file import LORA_WEIGHT_NAME, add_lora, save_lora
from kolors_story.training.loop import TrainingDiverged, TrainResult, train_lora
from kolors_story.training.report import write_loss_log, write_validation_log
from kolors_story.training.settings import TrainSettings, ValidationSettings

__all__ = ["LORA_WEIGHT_NAME", "TrainResult", "TrainSettings", "TrainingDiverged", "ValidationSettings",
           "add_lora", "encode_latents", "save_lora", "train_lora", "write_loss_log", "write_validation_log"]
