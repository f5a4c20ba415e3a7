"""Render a published panel again from its bundle alone: the LoRA, prompts.json and the Kolors model.

A panel without character anchors is one stock KolorsPipeline call (the model card's snippet
makes the same one). A panel in anchor mode also shared self-attention with its characters'
anchors; their features would be gigabytes at 1024 px, so prompts.json holds each anchor's recipe
and this module records the anchors again (render_anchor) before rendering the panel with sharing.
Bit for bit on the recipe's device type and dtype, with torch's thread count pinned to the one each
job recorded (candidates_file.Runtime); a panel that is not says which recorded items differ here:

    kolors-story-reproduce BUNDLE KOLORS_DIR SCENE_ID OUT.png
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from kolors_story import seals
from kolors_story.models import devices
from kolors_story.errors import UserError
from kolors_story.render.scenes import (
    Consistency, RenderInputs, SamplerSettings, Scene, load_style_lora, move_to_device,
    pipeline_and_embeddings_per_prompt, pipeline_dtype, render, render_anchor,
)
from kolors_story.render.candidates_file import AnchorRecipe, PanelRecipe, Runtime
from kolors_story.run_files import LORA_WEIGHT_NAME

log = logging.getLogger(__name__)


def load_recipe(bundle_dir: Path, scene_id: str) -> PanelRecipe:
    """A panel's recipe from the bundle's prompts.json."""
    rows = json.loads((Path(bundle_dir) / "prompts.json").read_text(encoding="utf-8"))["scenes"]
    for row in rows:
        if row["id"] == scene_id:
            return PanelRecipe.from_json(row)
    raise UserError(f"Scene {scene_id!r} is not in {bundle_dir}/prompts.json; it has "
                    f"{', '.join(r['id'] for r in rows)}.")


def _settings(recipe: PanelRecipe | AnchorRecipe, precision: str, batch: int = 1) -> SamplerSettings:
    return SamplerSettings(sampler=recipe.sampler, steps=recipe.steps, guidance_scale=recipe.guidance_scale,
                           lora_scale=recipe.lora_scale, precision=precision, candidates=batch,
                           batch_candidates=True)


@contextmanager
def pinned(runtime: Runtime | None) -> Iterator[None]:
    """torch's thread count and deterministic flag as the job had them (the thread count moves a
    CPU render's last bits); this process's own are back afterwards."""
    if runtime is None:
        yield
        return
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(runtime.torch_threads)
    torch.use_deterministic_algorithms(runtime.deterministic)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)


def _record_anchors(model_dir: Path, lora: Path, recipe: PanelRecipe, device: torch.device,
                    folder: Path) -> list[Path]:
    """The panel's anchors recorded again from their recipes (as rule render_anchor did), each with
    its own job's thread count."""
    paths = []
    for a in recipe.consistency.anchors:
        scene = Scene(a.id, a.prompt, a.negative_prompt, a.seed, a.width, a.height)
        option = Consistency(steps_fraction=a.steps_fraction, max_tokens=a.max_tokens)
        with pinned(a.runtime):
            paths.append(render_anchor(RenderInputs(model_dir, lora), scene, _settings(a, recipe.precision), option,
                                       folder / f"{a.id}.safetensors", device=device))
    return paths


def _recipe_device(recipe: PanelRecipe) -> torch.device:
    """The device type the panel was rendered on, when this machine has one."""
    if recipe.device == "cuda" and not torch.cuda.is_available():
        return devices.pick_device()
    return torch.device(recipe.device)


def _other_device(recipe: PanelRecipe, device: torch.device) -> str | None:
    """'device cuda in float16 (here cpu in float32)' when `device` renders in another type or dtype."""
    dtype = str(pipeline_dtype(_settings(recipe, recipe.precision), device)).removeprefix("torch.")
    if (device.type, dtype) == (recipe.device, recipe.dtype):
        return None
    return f"device {recipe.device} in {recipe.dtype} (here {device.type} in {dtype})"


def rerender_panel(model_dir: Path, bundle_dir: Path, scene_id: str,
                   device: torch.device | None = None) -> Image.Image:
    """The bundle's panel of `scene_id`, rendered again: the batch its seed was drawn in (same
    pipeline call as the scene job), with attention sharing when the recipe has anchors, on as
    many torch threads as each job recorded. Device: by default the recipe's type."""
    from kolors_story.render.character_sharing import enable_sharing, load_anchor

    seals.verify(Path(bundle_dir))  # against the bundle's seal when it is a run's bundle
    lora = Path(bundle_dir) / LORA_WEIGHT_NAME
    seals.verify(lora)  # a downloaded bundle has no seal: at least a complete safetensors file
    recipe = load_recipe(bundle_dir, scene_id)
    device = device or _recipe_device(recipe)
    settings = _settings(recipe, recipe.precision, len(recipe.batch_seeds))
    if other := _other_device(recipe, device):
        log.warning("scene %s: %s: the picture up to rounding, not bit for bit", scene_id, other)
    if recipe.runtime is not None:
        log.info("scene %s: rendering on %d torch thread(s), as its job did", scene_id, recipe.runtime.torch_threads)
    scene = Scene(recipe.id, recipe.prompt, recipe.negative_prompt, recipe.seed, recipe.width, recipe.height)
    # Pinned from the start: fusing the LoRA into the UNet is a matmul too
    with tempfile.TemporaryDirectory(prefix="anchors.") as tmp, pinned(recipe.runtime):
        anchors = _record_anchors(model_dir, lora, recipe, device, Path(tmp)) if recipe.consistency else []
        pipe, [embeds] = pipeline_and_embeddings_per_prompt(Path(model_dir), settings, scene, device)
        move_to_device(pipe, device, settings)
        load_style_lora(pipe, lora, recipe.lora_scale, fuse=recipe.lora_fused)
        if anchors:
            enable_sharing(pipe, [load_anchor(p) for p in anchors], recipe.consistency.strength,
                           recipe.consistency.steps_fraction)
        return render(pipe, scene, settings, list(recipe.batch_seeds), embeds)[recipe.batch_index]


def unmatched(bundle_dir: Path, scene_id: str, device: torch.device | None = None) -> list[str]:
    """What the panel's jobs (its scene's and each anchor's) recorded that this process does not
    match once rerender_panel pinned what it can: the device and dtype, other torch or diffusers
    versions, CPU kernels, GPU or CUDA; a job that recorded nothing says so."""
    recipe = load_recipe(bundle_dir, scene_id)
    device = device or _recipe_device(recipe)
    anchors = recipe.consistency.anchors if recipe.consistency else ()
    found = [other] if (other := _other_device(recipe, device)) else []
    for job, runtime in [(f"scene {recipe.id}", recipe.runtime), *((f"anchor {a.id}", a.runtime) for a in anchors)]:
        if runtime is None:
            found.append(f"{job}: recorded no threads or versions (made by an older version)")
            continue
        with pinned(runtime):
            found += [f"{job}: {difference}" for difference in runtime.differences(Runtime.current(device))]
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle", type=Path, help="the bundle folder (prompts.json, LoRA, panels/)")
    parser.add_argument("model", type=Path, help="the Kolors-diffusers folder the run used")
    parser.add_argument("scene", help="scene id, as in prompts.json")
    parser.add_argument("out", type=Path, help="where to write the panel (PNG)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        image = rerender_panel(args.model, args.bundle, args.scene)
    except UserError as err:
        print(err, file=sys.stderr)
        return 1
    image.save(args.out)
    published = args.bundle / "panels" / f"{args.scene}.png"
    if published.is_file():
        with Image.open(published) as panel:
            same = np.array_equal(np.asarray(panel.convert("RGB")), np.asarray(image))
        print(f"{args.out}: {'bit for bit' if same else 'NOT bit for bit'} the published {published}"
              + ("" if same else _why_not(args.bundle, args.scene)))
    return 0


def _why_not(bundle: Path, scene: str) -> str:
    """The recorded items this machine could not match, for the 'NOT bit for bit' line."""
    if missed := unmatched(bundle, scene):
        return "; recorded by its jobs and not matched here: " + "; ".join(missed)
    return ("; every item its jobs recorded (torch threads, versions, device, dtype, CPU kernels) "
            "matches here: please report it")


if __name__ == "__main__":
    sys.exit(main())
