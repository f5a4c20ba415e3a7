"""The DiffSynth-Studio 1.1 LoRA file (the challenge baseline's trainer): a Lightning `.ckpt` that
is a plain `{name: tensor}` dict (its `on_save_checkpoint` clears the checkpoint and stores only the
trainable LoRA tensors at the top level), names in DiffSynth's own UNet layout plus peft suffixes,
`blocks.7.transformer_blocks.0.attn1.to_q.lora_A.default.weight`.

No alpha is stored: DiffSynth's loader (`GeneralLoRAFromPeft.load`, via
`ModelManager.load_lora(path, lora_alpha=1.0)`) adds `lora_alpha * B @ A`, so with its default the
scale is 1, whatever rank/alpha the LoRA was trained with. Readers give such a file the alpha they
are told (config `train.diffsynth_alpha`), else alpha = rank (DiffSynth's scale 1).

Module names are translated with DiffSynth's own `SDXLUNetStateDictConverter.from_diffusers`, run
over this UNet's parameter names, so the map is exactly the one DiffSynth uses for Kolors.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from kolors_story.errors import UserError
from kolors_story.models.kolors_configs import full_size_unet
from kolors_story.models.lora.weights import SHOWN, LoraWeights, folded, lora_able_modules


def diffsynth_key_map(unet_state_keys: list[str]) -> dict[str, str]:
    """Diffusers Kolors UNet parameter name -> DiffSynth-Studio 1.1 name, for every key given.

    Runs DiffSynth's own `SDXLUNetStateDictConverter().from_diffusers` over the names (values are
    empty placeholders), which renames each key 1:1 and keeps the input order. Works for the
    full-size Kolors UNet and for the tiny test UNet (the converter counts blocks by type, and the
    tiny layout still gets distinct names; checked below).
    """
    from diffsynth.models.sdxl_unet import SDXLUNetStateDictConverter

    keys = list(unet_state_keys)
    placeholder = torch.empty(0)
    try:
        converted = SDXLUNetStateDictConverter().from_diffusers({k: placeholder for k in keys})
    except (ValueError, KeyError, IndexError) as err:
        raise UserError(
            f"DiffSynth names: this UNet's layout is not one DiffSynth-Studio's SDXL/Kolors "
            f"converter knows ({err}); use the diffusers LoRA format instead."
        ) from None
    if isinstance(converted, tuple):  # (state_dict, {"is_kolors": True}) for Kolors UNets
        converted = converted[0]
    names = list(converted)
    if len(names) != len(keys) or len(set(names)) != len(names):
        raise UserError(
            "DiffSynth names: DiffSynth-Studio's converter does not name this UNet's parameters "
            "one to one; use the diffusers LoRA format instead."
        )
    return dict(zip(keys, names))


def _clean_state_keys(unet: torch.nn.Module) -> list[str]:
    """The UNet's own parameter names, as without any peft adapter attached."""
    keys = []
    for key in unet.state_dict(keep_vars=True):
        parts = key.split(".")
        if any(p.startswith("lora_") for p in parts):
            continue
        keys.append(".".join(p for p in parts if p != "base_layer"))
    return keys


def module_map(unet: torch.nn.Module) -> dict[str, str]:
    """Diffusers name -> DiffSynth name of every LoRA-able module of this UNet."""
    params = diffsynth_key_map(_clean_state_keys(unet))
    modules = lora_able_modules(unet)
    out = {}
    for key, ds_key in params.items():
        module = key[: -len(".weight")]
        if key.endswith(".weight") and module in modules and ds_key.endswith(".weight"):
            out[module] = ds_key[: -len(".weight")]
    return out


def module_map_if_installed(unet: torch.nn.Module) -> dict[str, str]:
    """module_map, or {} where DiffSynth is not installed (the offline GPU host): its names need
    DiffSynth itself, so there only diffusers naming reads and a DiffSynth file names no layer."""
    return module_map(unet) if importlib.util.find_spec("diffsynth") else {}


def write_diffsynth_lora(weights: LoraWeights, out_path: Path, unet: torch.nn.Module | None = None) -> Path:
    """Write a DiffSynth-Studio 1.1 LoRA (`.ckpt`, top-level `blocks.N....lora_A.default.weight`
    tensors). The scale alpha/rank is folded into lora_B, so DiffSynth's default lora_alpha=1.0
    applies exactly this LoRA. DiffSynth names come from `unet` if given, else from the UNet the
    weights were read against (`weights.diffsynth_names`), else from the full-size Kolors layout."""
    if unet is not None:
        names = module_map(unet)
    elif weights.diffsynth_names and all(m in weights.diffsynth_names for m in weights.modules):
        names = weights.diffsynth_names
    else:
        names = module_map(full_size_unet())
    weights = folded(weights)  # DiffSynth's default lora_alpha=1.0 then applies this strength
    out: dict[str, torch.Tensor] = {}
    missing = [m for m in weights.modules if m not in names]
    if missing:
        raise UserError(f"DiffSynth export to {out_path}: layers not in this UNet: {', '.join(missing[:SHOWN])}")
    adapted = set(weights.modules)
    for module in sorted((m for m in names if m in adapted), key=lambda m: _block_id(names[m])):
        a = weights.state[f"{module}.lora_A.weight"]
        b = weights.state[f"{module}.lora_B.weight"]
        out[f"{names[module]}.lora_A.default.weight"] = a.detach().to("cpu", torch.float32).contiguous()
        out[f"{names[module]}.lora_B.default.weight"] = b.detach().to("cpu", torch.float32).contiguous()
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(out, out_path)
    return out_path


def _block_id(diffsynth_name: str) -> int:
    """DiffSynth's UNet registers its layers by block number: sorting the diffusers order by it
    (stable) gives the order its trainer saves the LoRA tensors in."""
    parts = diffsynth_name.split(".")
    return int(parts[1]) if parts[0] == "blocks" and parts[1].isdigit() else -1


__all__ = ["diffsynth_key_map", "module_map", "module_map_if_installed", "write_diffsynth_lora"]
