"""Tiny random-weight Kolors, saved in the real Kolors-diffusers layout.

The demo and the tests load it through the same code path as the real 16 GB model, so the loading,
training, LoRA and generation code is exercised for real. Shapes follow ../shared/FACTS.md: every
component keeps the real architecture and wiring (ChatGLM text encoder with hidden_states[-2]
prompt embeddings, text_proj UNet with text_time added embeddings, SDXL-style VAE), only narrower.
The tokenizer is the real Kolors ChatGLM tokenizer shipped inside the diffsynth 1.1.9 wheel.
"""

from __future__ import annotations

import shutil
from importlib import resources as importlib_resources
from pathlib import Path

import torch

# The real Kolors scheduler config (Kwai-Kolors/Kolors-diffusers scheduler/scheduler_config.json).
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
TEXT_WIDTH = 32  # tiny ChatGLM hidden size; the real one is 4096
TIME_EMBED = 8  # tiny addition_time_embed_dim; the real one is 256


def kolors_tokenizer_dir() -> Path:
    """The real Kolors ChatGLM tokenizer files inside the installed diffsynth 1.1.9 wheel."""
    root = importlib_resources.files("diffsynth") / "tokenizer_configs" / "kolors" / "tokenizer"
    path = Path(str(root))
    if not (path / "tokenizer.model").is_file():
        raise FileNotFoundError(f"Kolors tokenizer not found at {path}; install diffsynth==1.1.9")
    return path


def init_chatglm_(model: torch.nn.Module, seed: int) -> None:
    """ChatGLMModel leaves its weights uninitialised (FACTS.md): RMSNorm weights 1, biases 0,
    matrices N(0, 0.02) from a seeded generator, drawn in the parameter's own dtype (no fp32 copy
    of a full-width matrix; in fp32 the values equal randn * 0.02 bit for bit)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.fill_(1.0)
            elif name.endswith("bias"):
                param.zero_()
            else:
                param.normal_(0.0, 0.02, generator=gen)


def build_text_encoder(seed: int):
    from diffusers.pipelines.kolors.text_encoder import ChatGLMConfig, ChatGLMModel

    config = ChatGLMConfig(
        num_layers=2,  # >= 2 so hidden_states[-2] is not the raw embedding
        padded_vocab_size=65024,  # covers the real tokenizer's ids ([gMASK] is 64790)
        hidden_size=TEXT_WIDTH,
        ffn_hidden_size=64,
        kv_channels=8,
        num_attention_heads=4,
        seq_length=256,
        multi_query_attention=True,
        multi_query_group_num=2,
        add_qkv_bias=True,
        original_rope=True,
        torch_dtype="float32",
    )
    model = ChatGLMModel(config, empty_init=False)
    init_chatglm_(model, seed)
    return model.eval()


def build_unet(seed: int):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=32,
        in_channels=4,
        out_channels=4,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        norm_num_groups=4,
        cross_attention_dim=16,
        encoder_hid_dim=TEXT_WIDTH,
        encoder_hid_dim_type="text_proj",
        addition_embed_type="text_time",
        addition_time_embed_dim=TIME_EMBED,
        projection_class_embeddings_input_dim=6 * TIME_EMBED + TEXT_WIDTH,
        use_linear_projection=True,
        transformer_layers_per_block=1,
    )


def build_vae(seed: int):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=64,
        scaling_factor=0.13025,  # the SDXL/Kolors VAE value
    )


def build_tiny_kolors(out_dir: Path, seed: int = 0) -> Path:
    """Build and save a tiny Kolors pipeline folder (model_index.json, unet/, vae/, ...)."""
    from diffusers import EulerDiscreteScheduler, KolorsPipeline
    from diffusers.pipelines.kolors.tokenizer import ChatGLMTokenizer

    out_dir = Path(out_dir)
    tokenizer = ChatGLMTokenizer.from_pretrained(str(kolors_tokenizer_dir()))
    pipe = KolorsPipeline(
        vae=build_vae(seed),
        text_encoder=build_text_encoder(seed),
        tokenizer=tokenizer,
        unet=build_unet(seed),
        scheduler=EulerDiscreteScheduler(**KOLORS_SCHEDULER),
        force_zeros_for_empty_prompt=False,
    )
    if out_dir.exists():
        shutil.rmtree(out_dir)
    pipe.save_pretrained(str(out_dir))
    # The real repo ships the sentencepiece files as they are; keep ours byte-identical to them.
    for name in ("tokenizer.model", "tokenizer_config.json", "vocab.txt"):
        shutil.copyfile(kolors_tokenizer_dir() / name, out_dir / "tokenizer" / name)
    return out_dir
