"""The kohya/ComfyUI LoRA file of the Kolors UNet (`comfyui_lora.safetensors`): written in kohya
keys, and read back in every spelling of ComfyUI's SDXL key map (docs/lora-formats.md has the
rule, read in ComfyUI's `comfy/lora.py`).

ComfyUI-Kolors-MZ builds Kolors on ComfyUI's SDXL UNet, so a Kolors LoRA reaches ComfyUI through
`model_lora_keys_unet`: `lora_unet_<diffusers module, dots as underscores>` (or the same with
kohya's SGM module names, `lora_unet_input_blocks_4_1_...`), `diffusion_model.<SGM name>` (what
ComfyUI's own LoraSave writes) and, of diffusers' spellings, only the old attention-processor one
(`unet.<block>.attn1.processor.to_q_lora.down.weight`). Each layer's update is
up @ down * (alpha / rank), 1.0 without an `.alpha` key. `lora_te_` keys are reported and skipped:
Kolors' ChatGLM text encoder takes no LoRA here.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from kolors_story.errors import UserError
from kolors_story.models.lora.tensor_files import make_room, sort_safetensors_metadata
from kolors_story.models.lora.weights import LoraWeights, folded, shown

log = logging.getLogger(__name__)

KOHYA_PREFIX = "lora_unet_"
TEXT_ENCODER_PREFIXES = ("lora_te_", "lora_te1_", "lora_te2_")  # kohya: CLIP text encoders

# the part after the module name: kohya, peft, diffusers' processor and ComfyUI's other spellings
_SUFFIX = re.compile(
    r"^(?P<name>.+?)(?:\.lora_(?P<kohya>down|up)\.weight|\.lora_(?P<peft>A|B)\.weight"
    r"|[._]lora\.(?P<old>down|up)\.weight|\.(?P<alpha>alpha))$"
)
_HALF = {"down": "A", "up": "B", "A": "A", "B": "B"}
# diffusers ResnetBlock2D layer -> its name in the SGM (original Stability) UNet
_RESNET = {"conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "conv2": "out_layers.3",
           "conv_shortcut": "skip_connection"}
_BASIC = {"conv_in": "input_blocks.0.0", "conv_out": "out.2", "time_embedding.linear_1": "time_embed.0",
          "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
          "add_embedding.linear_2": "label_emb.0.2"}


def flat(module: str) -> str:
    """kohya's spelling of a module name: dots as underscores."""
    return module.replace(".", "_")


def kohya_state(state: dict[str, torch.Tensor], rank: int) -> dict[str, torch.Tensor]:
    """`<module>.lora_A/B.weight` (scale already folded in: alpha = rank) as kohya keys
    `lora_unet_<flat module>.lora_down/.lora_up.weight` + `.alpha` = rank, so every reader
    (ComfyUI's alpha/rank, DiffSynth's caller alpha 1.0, diffusers' kohya conversion) applies
    up @ down at strength 1."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        module, half = key.rsplit(".lora_", 1)
        name = KOHYA_PREFIX + flat(module)
        out[f"{name}.lora_{'down' if half == 'A.weight' else 'up'}.weight"] = tensor.contiguous()
        out[f"{name}.alpha"] = torch.tensor(float(rank))
    return out


def write_comfyui_lora(weights: LoraWeights, out_path: Path) -> Path:
    """Write the kohya/ComfyUI file (`lora_unet_<module>` + `.lora_down/.lora_up.weight`,
    `.alpha` = rank, the scale folded into lora_up): ComfyUI's LoraLoader (through
    ComfyUI-Kolors-MZ), diffusers' kohya conversion and DiffSynth's SDXLLoRAFromCivitai (caller
    alpha 1.0) all apply up @ down, our diffusers file's update. The kohya metadata names rank and
    alpha; equal tensors give the same bytes."""
    from safetensors.torch import save_file

    weights = folded(weights)
    state = kohya_state(weights.state, weights.rank)
    out_path = Path(out_path)
    make_room(out_path.parent, state, "the ComfyUI LoRA file")
    meta = {"ss_network_module": "networks.lora", "ss_network_dim": str(weights.rank),
            "ss_network_alpha": str(weights.rank)}
    save_file(state, str(out_path), metadata=meta)
    sort_safetensors_metadata(out_path)
    return out_path


# ---------------------------------------------------------------- SGM names
def _prefix_table(config) -> dict[str, str]:
    """diffusers block prefix -> SGM block prefix, counted as the SGM UNet numbers its blocks:
    input_blocks.0 is conv_in, each down resnet (+ its attention) one block, each downsampler one;
    output blocks are layers_per_block + 1 per up block, the upsampler inside the last."""
    n_blocks = len(config["block_out_channels"])
    per = config["layers_per_block"]
    per = [per] * n_blocks if isinstance(per, int) else list(per)
    table, n = {}, 1
    for x in range(n_blocks):
        for i in range(per[x]):
            table[f"down_blocks.{x}.resnets.{i}"] = f"input_blocks.{n}.0"
            table[f"down_blocks.{x}.attentions.{i}"] = f"input_blocks.{n}.1"
            n += 1
        table[f"down_blocks.{x}.downsamplers.0.conv"] = f"input_blocks.{n}.0.op"
        n += 1
    table |= {"mid_block.resnets.0": "middle_block.0", "mid_block.attentions.0": "middle_block.1",
              "mid_block.resnets.1": "middle_block.2"}
    n = 0
    for x, up_type in enumerate(config["up_block_types"]):
        layers = list(reversed(per))[x] + 1
        for i in range(layers):
            table[f"up_blocks.{x}.resnets.{i}"] = f"output_blocks.{n}.0"
            table[f"up_blocks.{x}.attentions.{i}"] = f"output_blocks.{n}.1"
            if i == layers - 1:  # after the resnet (and the attention, in a cross-attention block)
                table[f"up_blocks.{x}.upsamplers.0.conv"] = f"output_blocks.{n}.{2 if 'CrossAttn' in up_type else 1}.conv"
            n += 1
    return table


def sgm_names(modules: list[str], config) -> dict[str, str]:
    """diffusers module name -> SGM module name for each of `modules` that has one (not
    encoder_hid_proj, which SGM's SDXL lacks)."""
    table = _prefix_table(config)
    out = {}
    for module in modules:
        if module in _BASIC:
            out[module] = _BASIC[module]
            continue
        parts = module.split(".")
        for cut in (5, 4, 3):  # the longest block prefix first ("...downsamplers.0.conv")
            prefix = ".".join(parts[:cut])
            if prefix in table and len(parts) >= cut:
                rest = ".".join(parts[cut:])
                if ".resnets." in prefix:
                    rest = _RESNET.get(rest, "")
                if rest or prefix.endswith(".conv"):
                    out[module] = ".".join(p for p in (table[prefix], rest) if p)
                break
    return out


# ---------------------------------------------------------------- reading
@dataclass
class Converted:
    """A kohya/ComfyUI/processor-named file in peft layout: `state` holds
    `<diffusers module>.lora_A/B.weight` (float32, each layer's alpha/rank folded into lora_B, so
    the scale is 1), `written_as` the key each came from, `skipped` the text-encoder keys left out."""

    format: str
    state: dict[str, torch.Tensor]
    written_as: dict[str, str]
    skipped: list[str]


FORMATS = {  # recognised format -> how messages name it
    "kohya": "kohya (lora_unet_<module>, diffusers or SGM names)",
    "comfyui": "ComfyUI (diffusion_model.<SGM module>)",
    "processor": "diffusers attention-processor (unet.<block>.processor.to_q_lora)",
}


def recognise(keys: list[str]) -> str | None:
    """Which of ComfyUI's spellings a file's keys follow (a FORMATS key); None: diffusers or
    DiffSynth keys, read by any_format itself."""
    unet_keys = [k for k in keys if not k.startswith(TEXT_ENCODER_PREFIXES)]
    if any(k.startswith((KOHYA_PREFIX, "lycoris_")) for k in unet_keys) or (keys and not unet_keys):
        return "kohya"
    if any(k.startswith("diffusion_model.") for k in unet_keys):
        return "comfyui"
    if any(".processor." in k for k in unet_keys):
        return "processor"
    return None


def _lookup(fmt: str, modules: list[str], sgm: dict[str, str]) -> dict[str, str]:
    """Name as written (without suffix) -> diffusers module, for the recognised format."""
    if fmt == "kohya":
        table = {KOHYA_PREFIX + flat(m): m for m in modules}
        table |= {KOHYA_PREFIX + flat(s): m for m, s in sgm.items()}
        return table | {"lycoris_" + flat(m): m for m in modules}
    if fmt == "comfyui":
        return {f"diffusion_model.{s}": m for m, s in sgm.items()}
    table = {}
    for m in modules:  # ComfyUI's rule: ".to_" -> ".processor.to_", "to_out.0" -> "to_out"
        if ".to_" in m:
            old = m.replace(".to_", ".processor.to_")
            old = old[:-2] if old.endswith(".to_out.0") else old
            table |= {old: m, f"unet.{old}": m}
    return table


def to_peft(tensors: dict[str, torch.Tensor], fmt: str, modules: list[str],
            sgm: dict[str, str]) -> tuple[Converted, list[str]]:
    """`tensors` renamed to peft layout with each layer's alpha/rank folded in, and the keys that
    map onto no module of `modules` (the caller refuses the file when any)."""
    lookup = _lookup(fmt, modules, sgm)
    halves: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    alphas: dict[str, float] = {}
    skipped, unmapped = [], []
    for key, tensor in tensors.items():
        if key.startswith(TEXT_ENCODER_PREFIXES):
            skipped.append(key)
            continue
        m = _SUFFIX.match(key)
        module = lookup.get(m["name"]) if m else None
        if module is None:
            unmapped.append(key)
        elif m["alpha"]:
            alphas[module] = float(tensor.float().item())
        else:
            halves.setdefault(module, {})[_HALF[m["kohya"] or m["peft"] or m["old"]]] = (key, tensor)
    state, written_as = {}, {}
    for module, pair in halves.items():
        for half, (key, tensor) in pair.items():
            tensor = tensor.detach().to("cpu", torch.float32)
            if half == "B" and module in alphas and "A" in pair:  # up @ down * alpha / rank
                tensor = tensor * (alphas[module] / pair["A"][1].shape[0])
            state[f"{module}.lora_{half}.weight"] = tensor.contiguous()
            written_as[f"{module}.lora_{half}.weight"] = key
    return Converted(fmt, state, written_as, skipped), unmapped


def read_kohya(tensors: dict[str, torch.Tensor], unet: torch.nn.Module, modules: dict,
               path: Path) -> Converted | None:
    """A file in one of ComfyUI's spellings (kohya, ComfyUI's own, diffusers' processor names) in
    peft layout; None for diffusers/DiffSynth files. Every key must map onto a layer of `unet`:
    otherwise UserError naming the first unmapped keys and the format recognised. Text-encoder
    keys are logged and skipped (Kolors' ChatGLM takes no LoRA here)."""
    fmt = recognise(list(tensors))
    if fmt is None:
        return None
    names = list(modules)
    converted, unmapped = to_peft(tensors, fmt, names, sgm_names(names, unet.config))
    label = FORMATS[fmt]
    if unmapped:
        raise UserError(
            f"LoRA file {path} is a {label} LoRA, but these keys map onto no Linear/Conv2d layer of "
            f"this Kolors UNet (ComfyUI's SDXL key map): {shown(unmapped)}. Use a LoRA "
            f"trained on Kolors; an SDXL or SD1.5 LoRA does not fit it."
        )
    if converted.skipped:
        log.warning("LoRA file %s (%s): %d text-encoder keys skipped, Kolors' ChatGLM text encoder "
                    "takes no LoRA here: %s", path, label, len(converted.skipped), shown(converted.skipped))
    if not converted.state:
        raise UserError(f"LoRA file {path} holds only text-encoder keys ({shown(converted.skipped)}); "
                        f"a Kolors style LoRA adapts the UNet (lora_unet_ keys).")
    return converted


__all__ = ["FORMATS", "KOHYA_PREFIX", "Converted", "flat", "kohya_state", "read_kohya", "recognise", "sgm_names",
           "to_peft", "write_comfyui_lora"]
