"""The real Kolors UNet's shape: its config (Kwai-Kolors/Kolors-diffusers unet/config.json, the
parts that shape the network; ../shared/FACTS.md), and UNets on the meta device (names and shapes
without weights) for code that needs only the layout, such as converting LoRA files."""

from __future__ import annotations

from pathlib import Path

import torch

from kolors_story.models.kolors_folder import KolorsFolder

KOLORS_UNET_CONFIG = dict(
    sample_size=128,
    in_channels=4,
    out_channels=4,
    block_out_channels=(320, 640, 1280),
    layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048,
    encoder_hid_dim=4096,
    encoder_hid_dim_type="text_proj",
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=5632,
    use_linear_projection=True,
)


def full_size_unet() -> torch.nn.Module:
    """The real Kolors UNet layout on the meta device (no memory, ~0.4 s): names and shapes only."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel(**KOLORS_UNET_CONFIG)


def unet_skeleton(model_dir: Path) -> torch.nn.Module:
    """The UNet of a Kolors folder on the meta device (from unet/config.json, read by the folder's
    owner): names and shapes for converting LoRA files, without loading gigabytes of weights."""
    from diffusers import UNet2DConditionModel

    config = KolorsFolder(model_dir).config("unet")
    with torch.device("meta"):
        return UNet2DConditionModel.from_config(config)


__all__ = ["KOLORS_UNET_CONFIG", "full_size_unet", "unet_skeleton"]
