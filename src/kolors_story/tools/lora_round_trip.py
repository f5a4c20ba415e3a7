"""The GPU check's LoRA round trip: does the saved file make diffusers apply what was trained, in
whatever precision the pipeline runs?

Two parts, each with a verdict that holds in fp32, bf16 and fp16:

* weights: every layer's update `scale * up @ down` (a LoRA's whole effect on a layer), computed
  in fp32, from the trained adapter (the checkpoint the trainer picked; alpha / rank not folded),
  from the saved file as the project's LoRA owner reads it (fp32, folded, alpha from its
  metadata), and from the pipeline's peft layers as diffusers loaded them (in the pipeline's
  dtype, scaled as peft applies them). File against trained must agree to fp32 rounding; loaded
  against file to the pipeline dtype's rounding of up and down. The worst layer is named.
* images: after two training steps a LoRA changes images less than bf16 rounding does (bf16
  renders that differ only by rounding were 0.0026 mean |pixel| apart at full size, 0.0028 at tiny
  size, the LoRA's own effect as large), and scaling the LoRA up does not help in bf16 (at tiny
  size its effect levels off at 10x rounding). So the round trip renders in fp32 (the run's weights
  upcast exactly; rounding there is ~1e-7) with the LoRA scaled up until its largest layer update
  is BOOSTED_CHANGE of that layer's weight: its effect then dwarfs rounding, whatever the run's
  precision and training length, and the fused render must match the unfused one.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

log = logging.getLogger(__name__)

ADAPTER = "style"  # the adapter name the scene jobs load the LoRA under (render.scenes)
# Unit roundoff u (half the spacing of representable numbers just above 1) of each dtype.
UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
# The renders' LoRA strength: its largest layer update is this fraction of that layer's weight
# (Frobenius norms), whatever the training length (two steps leave ~1e-4), so the verdict does not
# depend on how far training got. 10% is a clear change that keeps every layer near its trained
# regime; the tiny model's image then moves by 3.6e-3 mean |pixel|, ~30000x fp32 rounding.
BOOSTED_CHANGE = 0.1
# fp32 renders differ by ~1e-7 mean |pixel| from rounding alone (fused vs unfused, tiny model):
# the boosted LoRA must move the image by at least 1e-4 (1000x that; 1/40 of a level of 255) ...
IMAGE_FLOOR = 1e-4
# ... and the fused render may differ from the unfused one by at most 1% of the LoRA's effect:
# a fuse at another strength, or of some layers only, is off by about its share of the effect.
ROUNDING_SHARE = 0.01
SHOWN = 5  # layer names listed per problem

Layer = tuple[torch.Tensor, torch.Tensor, float]  # (down, up, scale): the update is scale * up @ down


def delta_tolerance(rank: int, held_in: torch.dtype = torch.float32) -> float:
    """The largest |update difference| / max(|scale| |up| @ |down|) rounding explains when two
    updates come from the same fp32 tensors: rank products summed in fp32 on each side (rank * u
    each), one fp32 rounding of up when the file folds alpha / rank into it (u), and where one side
    holds up and down in a narrower dtype, their rounding to it (2u + u**2 < 3u of that dtype)."""
    narrow = 0.0 if held_in == torch.float32 else UNIT_ROUNDOFF[held_in]
    return (2 * rank + 2) * UNIT_ROUNDOFF[torch.float32] + 3 * narrow


@torch.no_grad()
def update(layer: Layer) -> tuple[torch.Tensor, torch.Tensor]:
    """scale * up @ down in fp32, and the size its rounding scales with, |scale| * |up| @ |down|
    (convolution kernels flattened: the same products)."""
    down, up, scale = layer
    down, up = down.float().flatten(1), up.float().flatten(1)
    return scale * (up @ down), abs(scale) * (up.abs() @ down.abs())


def peft_layers(state: dict[str, torch.Tensor], scale: float) -> dict[str, Layer]:
    """module -> Layer of a peft-named state (`<module>.lora_A.weight` / `.lora_B.weight`), one scale."""
    suffix = ".lora_A.weight"
    return {key[: -len(suffix)]: (tensor, state[key[: -len(suffix)] + ".lora_B.weight"], scale)
            for key, tensor in state.items() if key.endswith(suffix)}


def file_layers(lora_file: Path, unet: torch.nn.Module) -> dict[str, Layer]:
    """The saved file as the project's LoRA owner reads a diffusers file: fp32 tensors, the scale
    its metadata gives (alpha = rank without metadata, as diffusers does)."""
    from kolors_story.models.lora.any_format import read_lora

    weights = read_lora(Path(lora_file), unet)
    return peft_layers(weights.state, weights.scale)


def loaded_layers(unet: torch.nn.Module, adapter: str = ADAPTER) -> dict[str, Layer]:
    """The adapter as diffusers loaded it into the UNet's peft layers: their tensors (in the
    pipeline's dtype) and peft's scaling (alpha / r times the set_adapters weight)."""
    return {name: (module.lora_A[adapter].weight, module.lora_B[adapter].weight, float(module.scaling[adapter]))
            for name, module in unet.named_modules()
            if hasattr(module, "lora_A") and adapter in getattr(module, "lora_A", {})}


def _layer_errors(reference: dict[str, Layer], other: dict[str, Layer]) -> Iterator[tuple[str, float, float]]:
    """(layer, error, tolerance) of each layer both hold: max |update difference| over the
    reference's max |scale| |up| @ |down|, and what rounding explains at the coarser dtype."""
    for name in (name for name in reference if name in other):
        want, size = update(reference[name])
        got, _ = update(other[name])
        if want.shape != got.shape:
            yield name, float("inf"), 0.0
            continue
        held_in = max((reference[name][0].dtype, other[name][0].dtype), key=UNIT_ROUNDOFF.__getitem__)
        error = float((got - want).abs().max()) / max(float(size.max()), torch.finfo(torch.float32).tiny)
        yield name, error, delta_tolerance(reference[name][0].shape[0], held_in)


def compare_layers(reference: dict[str, Layer], other: dict[str, Layer]) -> dict:
    """Every layer of `reference` in `other` and no other one, each update equal within rounding;
    the worst layer named (the one furthest beyond, or closest to, its tolerance)."""
    errors = sorted(_layer_errors(reference, other), key=lambda e: e[1] / e[2] if e[2] else float("inf"),
                    reverse=True)
    failing = [name for name, error, tolerance in errors if not error <= tolerance]
    missing, extra = sorted(reference.keys() - other.keys()), sorted(other.keys() - reference.keys())
    worst = errors[0] if errors else (None, None, None)
    return {"layers": len(reference), "worst_layer": worst[0], "worst_error": worst[1], "tolerance": worst[2],
            "failing_layers": failing[:SHOWN], "failing_count": len(failing), "missing_layers": missing[:SHOWN],
            "missing_count": len(missing), "extra_layers": extra[:SHOWN], "extra_count": len(extra),
            "ok": bool(reference) and not (failing or missing or extra)}


def boost_scale(saved: dict[str, Layer], unet: torch.nn.Module) -> tuple[float, float]:
    """(the renders' LoRA scale, the largest ||update|| / ||weight|| of a layer at scale 1): the
    scale that makes the largest one BOOSTED_CHANGE, never below 1. Call with the LoRA unfused."""
    modules = dict(unet.named_modules())
    largest = 0.0
    for name, layer in saved.items():
        weight = modules[name].base_layer.weight.detach().float()
        largest = max(largest, float(update(layer)[0].norm() / weight.norm()))
    return (max(1.0, BOOSTED_CHANGE / largest) if largest > 0 else 1.0), largest


def compare_images(pipe, render: Callable[[], torch.Tensor], scale: float) -> dict:
    """The scene seed rendered in fp32 with the LoRA at `scale`, unfused and fused, and without it:
    mean absolute differences of float pixels in [0, 1]. Call with the LoRA loaded unfused; it is
    left so, at scale 1, and the pipeline in fp32 (`render` must pass its inputs in the UNet's dtype)."""
    pipe.to(torch.float32)
    pipe.set_adapters([ADAPTER], adapter_weights=[scale])
    unfused = render()
    pipe.disable_lora()
    base = render()
    pipe.enable_lora()
    pipe.fuse_lora(components=["unet"], adapter_names=[ADAPTER])  # fuses at the set_adapters weight
    fused = render()
    pipe.unfuse_lora(components=["unet"])
    pipe.set_adapters([ADAPTER], adapter_weights=[1.0])
    effect, fuse_error = float((unfused - base).abs().mean()), float((fused - unfused).abs().mean())
    return {"lora_scale": scale, "precision": "fp32", "lora_vs_no_lora_mean_abs": effect,
            "fused_vs_unfused_mean_abs": fuse_error,
            "ok": effect >= IMAGE_FLOOR and fuse_error <= ROUNDING_SHARE * effect}


def _names(record: dict, key: str) -> str:
    more = record[f"{key}_count"] - len(record[f"{key}_layers"])
    return ", ".join(record[f"{key}_layers"]) + (f" (+{more} more)" if more > 0 else "")


def _weight_problems(record: dict, what: str, reference: str) -> list[str]:
    problems = []
    if record["failing_count"]:
        problems.append(f"{what} differs from {reference} in {record['failing_count']} layer(s): {_names(record, 'failing')}; "
                        f"worst {record['worst_layer']}, off by {record['worst_error']:.3g} of its size "
                        f"(rounding explains {record['tolerance']:.2g})")
    if record["missing_count"]:
        problems.append(f"{what} lacks {record['missing_count']} layer(s) of {reference}: {_names(record, 'missing')}")
    if record["extra_count"]:
        problems.append(f"{what} has {record['extra_count']} layer(s) {reference} lacks: {_names(record, 'extra')}")
    if not record["layers"]:
        problems.append(f"{reference} has no LoRA layer")
    return problems


def _image_problems(images: dict) -> list[str]:
    if images["ok"]:
        return []
    return [f"fp32 images with the LoRA at scale {images['lora_scale']:.4g}: with and without it "
            f"{images['lora_vs_no_lora_mean_abs']:.3g} apart (at least {IMAGE_FLOOR:g}), fused and unfused "
            f"{images['fused_vs_unfused_mean_abs']:.3g} apart (at most {ROUNDING_SHARE:g} of the first)"]


def compare_round_trip(pipe, render: Callable[[], torch.Tensor], lora_file: Path, trained_state: dict[str, torch.Tensor],
                       trained_scale: float) -> dict:
    """Weights, then images (module docstring). `pipe` holds the saved file loaded by diffusers as
    adapter "style", unfused, on an eager UNet; `trained_state` is the picked checkpoint's peft
    tensors, `trained_scale` the trainer's alpha / rank. Returns the record with `ok` and the
    problems found, each naming its layers."""
    from kolors_story.errors import UserError

    unet = pipe.unet
    try:
        saved, unreadable = file_layers(lora_file, unet), []
    except UserError as err:  # diffusers loaded it, yet it is no LoRA of this UNet: a verdict, not a crash
        saved, unreadable = {}, [f"the saved file is no LoRA of this UNet: {err}"]
    weights = {"file_vs_trained": compare_layers(peft_layers(trained_state, trained_scale), saved),
               "loaded_vs_file": compare_layers(saved, loaded_layers(unet))}
    scale, largest = boost_scale(saved, unet)
    images = {**compare_images(pipe, render, scale), "largest_relative_update": largest}
    problems = (unreadable + _weight_problems(weights["file_vs_trained"], "the saved file", "the trained adapter")
                + _weight_problems(weights["loaded_vs_file"], "the adapter diffusers loaded", "the saved file")
                + _image_problems(images))
    record = {"weights": weights, "images": images, "problems": problems, "ok": not problems}
    log.info("lora_round_trip: %s", "ok" if record["ok"] else "; ".join(problems))
    return record
