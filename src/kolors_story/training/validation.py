"""Validation during training: render fixed prompts with the training UNet, score them with the
challenge's aesthetic predictor, save a grid per checkpoint, and remember the scores."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import torch

from kolors_story.models.aesthetic import AestheticScorer
from kolors_story.data.images import compose_grid
from kolors_story.training.settings import ValidationSettings

log = logging.getLogger(__name__)

Embeds = tuple[torch.Tensor, torch.Tensor]  # (prompt_embeds [256, W], pooled [W])


class Validator:
    """Owns the VAE-decoding pipeline (no text encoder: prompts come pre-encoded) and the scorer."""

    def __init__(self, settings: ValidationSettings, vae, scheduler, aesthetic_dir: Path,
                 embeds: Mapping[str, Embeds], out_dir: Path, device: torch.device):
        self.settings, self.embeds, self.device = settings, embeds, device
        self.out_dir = Path(out_dir)
        self.vae, self.scheduler = vae, scheduler
        self.scorer = AestheticScorer(Path(aesthetic_dir), device=str(device))

    def _pipeline(self, unet):
        from diffusers import KolorsPipeline

        pipe = KolorsPipeline(vae=self.vae, text_encoder=None, tokenizer=None, unet=unet,
                              scheduler=self.scheduler, force_zeros_for_empty_prompt=False)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def _embeds(self, text: str, dtype: torch.dtype) -> Embeds:
        embeds, pooled = self.embeds[text]
        return embeds[None].to(self.device, dtype), pooled[None].to(self.device, dtype)

    def _decode(self, latents: torch.Tensor, pipe):
        """One image from the UNet's latents with the fp32 VAE: KolorsPipeline would hand a fp32
        VAE the fp16/bf16 latents as they are (a dtype error), and only upcasts a fp16 VAE."""
        latents = latents.to(self.vae.dtype) / self.vae.config.scaling_factor
        image = self.vae.decode(latents, return_dict=False)[0]
        return pipe.image_processor.postprocess(image, output_type="pil")[0]

    @torch.no_grad()
    def run(self, unet, step: int) -> dict:
        """Render and score every validation prompt; returns {"step", "scores", "mean"}."""
        was_training = unet.training
        unet.eval()
        pipe, dtype = self._pipeline(unet), unet.dtype
        images, s = [], self.settings
        for p in s.prompts:
            pos, pooled = self._embeds(p.prompt, dtype)
            neg, neg_pooled = self._embeds(p.negative_prompt, dtype)
            images.append(self._decode(pipe(
                prompt_embeds=pos, pooled_prompt_embeds=pooled, negative_prompt_embeds=neg,
                negative_pooled_prompt_embeds=neg_pooled, width=s.size, height=s.size,
                num_inference_steps=s.steps, guidance_scale=s.guidance_scale,
                generator=torch.Generator("cpu").manual_seed(p.seed), output_type="latent",
            ).images, pipe))
        if was_training:
            unet.train()
        scores = [self.scorer.score(image) for image in images]
        self.out_dir.mkdir(parents=True, exist_ok=True)
        compose_grid(images, columns=len(images), rows=1).save(self.out_dir / f"step-{step:06d}.png")
        mean = sum(scores) / len(scores)
        log.info("validation at step %d: mean aesthetic score %.4f (%s)", step, mean,
                 ", ".join(f"{x:.3f}" for x in scores))
        return {"step": step, "scores": scores, "mean": mean}


def validation_texts(settings: ValidationSettings) -> list[str]:
    """Every text the validation needs encoded (prompts and negative prompts)."""
    return [t for p in settings.prompts for t in (p.prompt, p.negative_prompt)]


def best_step(history: list[dict]) -> int | None:
    """The step whose validation mean is highest (the earliest on ties)."""
    return max(history, key=lambda r: (r["mean"], -r["step"]))["step"] if history else None
