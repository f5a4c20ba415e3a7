"""Kolors UNet LoRA files: read and write diffusers, DiffSynth-Studio 1.1 and kohya/ComfyUI formats.

Three formats meet here (../shared/FACTS.md, docs/lora-formats.md); the kohya/ComfyUI key rules
live in kohya_lora, and this module stays the one entry point (read_lora reads all of them):

* diffusers: `pytorch_lora_weights.safetensors`, keys `unet.<module>.lora.down.weight` /
  `.lora.up.weight` (or peft's `.lora_A.weight` / `.lora_B.weight`), the peft LoraConfig (r,
  lora_alpha, target modules) in the safetensors metadata. Applied scale: lora_alpha / r; with no
  metadata (diffusers before 0.34.0, a copy whose metadata was stripped, other tools) loaders use
  lora_alpha = r. So the files written here have alpha/r folded into lora_B and lora_alpha = r:
  every loader applies the same strength. Their bytes depend only on the tensors (sorted target
  modules, sorted safetensors metadata keys).
* DiffSynth-Studio 1.1 (the challenge baseline's trainer): a Lightning `.ckpt` that is a plain
  `{name: tensor}` dict (its `on_save_checkpoint` clears the checkpoint and stores only the
  trainable LoRA tensors at the top level), names in DiffSynth's own UNet layout plus peft
  suffixes, `blocks.7.transformer_blocks.0.attn1.to_q.lora_A.default.weight`. No alpha is stored:
  DiffSynth's loader (`GeneralLoRAFromPeft.load`, via `ModelManager.load_lora(path,
  lora_alpha=1.0)`) adds `lora_alpha * B @ A`, so with its default the scale is 1, whatever
  rank/alpha the LoRA was trained with. Readers give such a file the alpha they are told
  (config `train.diffsynth_alpha`), else alpha = rank (DiffSynth's scale 1).
* kohya/ComfyUI (`comfyui_lora.safetensors`): `lora_unet_<module, dots as underscores>` +
  `.lora_down.weight` / `.lora_up.weight` / `.alpha`, update up @ down * alpha / rank (1.0 without
  `.alpha`). Read also with SGM module names, lora_A/B, ComfyUI's `diffusion_model.` keys and
  diffusers' old processor names; `lora_te_` keys are reported and skipped.

Module names are translated with DiffSynth's own `SDXLUNetStateDictConverter.from_diffusers`, run
over this UNet's parameter names, so the map is exactly the one DiffSynth uses for Kolors.
In memory a LoRA is a `LoraWeights`: peft-style tensors keyed by diffusers module names, plus rank
and alpha (scale = alpha / rank).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import torch

from kolors_story.errors import UserError
from kolors_story.files import (
    SAFETENSORS_METADATA, ensure_space, read_safetensors_header, safetensors_header_bytes,
)
from kolors_story.models import kohya_lora

log = logging.getLogger(__name__)

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
COMFYUI_WEIGHT_NAME = "comfyui_lora.safetensors"  # kohya keys, what ComfyUI's LoraLoader reads
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
_SHOWN = 5  # offending keys named in an error message

# <module>.lora_A[.<adapter>].weight | <module>.lora.down.weight, with an optional "unet." prefix
_KEY = re.compile(
    r"^(?P<unet>unet\.)?(?P<module>.+?)\."
    r"(?:lora_(?P<ab>[AB])(?:\.(?P<adapter>[^.]+))?|lora\.(?P<ud>down|up))\.weight$"
)


@dataclass
class LoraWeights:
    """A UNet LoRA in peft layout: `state` maps `<module>.lora_A.weight` / `<module>.lora_B.weight`
    (diffusers module names, float32 CPU tensors) and the update is (alpha / rank) * B @ A."""

    state: dict[str, torch.Tensor]
    rank: int
    alpha: float
    # kohya/comfyui/processor: the spellings ComfyUI reads (kohya_lora.FORMATS)
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


# ---------------------------------------------------------------- names
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


def _lora_able_modules(unet: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Linear/Conv2d layers of the UNet by name; peft-wrapped layers count as their base layer."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    found: dict[str, torch.nn.Module] = {}
    for name, module in unet.named_modules():
        if _is_peft_internal(name):
            continue
        if isinstance(module, BaseTunerLayer):
            module = module.get_base_layer()
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            found[name] = module
    return found


def _is_peft_internal(name: str) -> bool:
    return any(part == "base_layer" or part.startswith("lora_") for part in name.split("."))


def _clean_state_keys(unet: torch.nn.Module) -> list[str]:
    """The UNet's own parameter names, as without any peft adapter attached."""
    keys = []
    for key in unet.state_dict(keep_vars=True):
        parts = key.split(".")
        if any(p.startswith("lora_") for p in parts):
            continue
        keys.append(".".join(p for p in parts if p != "base_layer"))
    return keys


def _module_map(unet: torch.nn.Module) -> dict[str, str]:
    """Diffusers name -> DiffSynth name of every LoRA-able module of this UNet."""
    params = diffsynth_key_map(_clean_state_keys(unet))
    modules = _lora_able_modules(unet)
    out = {}
    for key, ds_key in params.items():
        module = key[: -len(".weight")]
        if key.endswith(".weight") and module in modules and ds_key.endswith(".weight"):
            out[module] = ds_key[: -len(".weight")]
    return out


def _target_modules(modules: list[str], unet: torch.nn.Module) -> tuple[str, ...]:
    """Short LoraConfig targets ("to_q", "to_out.0") when they pick exactly these modules, else
    the full module names."""
    def suffix(name: str) -> str:
        parts = name.split(".")
        return ".".join(parts[-2:]) if parts[-1].isdigit() and len(parts) > 1 else parts[-1]

    wanted = set(modules)
    short = sorted({suffix(m) for m in modules})
    picked = {
        name for name, _ in unet.named_modules()
        if name and not _is_peft_internal(name) and any(name == s or name.endswith("." + s) for s in short)
    }
    return tuple(short) if picked == wanted else tuple(sorted(wanted))


# ---------------------------------------------------------------- reading
def _load_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The file's tensors and (for safetensors) its metadata; UserError for anything else."""
    if not path.is_file():
        raise UserError(f"LoRA file {path} not found; check the path.")
    with open(path, "rb") as f:
        head = f.read(16)
    looks_safetensors = len(head) > 8 and head[8:9] == b"{"
    if path.suffix == ".safetensors" or (path.suffix not in PICKLE_SUFFIXES and looks_safetensors):
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
        except Exception as err:  # noqa: BLE001 - any parse failure is the file's fault
            raise UserError(f"LoRA file {path} is not a readable safetensors file ({err}).") from None
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - UnpicklingError, zip errors, EOF, ...
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(
            f"LoRA file {path} could not be loaded as plain tensors (torch.load with "
            f"weights_only=True refused it: {first}). Only tensor checkpoints are accepted; "
            f"re-save it as a dict of tensors or as safetensors."
        ) from None
    if isinstance(raw, dict) and isinstance(raw.get("state_dict"), dict):
        raw = raw["state_dict"]  # a Lightning checkpoint saved without DiffSynth's hook
    if not isinstance(raw, dict):
        raise UserError(f"LoRA file {path} holds a {type(raw).__name__}, not a dict of tensors.")
    return {k: v for k, v in raw.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}, {}


def _metadata_config(metadata: dict[str, str], path: Path) -> dict | None:
    """The unet's peft LoraConfig dict stored by diffusers' save_lora_weights, if any."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return None
    try:
        packed = json.loads(raw)
    except json.JSONDecodeError:
        raise UserError(f"LoRA file {path}: its lora_adapter_metadata is not JSON.") from None
    unet = {k[len("unet."):]: v for k, v in packed.items() if k.startswith("unet.")}
    return unet or None


def lora_rank(path: Path) -> int:
    """The rank of a safetensors LoRA (diffusers, peft or kohya keys), from its header alone."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device="cpu") as f:
        for key in f.keys():
            if key.endswith((".lora.down.weight", ".lora_A.weight", ".lora_down.weight")):
                return int(f.get_slice(key).get_shape()[0])
    raise UserError(f"LoRA file {path} holds no lora down/A weight to read its rank from.")


def _fail(path: Path, problem: str, keys: list[str]) -> UserError:
    shown = ", ".join(keys[:_SHOWN]) + (f" (+{len(keys) - _SHOWN} more)" if len(keys) > _SHOWN else "")
    return UserError(
        f"LoRA file {path} is not a LoRA of this Kolors UNet: {problem}: {shown}. Use a LoRA "
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
            f"first keys: {', '.join(list(tensors)[:_SHOWN]) or 'none'}). "
            + ("Its lora_down/lora_up keys carry no prefix ComfyUI's SDXL key map knows (lora_unet_, "
               "diffusion_model.)." if kohya else
               "Give a diffusers, DiffSynth-Studio or kohya/ComfyUI (lora_unet_) LoRA file.")
        )
    if unparsed:
        raise _fail(path, "keys that are not LoRA weights", unparsed)
    if len(adapters) > 1:
        raise UserError(f"LoRA file {path} holds several adapters {sorted(adapters)}; give one.")
    return parsed, diffusers_style


def read_lora(path: Path, unet: torch.nn.Module, alpha: float | None = None,
              diffsynth_alpha: float | None = None) -> LoraWeights:
    """Read a diffusers or DiffSynth-Studio LoRA file and check it against `unet`.

    DiffSynth files store no alpha: they get `diffsynth_alpha` (config `train.diffsynth_alpha`),
    or alpha = rank when it is None (scale 1, what DiffSynth's `load_lora` applies with its
    default lora_alpha=1.0). Diffusers files get r/lora_alpha from their metadata, else alpha =
    rank (as diffusers does). `alpha` overrides both. Every key must name a Linear/Conv2d layer
    of this UNet, in either naming, with matching shapes; otherwise UserError.
    """
    path = Path(path)
    tensors, metadata = _load_tensors(path)
    modules = _lora_able_modules(unet)
    converted = _read_kohya(tensors, unet, modules, path)
    if converted is not None:  # now peft keys under diffusers names, each layer's scale folded in
        tensors, metadata = converted.state, {}
    parsed, diffusers_style = _parse_keys(tensors, path)

    # DiffSynth-Studio's names need DiffSynth itself; where it is not installed (the offline GPU
    # host) only diffusers naming reads, and a DiffSynth file is refused as naming no layer.
    module_map = _module_map(unet) if importlib.util.find_spec("diffsynth") else {}
    source, rename = _naming(parsed, diffusers_style or converted is not None, metadata, modules,
                             module_map, path)
    state, written_as = _diffusers_state(parsed, tensors, rename, modules, path)
    if converted is not None:  # errors name the keys as the file spells them
        source = converted.format
        written_as = {k: converted.written_as.get(v, v) for k, v in written_as.items()}
    adapted = list(dict.fromkeys(k.rsplit(".lora_", 1)[0] for k in state))
    rank = _one_rank(adapted, state, written_as, modules, path)

    lora_alpha = float(rank)
    config = _metadata_config(metadata, path) if source == "diffusers" else None
    if config:
        lora_alpha = _alpha_from_config(config, rank, path)
    if source == "diffsynth" and diffsynth_alpha is not None:
        lora_alpha = float(diffsynth_alpha)
    if alpha is not None:
        lora_alpha = float(alpha)
    ds_names = {m: ds for m, ds in module_map.items() if m in set(adapted)}
    skipped = tuple(converted.skipped) if converted is not None else ()
    return LoraWeights(state, rank, lora_alpha, source, _target_modules(adapted, unet), ds_names, skipped)


def _read_kohya(tensors: dict[str, torch.Tensor], unet: torch.nn.Module, modules: dict,
                path: Path) -> kohya_lora.Converted | None:
    """A file in one of ComfyUI's spellings (kohya, ComfyUI's own, diffusers' processor names) in
    peft layout; None for diffusers/DiffSynth files. Every key must map onto a layer of `unet`:
    otherwise UserError naming the first unmapped keys and the format recognised. Text-encoder
    keys are logged and skipped (Kolors' ChatGLM takes no LoRA here)."""
    fmt = kohya_lora.recognise(list(tensors))
    if fmt is None:
        return None
    names = list(modules)
    converted, unmapped = kohya_lora.to_peft(tensors, fmt, names, kohya_lora.sgm_names(names, unet.config))
    label = kohya_lora.FORMATS[fmt]
    if unmapped:
        raise UserError(
            f"LoRA file {path} is a {label} LoRA, but these keys map onto no Linear/Conv2d layer of "
            f"this Kolors UNet (ComfyUI's SDXL key map): {kohya_lora.shown(unmapped)}. Use a LoRA "
            f"trained on Kolors; an SDXL or SD1.5 LoRA does not fit it."
        )
    if converted.skipped:
        log.warning("LoRA file %s (%s): %d text-encoder keys skipped, Kolors' ChatGLM text encoder "
                    "takes no LoRA here: %s", path, label, len(converted.skipped),
                    kohya_lora.shown(converted.skipped))
    if not converted.state:
        raise UserError(f"LoRA file {path} holds only text-encoder keys ({kohya_lora.shown(converted.skipped)}); "
                        f"a Kolors style LoRA adapts the UNet (lora_unet_ keys).")
    return converted


def _naming(parsed: dict, diffusers_style: bool, metadata: dict, modules: dict, module_map: dict,
            path: Path) -> tuple[str, dict[str, str]]:
    """Which naming the file's keys follow ("diffusers" or "diffsynth") and each written module's
    diffusers name; UserError naming the keys that fit neither."""
    to_diffusers = {ds: d for d, ds in module_map.items()}
    written = {mod for mod, _ in parsed.values()}
    in_diffusers = all(mod in modules for mod in written)
    in_diffsynth = all(mod in to_diffusers for mod in written)
    # conv_in/conv_out are named alike in both; the key style and metadata settle such files
    if in_diffusers and (diffusers_style or "lora_adapter_metadata" in metadata or not in_diffsynth):
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


# ---------------------------------------------------------------- writing / applying
def _lora_config(weights: LoraWeights):
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


def adapter_metadata(weights: LoraWeights) -> dict:
    """The LoraConfig that diffusers stores in the metadata, set-valued fields (target_modules)
    as sorted lists: diffusers writes list(set), whose order changes from process to process."""
    config = _lora_config(weights).to_dict()
    return {k: sorted(v) if isinstance(v, (set, frozenset)) else v for k, v in config.items()}


def _sort_safetensors_metadata(path: Path) -> None:
    """Rewrite the header with its metadata keys sorted: safetensors (0.8) writes them from a
    Rust HashMap, in an order that changes from process to process. Tensor data is untouched
    (its offsets are relative to the end of the header)."""
    raw = path.read_bytes()
    header = read_safetensors_header(raw)
    fields = dict(header.fields)
    meta = fields.pop(SAFETENSORS_METADATA, None)
    ordered = ({SAFETENSORS_METADATA: dict(sorted(meta.items()))} if meta else {}) | fields
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(safetensors_header_bytes(ordered) + raw[header.data_start:])
    tmp.replace(path)


def write_diffusers_lora(weights: LoraWeights, out_dir: Path) -> Path:
    """Write `<out_dir>/pytorch_lora_weights.safetensors` for stock
    `KolorsPipeline.load_lora_weights(out_dir, weight_name=...)`: scale folded into lora_B and
    lora_alpha = r in the metadata (the same strength with or without the metadata); equal
    tensors give the same bytes."""
    from diffusers import KolorsPipeline
    from diffusers.utils import convert_state_dict_to_diffusers

    weights = folded(weights)
    state = convert_state_dict_to_diffusers({k: v.contiguous() for k, v in weights.state.items()})
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    ensure_space(Path(out_dir), sum(t.numel() * t.element_size() for t in state.values()), "the LoRA file")
    KolorsPipeline.save_lora_weights(
        str(out_dir),
        unet_lora_layers=state,
        weight_name=LORA_WEIGHT_NAME,
        unet_lora_adapter_metadata=adapter_metadata(weights),
    )
    path = Path(out_dir) / LORA_WEIGHT_NAME
    _sort_safetensors_metadata(path)
    return path


def write_comfyui_lora(weights: LoraWeights, out_path: Path) -> Path:
    """Write the kohya/ComfyUI file (`lora_unet_<module>` + `.lora_down/.lora_up.weight`,
    `.alpha` = rank, the scale folded into lora_up): ComfyUI's LoraLoader (through
    ComfyUI-Kolors-MZ), diffusers' kohya conversion and DiffSynth's SDXLLoRAFromCivitai (caller
    alpha 1.0) all apply up @ down, our diffusers file's update. The kohya metadata names rank and
    alpha; equal tensors give the same bytes."""
    from safetensors.torch import save_file

    weights = folded(weights)
    state = kohya_lora.kohya_state(weights.state, weights.rank)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    ensure_space(out_path.parent, sum(t.numel() * t.element_size() for t in state.values()), "the ComfyUI LoRA file")
    meta = {"ss_network_module": "networks.lora", "ss_network_dim": str(weights.rank),
            "ss_network_alpha": str(weights.rank)}
    save_file(state, str(out_path), metadata=meta)
    _sort_safetensors_metadata(out_path)
    return out_path


def write_diffsynth_lora(weights: LoraWeights, out_path: Path, unet: torch.nn.Module | None = None) -> Path:
    """Write a DiffSynth-Studio 1.1 LoRA (`.ckpt`, top-level `blocks.N....lora_A.default.weight`
    tensors). The scale alpha/rank is folded into lora_B, so DiffSynth's default lora_alpha=1.0
    applies exactly this LoRA. DiffSynth names come from `unet` if given, else from the UNet the
    weights were read against (`weights.diffsynth_names`), else from the full-size Kolors layout."""
    if unet is not None:
        module_map = _module_map(unet)
    elif weights.diffsynth_names and all(m in weights.diffsynth_names for m in weights.modules):
        module_map = weights.diffsynth_names
    else:
        module_map = _module_map(full_size_unet())
    weights = folded(weights)  # DiffSynth's default lora_alpha=1.0 then applies this strength
    out: dict[str, torch.Tensor] = {}
    missing = [m for m in weights.modules if m not in module_map]
    if missing:
        raise UserError(f"DiffSynth export to {out_path}: layers not in this UNet: {', '.join(missing[:_SHOWN])}")
    adapted = set(weights.modules)
    for module in sorted((m for m in module_map if m in adapted), key=lambda m: _block_id(module_map[m])):
        a = weights.state[f"{module}.lora_A.weight"]
        b = weights.state[f"{module}.lora_B.weight"]
        name = module_map[module]
        out[f"{name}.lora_A.default.weight"] = a.detach().to("cpu", torch.float32).contiguous()
        out[f"{name}.lora_B.default.weight"] = b.detach().to("cpu", torch.float32).contiguous()
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(out, out_path)
    return out_path


def _block_id(diffsynth_name: str) -> int:
    """DiffSynth's UNet registers its layers by block number: sorting the diffusers order by it
    (stable) gives the order its trainer saves the LoRA tensors in."""
    parts = diffsynth_name.split(".")
    return int(parts[1]) if parts[0] == "blocks" and parts[1].isdigit() else -1


def apply_to_unet(weights: LoraWeights, unet: torch.nn.Module, adapter_name: str = "default") -> None:
    """Attach `weights` to `unet` as a peft adapter (its r/alpha/targets) and load the tensors,
    e.g. to continue training from an imported LoRA. The LoRA tensors stay float32 (exact, as the
    trainer keeps them; peft casts activations to them) on the layer's device; the UNet's own
    weights are left as they are."""
    if adapter_name in (getattr(unet, "peft_config", None) or {}):
        raise ValueError(f"the UNet already has an adapter named {adapter_name!r}")
    unet.add_adapter(_lora_config(weights), adapter_name=adapter_name)
    from peft.tuners.tuners_utils import BaseTunerLayer

    injected = {
        name for name, module in unet.named_modules()
        if isinstance(module, BaseTunerLayer) and adapter_name in getattr(module, "lora_A", {})
    }
    if injected != set(weights.modules):
        raise RuntimeError(
            f"adapter targets {sorted(injected ^ set(weights.modules))[:_SHOWN]} differ from the LoRA's layers"
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


# ---------------------------------------------------------------- full-size layout
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
    """The UNet of a Kolors folder on the meta device (from unet/config.json): names and shapes
    for converting LoRA files, without loading gigabytes of weights."""
    from diffusers import UNet2DConditionModel

    from kolors_story.models.kolors_folder import KolorsFolder  # the folder's one owner reads its configs

    config = KolorsFolder(model_dir).config("unet")
    with torch.device("meta"):
        return UNet2DConditionModel.from_config(config)


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


__all__ = ["COMFYUI_WEIGHT_NAME", "LORA_WEIGHT_NAME", "LoraWeights", "adapter_metadata", "apply_to_unet", "convert_lora",
           "diffsynth_key_map", "folded", "full_size_unet", "lora_rank", "read_lora", "unet_skeleton",
           "write_comfyui_lora", "write_diffsynth_lora", "write_diffusers_lora"]
