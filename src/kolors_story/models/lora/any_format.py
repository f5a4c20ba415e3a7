"""Any LoRA file of a Kolors UNet, whichever of the three formats (diffusers, DiffSynth-Studio,
kohya/ComfyUI) it is in: read it into a `LoraWeights` checked against the UNet, convert it to the
others, read its rank. The format is recognised from the keys: ComfyUI's spellings by
kohya_format; the diffusers and DiffSynth files share peft suffixes and differ by module naming
(and diffusers' metadata), which this module settles.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from kolors_story.errors import UserError
from kolors_story.models.kolors_configs import unet_skeleton
from kolors_story.models.lora.diffsynth_format import module_map_if_installed, write_diffsynth_lora
from kolors_story.models.lora.diffusers_format import METADATA_KEY, stored_alpha, write_diffusers_lora
from kolors_story.models.lora.kohya_format import read_kohya, write_comfyui_lora
from kolors_story.models.lora.tensor_files import load_tensors
from kolors_story.models.lora.weights import SHOWN, LoraWeights, lora_able_modules, shown, target_modules

# <module>.lora_A[.<adapter>].weight | <module>.lora.down.weight, with an optional "unet." prefix
_KEY = re.compile(
    r"^(?P<unet>unet\.)?(?P<module>.+?)\."
    r"(?:lora_(?P<ab>[AB])(?:\.(?P<adapter>[^.]+))?|lora\.(?P<ud>down|up))\.weight$"
)


def read_lora(path: Path, unet: torch.nn.Module, alpha: float | None = None,
              diffsynth_alpha: float | None = None) -> LoraWeights:
    """Read a diffusers, DiffSynth-Studio or kohya/ComfyUI LoRA file and check it against `unet`.

    DiffSynth files store no alpha: they get `diffsynth_alpha` (config `train.diffsynth_alpha`),
    or alpha = rank when it is None (scale 1, what DiffSynth's `load_lora` applies with its
    default lora_alpha=1.0). Diffusers files get r/lora_alpha from their metadata, else alpha =
    rank (as diffusers does). `alpha` overrides both. Every key must name a Linear/Conv2d layer
    of this UNet, in either naming, with matching shapes; otherwise UserError.
    """
    path = Path(path)
    tensors, metadata = load_tensors(path)
    modules = lora_able_modules(unet)
    converted = read_kohya(tensors, unet, modules, path)
    if converted is not None:  # now peft keys under diffusers names, each layer's scale folded in
        tensors, metadata = converted.state, {}
    parsed, diffusers_style = _parse_keys(tensors, path)

    module_map = module_map_if_installed(unet)
    source, rename = _naming(parsed, diffusers_style or converted is not None, metadata, modules,
                             module_map, path)
    state, written_as = _diffusers_state(parsed, tensors, rename, modules, path)
    if converted is not None:  # errors name the keys as the file spells them
        source = converted.format
        written_as = {k: converted.written_as.get(v, v) for k, v in written_as.items()}
    adapted = list(dict.fromkeys(k.rsplit(".lora_", 1)[0] for k in state))
    rank = _one_rank(adapted, state, written_as, modules, path)

    lora_alpha = stored_alpha(metadata, rank, path) if source == "diffusers" else float(rank)
    if source == "diffsynth" and diffsynth_alpha is not None:
        lora_alpha = float(diffsynth_alpha)
    if alpha is not None:
        lora_alpha = float(alpha)
    ds_names = {m: ds for m, ds in module_map.items() if m in set(adapted)}
    skipped = tuple(converted.skipped) if converted is not None else ()
    return LoraWeights(state, rank, lora_alpha, source, target_modules(adapted, unet), ds_names, skipped)


def convert_lora(src: Path, model_dir: Path, diffusers_dir: Path | None = None,
                 diffsynth_file: Path | None = None, diffsynth_alpha: float | None = None,
                 comfyui_file: Path | None = None) -> LoraWeights:
    """Read a LoRA (diffusers, DiffSynth-Studio at `diffsynth_alpha`, kohya/ComfyUI; see
    read_lora) of this model's UNet and write it in the requested formats."""
    weights = read_lora(Path(src), unet_skeleton(model_dir), diffsynth_alpha=diffsynth_alpha)
    if diffusers_dir is not None:
        write_diffusers_lora(weights, Path(diffusers_dir))
    if diffsynth_file is not None:
        write_diffsynth_lora(weights, Path(diffsynth_file))
    if comfyui_file is not None:
        write_comfyui_lora(weights, Path(comfyui_file))
    return weights


def lora_rank(path: Path) -> int:
    """The rank of a safetensors LoRA (diffusers, peft or kohya keys), from its header alone."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device="cpu") as f:
        for key in f.keys():
            if key.endswith((".lora.down.weight", ".lora_A.weight", ".lora_down.weight")):
                return int(f.get_slice(key).get_shape()[0])
    raise UserError(f"LoRA file {path} holds no lora down/A weight to read its rank from.")


# ---------------------------------------------------------------- the keys of a diffusers or DiffSynth file
def _fail(path: Path, problem: str, keys: list[str]) -> UserError:
    return UserError(
        f"LoRA file {path} is not a LoRA of this Kolors UNet: {problem}: {shown(keys)}. Use a LoRA "
        f"trained on Kolors (diffusers, DiffSynth-Studio or kohya/ComfyUI format) for the UNet it "
        f"was made for."
    )


def _parse_keys(tensors: dict[str, torch.Tensor], path: Path) -> tuple[dict[str, tuple[str, str]], bool]:
    """key -> (module name as written, "A"/"B"), and whether the keys are diffusers-styled."""
    parsed: dict[str, tuple[str, str]] = {}
    unparsed, diffusers_style, adapters = [], False, set()
    for key in tensors:
        m = _KEY.match(key)
        if not m:
            unparsed.append(key)
            continue
        diffusers_style |= bool(m["unet"]) or bool(m["ud"])
        if m["adapter"]:
            adapters.add(m["adapter"])
        parsed[key] = (m["module"], m["ab"] or {"down": "A", "up": "B"}[m["ud"]])
    if not parsed:
        kohya = any("lora_down" in k or "lora_up" in k for k in tensors)
        raise UserError(
            f"LoRA file {path} holds no LoRA tensors (no lora_A/lora_B or lora.down/lora.up keys; "
            f"first keys: {', '.join(list(tensors)[:SHOWN]) or 'none'}). "
            + ("Its lora_down/lora_up keys carry no prefix ComfyUI's SDXL key map knows (lora_unet_, "
               "diffusion_model.)." if kohya else
               "Give a diffusers, DiffSynth-Studio or kohya/ComfyUI (lora_unet_) LoRA file.")
        )
    if unparsed:
        raise _fail(path, "keys that are not LoRA weights", unparsed)
    if len(adapters) > 1:
        raise UserError(f"LoRA file {path} holds several adapters {sorted(adapters)}; give one.")
    return parsed, diffusers_style


def _naming(parsed: dict, diffusers_style: bool, metadata: dict, modules: dict, module_map: dict,
            path: Path) -> tuple[str, dict[str, str]]:
    """Which naming the file's keys follow ("diffusers" or "diffsynth") and each written module's
    diffusers name; UserError naming the keys that fit neither."""
    to_diffusers = {ds: d for d, ds in module_map.items()}
    written = {mod for mod, _ in parsed.values()}
    in_diffusers = all(mod in modules for mod in written)
    in_diffsynth = all(mod in to_diffusers for mod in written)
    # conv_in/conv_out are named alike in both; the key style and metadata settle such files
    if in_diffusers and (diffusers_style or METADATA_KEY in metadata or not in_diffsynth):
        return "diffusers", {mod: mod for mod in written}
    if in_diffsynth:
        return "diffsynth", {mod: to_diffusers[mod] for mod in written}
    hits_diffusers = sum(mod in modules for mod in written)  # name the keys outside the majority's naming
    names = modules if hits_diffusers >= sum(mod in to_diffusers for mod in written) else to_diffusers
    bad = [k for k, (mod, _) in parsed.items() if mod not in names]
    raise _fail(path, "keys naming no LoRA-able layer (Linear/Conv2d) of this UNet", bad)


def _diffusers_state(parsed: dict, tensors: dict, rename: dict[str, str], modules: dict,
                     path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The weights under diffusers names (fp32, CPU, the UNet's layer order, A before B) and the
    key each was written as; UserError for a key given twice."""
    state: dict[str, torch.Tensor] = {}
    written_as: dict[str, str] = {}
    order = {name: i for i, name in enumerate(modules)}
    for key, (mod, ab) in sorted(parsed.items(), key=lambda kv: (order[rename[kv[1][0]]], kv[1][1])):
        name = f"{rename[mod]}.lora_{ab}.weight"
        if name in state:
            raise _fail(path, "keys given twice", [written_as[name], key])
        state[name] = tensors[key].detach().to("cpu", torch.float32).contiguous()
        written_as[name] = key
    return state, written_as


def _one_rank(adapted: list[str], state: dict, written_as: dict, modules: dict, path: Path) -> int:
    """The rank every adapted layer shares; UserError for a missing half, a misfit or mixed ranks."""
    bad, ranks = [], set()
    for module in adapted:
        a_key, b_key = f"{module}.lora_A.weight", f"{module}.lora_B.weight"
        if a_key not in state or b_key not in state:
            bad.append(written_as.get(a_key) or written_as[b_key])
        elif not _shapes_fit(modules[module], state[a_key], state[b_key]):
            bad.append(f"{written_as[a_key]} {tuple(state[a_key].shape)} / {tuple(state[b_key].shape)}")
        else:
            ranks.add(state[a_key].shape[0])
    if bad:
        raise _fail(path, "missing A/B halves or shapes that do not fit the layer", bad)
    if len(ranks) != 1:
        raise UserError(f"LoRA file {path} mixes ranks {sorted(ranks)}; one rank is supported.")
    return ranks.pop()


def _shapes_fit(layer: torch.nn.Module, a: torch.Tensor, b: torch.Tensor) -> bool:
    r = a.shape[0] if a.dim() else 0
    if isinstance(layer, torch.nn.Linear):
        return (a.dim() == 2 and b.dim() == 2 and r > 0 and tuple(a.shape) == (r, layer.in_features)
                and tuple(b.shape) == (layer.out_features, r))
    return (a.dim() == 4 and b.dim() == 4 and r > 0
            and tuple(a.shape) == (r, layer.in_channels // layer.groups, *layer.kernel_size)
            and tuple(b.shape) == (layer.out_channels, r, 1, 1))


__all__ = ["convert_lora", "lora_rank", "read_lora"]
