"""The LoRA adapter on the UNet being trained: add it (seeded, or from an imported LoRA file),
take its tensors out for checkpoints, save it as the run's diffusers file."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from kolors_story.training.settings import TrainSettings

log = logging.getLogger(__name__)


def add_lora(unet, settings: TrainSettings) -> list[torch.nn.Parameter]:
    """Freeze the UNet, attach LoRA adapters (seeded init, or an imported LoRA as the start) and
    return the trainable parameters, in fp32 even when the UNet is bf16/fp16."""
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig

    unet.requires_grad_(False)
    if settings.init_lora:
        from kolors_story.models.lora.any_format import read_lora
        from kolors_story.models.lora.weights import apply_to_unet

        # a DiffSynth .ckpt stores no alpha: it starts at train.diffsynth_alpha
        weights = read_lora(Path(settings.init_lora), unet, diffsynth_alpha=settings.diffsynth_alpha)
        apply_to_unet(weights, unet)
        log.info("starting from LoRA %s (%s format, rank %d, alpha %g)", settings.init_lora,
                 weights.source_format, weights.rank, weights.alpha)
    else:
        torch.manual_seed(settings.seed)
        unet.add_adapter(LoraConfig(r=settings.rank, lora_alpha=settings.alpha,
                                    init_lora_weights="gaussian",
                                    target_modules=list(settings.target_modules)))
    cast_training_params(unet, dtype=torch.float32)
    return [p for p in unet.parameters() if p.requires_grad]


def lora_state(unet) -> dict[str, torch.Tensor]:
    """The adapter's tensors in peft naming (what checkpoints store)."""
    from peft.utils import get_peft_model_state_dict

    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(unet).items()}


def save_lora(unet, out_dir: Path) -> Path:
    """The run's diffusers LoRA file (kolors_story.models.lora.diffusers_format): alpha/rank folded into
    lora_B and lora_alpha = r in its metadata, so stock load_lora_weights applies the trained
    scale whether or not it reads the metadata; equal tensors give the same bytes. Only this file
    is folded: checkpoints keep the peft tensors (lora_state), so a resumed run is unchanged."""
    from peft.utils import get_peft_model_state_dict

    from kolors_story.models.lora.diffusers_format import write_diffusers_lora
    from kolors_story.models.lora.weights import LoraWeights

    config = unet.peft_config["default"]
    if (config.rank_pattern or config.alpha_pattern or config.use_rslora or config.use_dora
            or isinstance(config.target_modules, str)):
        raise ValueError("save_lora writes plain single-rank LoRAs with listed target modules only")
    state = {k: v.detach().to("cpu", torch.float32).contiguous()
             for k, v in get_peft_model_state_dict(unet).items()}
    weights = LoraWeights(state, config.r, float(config.lora_alpha), target_modules=tuple(sorted(config.target_modules)))
    return write_diffusers_lora(weights, Path(out_dir))
