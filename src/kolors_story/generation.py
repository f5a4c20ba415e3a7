"""Rendering story panels with a stock diffusers KolorsPipeline plus the trained style LoRA."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from kolors_story import models
from kolors_story.training import LORA_WEIGHT_NAME

log = logging.getLogger(__name__)

ADAPTER = "style"


@dataclass(frozen=True)
class SamplerSettings:
    sampler: str = "euler"
    steps: int = 50
    guidance_scale: float = 5.0
    lora_scale: float = 1.0
    precision: str = "fp16"


@dataclass(frozen=True)
class Scene:
    id: str
    prompt: str
    negative_prompt: str = ""
    seed: int = 0
    width: int = 1024
    height: int = 1024


def make_scheduler(name: str, base_config: dict):
    """Kolors' own betas (1100 steps, scaled_linear) with the chosen sampling algorithm."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

    if name == "euler":
        return EulerDiscreteScheduler.from_config(base_config)
    if name == "ddim":
        return DDIMScheduler.from_config(base_config)
    if name == "dpmpp_2m":
        return DPMSolverMultistepScheduler.from_config(
            base_config, algorithm_type="dpmsolver++", solver_order=2
        )
    raise ValueError(f"unknown sampler {name!r}; use euler, ddim or dpmpp_2m")


def load_pipeline(model_dir: Path, settings: SamplerSettings, device: torch.device | None = None):
    from diffusers import KolorsPipeline

    device = device or models.pick_device()
    models.check_kolors_dir(Path(model_dir))
    dtype = torch.float32 if device.type == "cpu" else models.torch_dtype(settings.precision)
    pipe = KolorsPipeline.from_pretrained(
        str(model_dir), torch_dtype=dtype, variant=models.weight_variant(Path(model_dir))
    )
    pipe.scheduler = make_scheduler(settings.sampler, pipe.scheduler.config)
    pipe.set_progress_bar_config(desc="denoise", leave=False)
    return pipe.to(device)


def load_style_lora(pipe, lora_file: Path, scale: float) -> None:
    """Attach the trained LoRA with stock diffusers loading, at the given strength."""
    lora_file = Path(lora_file)
    # weight_name is needed even for a local folder when the hub is offline (FACTS.md).
    pipe.load_lora_weights(str(lora_file.parent), weight_name=lora_file.name, adapter_name=ADAPTER)
    pipe.set_adapters([ADAPTER], adapter_weights=[scale])


def render(pipe, scene: Scene, settings: SamplerSettings) -> Image.Image:
    """One panel. The seed drives a CPU generator, so a seed gives the same noise on any device."""
    generator = torch.Generator("cpu").manual_seed(scene.seed)
    result = pipe(
        prompt=scene.prompt,
        negative_prompt=scene.negative_prompt or None,
        width=scene.width,
        height=scene.height,
        num_inference_steps=settings.steps,
        guidance_scale=settings.guidance_scale,
        generator=generator,
    )
    return result.images[0]


def render_scene(
    model_dir: Path, lora_file: Path, scene: Scene, settings: SamplerSettings, out_path: Path
) -> Path:
    pipe = load_pipeline(model_dir, settings)
    load_style_lora(pipe, lora_file, settings.lora_scale)
    log.info("scene %s: seed %d, %dx%d, %s %d steps, CFG %.1f, LoRA scale %.2f", scene.id,
             scene.seed, scene.width, scene.height, settings.sampler, settings.steps,
             settings.guidance_scale, settings.lora_scale)
    image = render(pipe, scene, settings)
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    image.save(out_path)
    return Path(out_path)


__all__ = ["LORA_WEIGHT_NAME", "SamplerSettings", "Scene", "load_pipeline", "load_style_lora",
           "render", "render_scene"]
