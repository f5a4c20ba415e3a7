"""Random-weight Kolors, tiny or full size, saved in the real Kwai-Kolors/Kolors-diffusers layout.

The demo and the tests load the tiny one through the same code path as the real 16 GB model, so the loading,
training, LoRA and generation code is exercised for real. Shapes follow ../shared/FACTS.md: every
component keeps the real architecture and wiring (ChatGLM text encoder with hidden_states[-2]
prompt embeddings, text_proj UNet with text_time added embeddings, SDXL-style VAE), only narrower.
The tokenizer is the real Kolors ChatGLM tokenizer shipped inside the diffsynth 1.1.9 wheel.
`build_full_kolors` writes the real shapes (the GPU check and the benchmarks use them).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
from pathlib import Path

import torch

from kolors_story.files import share_as_umask_allows, write_json
from kolors_story.models.kolors_configs import CHATGLM3_6B, MODEL_INDEX, SCHEDULER_CONFIG, SDXL_VAE

TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json", "vocab.txt")  # tokenizer/, as shipped
TEXT_ENCODER_SHARDS = 3  # text_encoder/model.fp16-0000N-of-00003.safetensors
TEXT_WIDTH = 32  # tiny ChatGLM hidden size; the real one is 4096
TIME_EMBED = 8  # tiny addition_time_embed_dim; the real one is 256


TOKENIZER_ENV = "KOLORS_TOKENIZER_DIR"  # a copy of the files (an offline GPU host without diffsynth)


def kolors_tokenizer_dir() -> Path:
    """The real Kolors ChatGLM tokenizer files inside the installed diffsynth 1.1.9 wheel, found
    without importing diffsynth (its import pulls many packages), or where $KOLORS_TOKENIZER_DIR says."""
    if os.environ.get(TOKENIZER_ENV):
        path = Path(os.environ[TOKENIZER_ENV])
    else:
        spec = importlib.util.find_spec("diffsynth")
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(f"Kolors tokenizer not found: install diffsynth==1.1.9 or set ${TOKENIZER_ENV}")
        path = Path(list(spec.submodule_search_locations)[0]) / "tokenizer_configs" / "kolors" / "tokenizer"
    if not (path / "tokenizer.model").is_file():
        raise FileNotFoundError(f"Kolors tokenizer not found at {path}; install diffsynth==1.1.9 or set ${TOKENIZER_ENV}")
    return path




def init_chatglm_(model: torch.nn.Module, seed: int) -> None:
    """ChatGLMModel leaves its weights uninitialised (FACTS.md): RMSNorm weights 1, biases 0,
    matrices N(0, 0.02) from a seeded generator on the model's device, drawn in the parameter's
    own dtype (no fp32 copy of a full-width matrix; in fp32 the values equal randn * 0.02 bit for bit)."""
    gen = torch.Generator(next(model.parameters()).device).manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.fill_(1.0)
            elif name.endswith("bias"):
                param.zero_()
            else:
                param.normal_(0.0, 0.02, generator=gen)


TINY_CHATGLM = dict(
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


def build_text_encoder(seed: int):
    from diffusers.pipelines.kolors.text_encoder import ChatGLMConfig, ChatGLMModel

    config = ChatGLMConfig(**TINY_CHATGLM)
    model = ChatGLMModel(config, empty_init=False)
    init_chatglm_(model, seed)
    return model.eval()


TINY_UNET = dict(  # the Kolors UNet's layout (text_proj, text_time) at tiny widths
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
TINY_VAE = dict(
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


def build_unet(seed: int):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(**TINY_UNET)


def build_vae(seed: int):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(**TINY_VAE)


def save_kolors_folder(out_dir: Path, unet, vae, text_encoder) -> Path:
    """Write components exactly as Kwai-Kolors/Kolors-diffusers is laid out: fp16 weights only
    (`*.fp16.safetensors`), the text encoder in 3 shards with transformers' variant index
    `model.safetensors.index.fp16.json`, the shipped tokenizer files, the real model_index.json and
    scheduler config. The modules are converted to fp16 in place."""
    out_dir = Path(out_dir)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    unet.half().save_pretrained(out_dir / "unet", variant="fp16")
    vae.half().save_pretrained(out_dir / "vae", variant="fp16")
    text_encoder.half()
    text_encoder.save_pretrained(out_dir / "text_encoder", variant="fp16",
                                 max_shard_size=shard_size(text_encoder.state_dict(), TEXT_ENCODER_SHARDS))
    (out_dir / "tokenizer").mkdir()
    for name in TOKENIZER_FILES:
        shutil.copyfile(kolors_tokenizer_dir() / name, out_dir / "tokenizer" / name)
    (out_dir / "scheduler").mkdir()
    write_json(SCHEDULER_CONFIG, out_dir / "scheduler" / "scheduler_config.json", sort_keys=True)
    write_json(MODEL_INDEX, out_dir / "model_index.json", sort_keys=True)
    return share_as_umask_allows(out_dir)  # save_pretrained's safetensors files are 0600


def _shard_count(state_dict: dict[str, torch.Tensor], max_shard_size: int) -> int:
    from huggingface_hub import split_torch_state_dict_into_shards  # what save_pretrained splits with

    return len(split_torch_state_dict_into_shards(state_dict, max_shard_size=max_shard_size).filename_to_tensors)


def shard_size(state_dict: dict[str, torch.Tensor], shards: int) -> int:
    """The smallest max_shard_size, no smaller than the largest tensor, at which save_pretrained
    writes `state_dict` in exactly `shards` files. Its split is greedy in key order (a shard is
    closed when the next tensor would overflow it), so total // shards + 1 can leave a fourth
    shard (the full ChatGLM3: 4.09 + 4.08 + 3.78 + 0.53 GB); no tensor is bigger than the size
    found, so each shard holds consecutive tensors as in the real repos. Works on meta tensors."""
    sizes = [t.untyped_storage().nbytes() for t in state_dict.values()]
    low, high = max(sizes), sum(sizes)  # the greedy count only falls as the size grows
    while low < high:
        mid = (low + high) // 2
        if _shard_count(state_dict, mid) <= shards:
            high = mid
        else:
            low = mid + 1
    if _shard_count(state_dict, low) != shards:
        raise ValueError(f"no max_shard_size splits these {len(sizes)} tensors into exactly {shards} shards")
    return low


@contextlib.contextmanager
def building(dtype: torch.dtype, device: torch.device | str = "cpu"):
    """Build modules straight in `dtype` on `device` (no fp32 copy on the CPU that would double
    the peak memory of a full-size model)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(old)


def build_full_unet(seed: int = 0, dtype: torch.dtype = torch.float16, device: torch.device | str = "cpu"):
    from diffusers import UNet2DConditionModel

    from kolors_story.models.kolors_configs import KOLORS_UNET_CONFIG

    torch.manual_seed(seed)
    with building(dtype, device):
        return UNet2DConditionModel(**KOLORS_UNET_CONFIG)


def build_full_vae(seed: int = 0, dtype: torch.dtype = torch.float16, device: torch.device | str = "cpu"):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    with building(dtype, device):
        return AutoencoderKL(**SDXL_VAE).eval()


def build_full_text_encoder(seed: int = 0, dtype: torch.dtype = torch.float16, device: torch.device | str = "cpu",
                            num_layers: int = CHATGLM3_6B["num_layers"]):
    from diffusers.pipelines.kolors.text_encoder import ChatGLMConfig, ChatGLMModel

    with building(dtype, device):
        model = ChatGLMModel(ChatGLMConfig(**{**CHATGLM3_6B, "num_layers": num_layers}), empty_init=False)
    init_chatglm_(model, seed)
    return model.eval()


def build_full_kolors(out_dir: Path, seed: int = 0, device: torch.device | str = "cpu") -> Path:
    """Random-weight Kolors at the real sizes (2.6 B UNet, 6.2 B ChatGLM3, SDXL VAE; 17.7 GB of
    fp16 files), written in the real layout. On a GPU the weights are drawn there, in fp16."""
    return save_kolors_folder(out_dir, build_full_unet(seed, device=device), build_full_vae(seed, device=device),
                              build_full_text_encoder(seed, device=device))


def build_tiny_kolors(out_dir: Path, seed: int = 0) -> Path:
    """Build and save a tiny Kolors folder in the real Kolors-diffusers layout."""
    return save_kolors_folder(out_dir, build_unet(seed), build_vae(seed), build_text_encoder(seed))
