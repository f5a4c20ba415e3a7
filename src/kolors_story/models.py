"""Model preparation: fetch a ModelScope id or take a local folder, check its layout, load parts.

Layout checks run before any GPU work so that a half-downloaded or wrong folder is reported with
the list of missing files instead of a deep stack trace from from_pretrained.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch

from kolors_story.errors import UserError

log = logging.getLogger(__name__)

WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.safetensors.index.json", "*.bin.index.json")
KOLORS_LAYOUT = {
    "model_index.json": None,
    "unet": ("config.json",),
    "vae": ("config.json",),
    "text_encoder": ("config.json",),
    "tokenizer": ("tokenizer.model",),
    "scheduler": ("scheduler_config.json",),
}
WEIGHTED_PARTS = ("unet", "vae", "text_encoder")
AESTHETIC_WEIGHT_FILES = (
    "model.safetensors",
    "pytorch_model.bin",
    "model.safetensors.index.json",
    "pytorch_model.bin.index.json",
)



def _has_weights(folder: Path) -> bool:
    return any(any(folder.glob(p)) for p in WEIGHT_PATTERNS)


def kolors_layout_problems(path: Path) -> list[str]:
    """What is missing from a Kolors-diffusers folder (empty list: the layout is complete)."""
    problems = []
    for part, files in KOLORS_LAYOUT.items():
        if files is None:
            if not (path / part).is_file():
                problems.append(part)
            continue
        problems += [f"{part}/{f}" for f in files if not (path / part / f).is_file()]
        if part in WEIGHTED_PARTS and (path / part).is_dir() and not _has_weights(path / part):
            problems.append(f"{part}/ weights (*.safetensors or *.bin)")
    return problems


def check_kolors_dir(path: Path, config_key: str = "models.kolors") -> None:
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"{config_key}: model folder {path} does not exist.")
    problems = kolors_layout_problems(path)
    if problems:
        raise UserError(
            f"{config_key}: {path} is not a complete Kolors diffusers folder; missing: "
            f"{', '.join(problems)}. Point {config_key} at a copy of Kwai-Kolors/Kolors-diffusers "
            "or delete the folder so the workflow downloads it again."
        )


def check_aesthetic_dir(path: Path, config_key: str = "models.aesthetic") -> None:
    """Raise UserError naming every file the predictor folder lacks (model, preprocessing, tokenizer)."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(
            f"Aesthetic predictor folder {path} does not exist. Download the model "
            "(AI-ModelScope/aesthetics-predictor-v2-sac-logos-ava1-l14-linearMSE) there, or set "
            f"config key `{config_key}` to a folder that holds it."
        )
    required = ("config.json", "preprocessor_config.json")
    missing = [name for name in required if not (path / name).is_file()]
    if not any((path / name).is_file() for name in AESTHETIC_WEIGHT_FILES):
        missing.append("weights (one of " + ", ".join(AESTHETIC_WEIGHT_FILES) + ")")
    has_tokenizer = (path / "tokenizer.json").is_file() or all(
        (path / name).is_file() for name in ("vocab.json", "merges.txt")
    )
    if not has_tokenizer:
        missing.append("tokenizer (tokenizer.json, or vocab.json + merges.txt; CLIPProcessor needs it)")
    if missing:
        raise UserError(
            f"Aesthetic predictor folder {path} is incomplete; missing: {'; '.join(missing)}. "
            "It must hold a saved AestheticsPredictorV2Linear plus its CLIPProcessor files "
            "(as in AI-ModelScope/aesthetics-predictor-v2-sac-logos-ava1-l14-linearMSE); "
            f"download it again, rebuild the tiny one, or fix config key `{config_key}`."
        )


def weight_variant(path: Path, part: str = "unet") -> str | None:
    """Kwai-Kolors/Kolors-diffusers ships only fp16 files (`*.fp16.safetensors`)."""
    folder = Path(path) / part
    plain = any(f for f in folder.glob("*.safetensors") if ".fp16." not in f.name)
    return None if plain or not any(folder.glob("*.fp16.*")) else "fp16"


def download_model(model_id: str, out_dir: Path, config_key: str) -> Path:
    """snapshot_download a ModelScope model into out_dir; no network -> UserError naming the key."""
    from modelscope import snapshot_download

    start = time.monotonic()
    try:
        path = snapshot_download(model_id, local_dir=str(out_dir))
    except Exception as err:  # modelscope raises HubError/NetworkError/OSError/requests errors
        waited = time.monotonic() - start
        raise UserError(
            f"{config_key}: could not download ModelScope model '{model_id}' after {waited:.0f} s "
            f"({type(err).__name__}: {str(err)[:200]}). Without network, download it elsewhere and "
            f"set {config_key} to the local folder (a path starting with /, ./ or resources/)."
        ) from None
    return Path(path)


def describe_model(path: Path) -> dict:
    """Small summary for the manifest: where the model is and hashes of its config files."""
    from kolors_story.manifest import sha256_file

    path = Path(path)
    configs = sorted(p for p in path.rglob("*.json") if p.stat().st_size < 1_000_000)
    return {
        "path": str(path.resolve()),
        "config_sha256": {str(p.relative_to(path)): sha256_file(p) for p in configs},
    }


def torch_dtype(precision: str) -> torch.dtype:
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_tokenizer(path: Path):
    from diffusers.pipelines.kolors.tokenizer import ChatGLMTokenizer

    return ChatGLMTokenizer.from_pretrained(str(Path(path) / "tokenizer"))


def load_text_encoder(path: Path, dtype: torch.dtype):
    from diffusers.pipelines.kolors.text_encoder import ChatGLMModel

    variant = weight_variant(path, "text_encoder")
    return ChatGLMModel.from_pretrained(
        str(Path(path) / "text_encoder"), torch_dtype=dtype, variant=variant
    ).eval()


def load_unet(path: Path, dtype: torch.dtype):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(
        str(path), subfolder="unet", torch_dtype=dtype, variant=weight_variant(path, "unet")
    )


def load_vae(path: Path, dtype: torch.dtype):
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(
        str(path), subfolder="vae", torch_dtype=dtype, variant=weight_variant(path, "vae")
    ).eval()


def read_model_index(path: Path) -> dict:
    with open(Path(path) / "model_index.json", encoding="utf-8") as f:
        return json.load(f)


def latent_geometry(path: Path) -> tuple[int, int]:
    """(latent channels, pixels per latent cell) of the VAE, read from its config (no weights)."""
    with open(Path(path) / "vae" / "config.json", encoding="utf-8") as f:
        config = json.load(f)
    return int(config.get("latent_channels", 4)), 2 ** (len(config["block_out_channels"]) - 1)
