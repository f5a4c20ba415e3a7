"""A LoRA in memory, whatever file it came from or goes to: `LoraWeights`, the UNet layers a LoRA
may adapt, the scale folded into lora_B, and the LoRA put on a UNet as a peft adapter."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

import torch

SHOWN = 5  # offending keys named in an error message


def shown(keys: list[str]) -> str:
    """The first keys of a list, for an error message that must stay readable."""
    return ", ".join(keys[:SHOWN]) + (f" (+{len(keys) - SHOWN} more)" if len(keys) > SHOWN else "")


@dataclass
class LoraWeights:
    """A UNet LoRA in peft layout: `state` maps `<module>.lora_A.weight` / `<module>.lora_B.weight`
    (diffusers module names, float32 CPU tensors) and the update is (alpha / rank) * B @ A."""

    state: dict[str, torch.Tensor]
    rank: int
    alpha: float
    # kohya/comfyui/processor: the spellings ComfyUI reads (kohya_format.FORMATS)
    source_format: Literal["diffusers", "diffsynth", "kohya", "comfyui", "processor"] = "diffusers"
    target_modules: tuple[str, ...] = ()  # LoraConfig target_modules; () = the full module names
    diffsynth_names: dict[str, str] = field(default_factory=dict, repr=False)  # module -> DiffSynth
    skipped: tuple[str, ...] = ()  # text-encoder keys of a kohya file, left out

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def modules(self) -> list[str]:
        """Diffusers names of the adapted modules, in file order."""
        return [k[: -len(".lora_A.weight")] for k in self.state if k.endswith(".lora_A.weight")]

    def targets(self) -> list[str]:
        return list(self.target_modules) or self.modules


def lora_config(weights: LoraWeights):
    """The peft LoraConfig of these weights (what a UNet adapter and diffusers' metadata take)."""
    from peft import LoraConfig

    return LoraConfig(r=weights.rank, lora_alpha=weights.alpha, target_modules=weights.targets())


def folded(weights: LoraWeights) -> LoraWeights:
    """The same update with its scale alpha/rank multiplied into lora_B and alpha = rank (scale
    1), so a loader that never sees the alpha (no metadata: alpha = rank) applies the same
    strength. Bitwise the same output for power-of-two scales (4/16, 2/4: exact in fp32),
    otherwise one fp32 rounding of B."""
    scale = weights.scale
    if scale == 1.0:
        return weights
    state = {k: (v * scale).contiguous() if k.endswith(".lora_B.weight") else v
             for k, v in weights.state.items()}
    return replace(weights, state=state, alpha=float(weights.rank))


# ---------------------------------------------------------------- the UNet's side
def lora_able_modules(unet: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Linear/Conv2d layers of the UNet by name; peft-wrapped layers count as their base layer."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    found: dict[str, torch.nn.Module] = {}
    for name, module in unet.named_modules():
        if is_peft_internal(name):
            continue
        if isinstance(module, BaseTunerLayer):
            module = module.get_base_layer()
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            found[name] = module
    return found


def is_peft_internal(name: str) -> bool:
    """A module peft added (the wrapped base layer, the lora_A/lora_B containers)."""
    return any(part == "base_layer" or part.startswith("lora_") for part in name.split("."))


def target_modules(modules: list[str], unet: torch.nn.Module) -> tuple[str, ...]:
    """Short LoraConfig targets ("to_q", "to_out.0") when they pick exactly these modules, else
    the full module names."""
    def suffix(name: str) -> str:
        parts = name.split(".")
        return ".".join(parts[-2:]) if parts[-1].isdigit() and len(parts) > 1 else parts[-1]

    wanted = set(modules)
    short = sorted({suffix(m) for m in modules})
    picked = {
        name for name, _ in unet.named_modules()
        if name and not is_peft_internal(name) and any(name == s or name.endswith("." + s) for s in short)
    }
    return tuple(short) if picked == wanted else tuple(sorted(wanted))


def apply_to_unet(weights: LoraWeights, unet: torch.nn.Module, adapter_name: str = "default") -> None:
    """Attach `weights` to `unet` as a peft adapter (its r/alpha/targets) and load the tensors,
    e.g. to continue training from an imported LoRA. The LoRA tensors stay float32 (exact, as the
    trainer keeps them; peft casts activations to them) on the layer's device; the UNet's own
    weights are left as they are."""
    if adapter_name in (getattr(unet, "peft_config", None) or {}):
        raise ValueError(f"the UNet already has an adapter named {adapter_name!r}")
    unet.add_adapter(lora_config(weights), adapter_name=adapter_name)
    from peft.tuners.tuners_utils import BaseTunerLayer

    injected = {
        name for name, module in unet.named_modules()
        if isinstance(module, BaseTunerLayer) and adapter_name in getattr(module, "lora_A", {})
    }
    if injected != set(weights.modules):
        raise RuntimeError(
            f"adapter targets {sorted(injected ^ set(weights.modules))[:SHOWN]} differ from the LoRA's layers"
        )
    for module in weights.modules:  # float32 first: peft made the layers in the UNet's dtype
        layer = unet.get_submodule(module)
        layer.lora_A[adapter_name].to(torch.float32)
        layer.lora_B[adapter_name].to(torch.float32)
    load_lora_state(unet, weights.state, adapter_name)


def load_lora_state(unet: torch.nn.Module, state: dict[str, torch.Tensor], adapter_name: str = "default") -> None:
    """Copy adapter tensors in peft naming (`<module>.lora_A.weight`) into the UNet's existing
    adapter, exactly (peft's set_peft_model_state_dict: each into its parameter's dtype and device)."""
    from peft.utils import set_peft_model_state_dict

    result = set_peft_model_state_dict(unet, state, adapter_name=adapter_name)
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise ValueError(f"checkpoint has LoRA keys this adapter lacks: {unexpected[:3]}")


__all__ = ["LoraWeights", "apply_to_unet", "folded", "is_peft_internal", "load_lora_state", "lora_able_modules",
           "lora_config", "shown", "target_modules"]
