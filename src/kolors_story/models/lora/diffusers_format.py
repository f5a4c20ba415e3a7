"""The diffusers/peft LoRA file: `pytorch_lora_weights.safetensors`, keys
`unet.<module>.lora.down.weight` / `.lora.up.weight` (or peft's `.lora_A.weight` /
`.lora_B.weight`), the peft LoraConfig (r, lora_alpha, target modules) in the safetensors metadata.

Applied scale: lora_alpha / r; with no metadata (diffusers before 0.34.0, a copy whose metadata was
stripped, other tools) loaders use lora_alpha = r. So the files written here have alpha/r folded
into lora_B and lora_alpha = r: every loader applies the same strength. Their bytes depend only on
the tensors (sorted target modules, sorted safetensors metadata keys). The keys themselves are
parsed in any_format, which tells them from DiffSynth's peft keys.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from kolors_story.errors import UserError
from kolors_story.models.lora.tensor_files import make_room, sort_safetensors_metadata
from kolors_story.models.lora.weights import LoraWeights, folded, lora_config
from kolors_story.run_files import LORA_WEIGHT_NAME

METADATA_KEY = "lora_adapter_metadata"  # where diffusers' save_lora_weights stores the LoraConfigs


def adapter_metadata(weights: LoraWeights) -> dict:
    """The LoraConfig that diffusers stores in the metadata, set-valued fields (target_modules)
    as sorted lists: diffusers writes list(set), whose order changes from process to process."""
    config = lora_config(weights).to_dict()
    return {k: sorted(v) if isinstance(v, (set, frozenset)) else v for k, v in config.items()}


def write_diffusers_lora(weights: LoraWeights, out_dir: Path) -> Path:
    """Write `<out_dir>/pytorch_lora_weights.safetensors` for stock
    `KolorsPipeline.load_lora_weights(out_dir, weight_name=...)`: scale folded into lora_B and
    lora_alpha = r in the metadata (the same strength with or without the metadata); equal
    tensors give the same bytes."""
    from diffusers import KolorsPipeline
    from diffusers.utils import convert_state_dict_to_diffusers

    weights = folded(weights)
    state = convert_state_dict_to_diffusers({k: v.contiguous() for k, v in weights.state.items()})
    make_room(Path(out_dir), state, "the LoRA file")
    KolorsPipeline.save_lora_weights(
        str(out_dir),
        unet_lora_layers=state,
        weight_name=LORA_WEIGHT_NAME,
        unet_lora_adapter_metadata=adapter_metadata(weights),
    )
    path = Path(out_dir) / LORA_WEIGHT_NAME
    sort_safetensors_metadata(path)
    return path


# ---------------------------------------------------------------- reading the stored alpha
def stored_alpha(metadata: dict[str, str], rank: int, path: Path) -> float:
    """The lora_alpha a diffusers file's metadata gives its UNet LoRA, else the rank (what
    diffusers assumes without metadata); UserError for a LoraConfig this project cannot carry."""
    config = _metadata_config(metadata, path)
    return _alpha_from_config(config, rank, path) if config else float(rank)


def _metadata_config(metadata: dict[str, str], path: Path) -> dict | None:
    """The unet's peft LoraConfig dict stored by diffusers' save_lora_weights, if any."""
    raw = metadata.get(METADATA_KEY)
    if not raw:
        return None
    try:
        packed = json.loads(raw)
    except json.JSONDecodeError:
        raise UserError(f"LoRA file {path}: its lora_adapter_metadata is not JSON.") from None
    unet = {k[len("unet."):]: v for k, v in packed.items() if k.startswith("unet.")}
    return unet or None


def _alpha_from_config(config: dict, rank: int, path: Path) -> float:
    if config.get("r") not in (None, rank):
        raise UserError(f"LoRA file {path}: metadata says r={config['r']} but the tensors have rank {rank}.")
    if config.get("rank_pattern") or config.get("alpha_pattern") or config.get("use_dora"):
        raise UserError(
            f"LoRA file {path} uses per-layer ranks/alphas or DoRA (metadata rank_pattern/"
            f"alpha_pattern/use_dora); only a plain single-rank LoRA can be converted."
        )
    alpha = float(config.get("lora_alpha", rank))
    if config.get("use_rslora"):
        alpha *= math.sqrt(rank)  # rsLoRA scale alpha/sqrt(r) == (alpha*sqrt(r))/r
    return alpha


__all__ = ["METADATA_KEY", "adapter_metadata", "stored_alpha", "write_diffusers_lora"]
