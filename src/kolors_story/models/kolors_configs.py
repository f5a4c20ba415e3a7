"""The real Kolors model's configs (Kwai-Kolors/Kolors-diffusers: model_index.json, the scheduler's,
the parts of the UNet's, VAE's and ChatGLM's that shape each network; ../shared/FACTS.md), and UNets
on the meta device (names and shapes without weights) for code that needs only the layout, such
as converting LoRA files. random_kolors builds random-weight models from them."""

from __future__ import annotations

from pathlib import Path

import torch

from kolors_story.models.kolors_folder import KolorsFolder

# The real Kolors scheduler config (Kwai-Kolors/Kolors-diffusers scheduler/scheduler_config.json);
# the values of FACTS.md, the key set of the file (SDXL's keys plus Kolors' thresholding ones).
KOLORS_SCHEDULER = dict(
    num_train_timesteps=1100,
    beta_start=0.00085,
    beta_end=0.014,
    beta_schedule="scaled_linear",
    prediction_type="epsilon",
    steps_offset=1,
    timestep_spacing="leading",
    interpolation_type="linear",
    use_karras_sigmas=False,
)
SCHEDULER_CONFIG = {
    "_class_name": "EulerDiscreteScheduler", "_diffusers_version": "0.30.0.dev0",
    "beta_end": 0.014, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False,
    "dynamic_thresholding_ratio": 0.995, "interpolation_type": "linear", "num_train_timesteps": 1100,
    "prediction_type": "epsilon", "rescale_betas_zero_snr": False, "sample_max_value": 1.0,
    "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "thresholding": False,
    "timestep_spacing": "leading", "trained_betas": None, "use_karras_sigmas": False,
}
# Kwai-Kolors/Kolors-diffusers model_index.json, key for key.
MODEL_INDEX = {
    "_class_name": "KolorsPipeline", "_diffusers_version": "0.30.0.dev0", "force_zeros_for_empty_prompt": False,
    "scheduler": ["diffusers", "EulerDiscreteScheduler"], "text_encoder": ["kolors", "ChatGLMModel"],
    "tokenizer": ["kolors", "ChatGLMTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}

# The SDXL VAE (Kolors ships it; the challenge used sdxl-vae-fp16-fix, same shapes).
SDXL_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=32,
    sample_size=1024,
    scaling_factor=0.13025,
)
# ChatGLM3-6B as Kolors uses it (FACTS.md).
CHATGLM3_6B = dict(
    num_layers=28,
    padded_vocab_size=65024,
    hidden_size=4096,
    ffn_hidden_size=13696,
    kv_channels=128,
    num_attention_heads=32,
    seq_length=256,  # Kolors' prompt length (the real config says 32768; shapes do not depend on it)
    multi_query_attention=True,
    multi_query_group_num=2,
    add_qkv_bias=True,
    add_bias_linear=False,
    rmsnorm=True,
    apply_residual_connection_post_layernorm=False,
    post_layer_norm=True,
    original_rope=True,  # ChatGLMConfig lacks it, ChatGLMModel reads it (FACTS.md)
)
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


__all__ = ["CHATGLM3_6B", "KOLORS_SCHEDULER", "KOLORS_UNET_CONFIG", "MODEL_INDEX", "SCHEDULER_CONFIG", "SDXL_VAE",
           "full_size_unet", "unet_skeleton"]
