"""The LoRA files a bundle carries (config `bundle.formats`) and the model card's table of which
file and strength each tool takes (docs/lora-formats.md).

Every file holds the same update with the trained scale alpha / rank folded in, so each tool's
default strength 1.0 is the trained strength; only the challenge baseline's own render script,
which wraps the UNet in a fixed peft LoraConfig, needs its alpha set to the rank.
"""

from __future__ import annotations

import re

from kolors_story.run_files import DIFFSYNTH_LORA_NAME, LORA_WEIGHT_NAME

FORMATS = ("diffusers", "diffsynth", "comfyui")  # schema bundle.formats' items
BASELINE_RANK, BASELINE_ALPHA = 16, 2.0  # the baseline rendered its .ckpt with LoraConfig(r=16, lora_alpha=2.0)


def file_stem(repo_id: str | None, run_name: str) -> str:
    """What the ComfyUI file is called after: the repo's name, else the run's (ComfyUI lists
    LoRAs by file name, so `pytorch_lora_weights` would say nothing)."""
    name = repo_id.split("/")[-1] if repo_id else run_name
    return re.sub(r"[^\w.-]+", "_", name).strip("._") or "kolors_style"


def bundle_names(formats: list[str], stem: str) -> dict[str, str]:
    """format -> file name in the bundle, for the formats asked for (diffusers always)."""
    names = {"diffusers": LORA_WEIGHT_NAME, "diffsynth": DIFFSYNTH_LORA_NAME, "comfyui": f"{stem}_comfyui.safetensors"}
    return {f: names[f] for f in FORMATS if f in formats or f == "diffusers"}


def _scales(lora_scales: list[float]) -> str:
    values = sorted(set(lora_scales))
    return ", ".join(f"{v:g}" for v in values) if values else "1"


def tools_section(names: dict[str, str], rank: int | None, lora_scales: list[float]) -> list[str]:
    """The card's "Files and strength, per tool" section: one row per file the bundle carries."""
    rows = [f"| diffusers (`KolorsPipeline`) | `{names['diffusers']}` | "
            f"`pipe.load_lora_weights(lora_dir, weight_name=\"{names['diffusers']}\")` (see Usage) | "
            f"adapter weight 1.0 (`set_adapters`); the panels used {_scales(lora_scales)} |"]
    if "diffsynth" in names:
        baseline = "" if rank is None else (
            f" The challenge baseline's render script wraps the UNet in peft `LoraConfig(r={BASELINE_RANK}, "
            f"lora_alpha={BASELINE_ALPHA:g})` and loads the .ckpt into it: for this rank-{rank} file use "
            f"`LoraConfig(r={rank}, lora_alpha={rank})` (scale 1.0; lora_alpha={BASELINE_ALPHA:g} would apply "
            f"{BASELINE_ALPHA / rank:g} of the trained strength).")
        rows.append(f"| DiffSynth-Studio 1.1 | `{names['diffsynth']}` | "
                    f"`model_manager.load_lora(\"{names['diffsynth']}\", lora_alpha=1.0)` | "
                    f"`lora_alpha=1.0`, its default.{baseline} |")
    if "comfyui" in names:
        rows.append(f"| ComfyUI with ComfyUI-Kolors-MZ | `{names['comfyui']}` (into `ComfyUI/models/loras/`) | "
                    "MZ's Kolors UNet loader, then `LoraLoaderModelOnly` (kohya `lora_unet_` keys, ComfyUI's "
                    "SDXL key map) | `strength_model` 1.0 |")
    return [
        "## Files and strength, per tool",
        "",
        "Each file holds the same LoRA with its scale (alpha / rank) folded into the weights, so 1.0 is "
        "the trained strength in every tool.",
        "",
        "| Tool | File | Load with | Strength |",
        "|---|---|---|---|",
        *rows,
    ]


__all__ = ["FORMATS", "bundle_names", "file_stem", "tools_section"]
