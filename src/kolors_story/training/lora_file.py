"""The LoRA adapter on the UNet: create it, move its tensors in and out, save it for diffusers."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from kolors_story.training.settings import TrainSettings

log = logging.getLogger(__name__)

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"


def add_lora(unet, settings: TrainSettings) -> list[torch.nn.Parameter]:
    """Freeze the UNet, attach LoRA adapters (seeded init, or an imported LoRA as the start) and
    return the trainable parameters, in fp32 even when the UNet is bf16/fp16."""
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig

    unet.requires_grad_(False)
    if settings.init_lora:
        from kolors_story import lora_io

        weights = lora_io.read_lora(Path(settings.init_lora), unet)
        lora_io.apply_to_unet(weights, unet)
        log.info("starting from LoRA %s (%s format, rank %d)", settings.init_lora,
                 weights.source_format, weights.rank)
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


def load_lora_state(unet, state: dict[str, torch.Tensor]) -> None:
    """Copy checkpointed adapter tensors into the UNet's existing adapter, exactly."""
    from peft.utils import set_peft_model_state_dict

    result = set_peft_model_state_dict(unet, state)
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise ValueError(f"checkpoint has LoRA keys this adapter lacks: {unexpected[:3]}")


def save_lora(unet, out_dir: Path) -> Path:
    """diffusers-format LoRA file; rank/alpha go in its metadata so stock load_lora_weights
    applies the trained scale."""
    from diffusers import KolorsPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    state = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()}
    KolorsPipeline.save_lora_weights(str(out_dir), unet_lora_layers=state, weight_name=LORA_WEIGHT_NAME,
                                     unet_lora_adapter_metadata=unet.peft_config["default"].to_dict())
    return Path(out_dir) / LORA_WEIGHT_NAME
