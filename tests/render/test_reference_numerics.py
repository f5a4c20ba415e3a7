"""The references' numerics (issue 8, point 3): training latents from a fp32 VAE whatever
train.precision is, Kolors' trainer's add_time_ids, and `generate.sampler: ddim` equal to
DiffSynth 1.1.9's EnhancedDDIMScheduler (the challenge baseline's sampler) step for step."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from kolors_story.render.diffsynth_ddim import DiffSynthDDIMScheduler
from kolors_story.render.scenes import SamplerSettings, load_pipeline, make_scheduler
from kolors_story.models.random_aesthetic import build_tiny_aesthetic_predictor
from kolors_story.models.kolors_configs import KOLORS_SCHEDULER
from kolors_story.training import TrainJob, TrainSettings, train_lora
from kolors_story.training import loop
from kolors_story.training.data import Example, assign_sizes, crop_origin, size_conditioning
from kolors_fixtures import write_training_folder

CPU = torch.device("cpu")
BASE = {"steps": 2, "resolution": 32, "rank": 2, "alpha": 2, "checkpoint_every": 0}


def diffsynth_ddim():
    """The installed wheel's EnhancedDDIMScheduler, read from its file: `import diffsynth` pulls in
    every DiffSynth model (~15 s), the scheduler module needs only torch and math."""
    root = Path(importlib.util.find_spec("diffsynth").submodule_search_locations[0])
    spec = importlib.util.spec_from_file_location("diffsynth_ddim_reference", root / "schedulers" / "ddim.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.EnhancedDDIMScheduler(beta_end=0.014, num_train_timesteps=1100)  # as DiffSynth sets up Kolors


# ---------------------------------------------------------------- (a) the VAE in fp32
@pytest.fixture
def vae_calls(monkeypatch) -> list[tuple[str, torch.dtype, torch.dtype]]:
    """(method, VAE weight dtype, input dtype) of every AutoencoderKL encode/decode in the test."""
    from diffusers import AutoencoderKL

    calls = []
    for name in ("encode", "decode"):
        def spy(self, x, *args, _original=getattr(AutoencoderKL, name), _name=name, **kwargs):
            calls.append((_name, self.dtype, x.dtype))
            return _original(self, x, *args, **kwargs)
        monkeypatch.setattr(AutoencoderKL, name, spy)
    return calls


@pytest.fixture
def gpu_precision(monkeypatch) -> list[str]:
    """What precision_dtypes answers on CUDA (frozen weights and autocast in fp16), on this CPU:
    CPU keeps fp32 weights, which would hide a VAE that follows train.precision."""
    asked = []

    def fp16(precision: str, device: torch.device):
        asked.append(precision)
        return torch.float16, torch.float16
    monkeypatch.setattr(loop, "precision_dtypes", fp16)
    return asked


@pytest.mark.parametrize("crop", ["center", "random"])
def test_fp16_training_uses_a_fp32_vae_and_stays_finite(tiny_kolors, training_folder, tmp_path, vae_calls,
                                                        gpu_precision, crop):
    """Cached centre-crop latents and the random crop's resident VAE alike; validation decodes the
    fp16 UNet's latents with the same fp32 VAE."""
    aesthetic = build_tiny_aesthetic_predictor(tmp_path / "aesthetic")
    validation = {"every": 2, "size": 32, "steps": 2, "prompts": [{"prompt": "水墨画", "seed": 0}]}
    settings = TrainSettings.from_dict({**BASE, "precision": "fp16", "crop": crop, "validation": validation})
    result = train_lora(TrainJob(tiny_kolors, training_folder, tmp_path / "out", cache_dir=tmp_path / "cache", aesthetic_dir=aesthetic),
                        settings, device=CPU)
    assert gpu_precision == ["fp16"]
    encodes = [c for c in vae_calls if c[0] == "encode"]
    decodes = [c for c in vae_calls if c[0] == "decode"]
    assert encodes and decodes
    assert all(c[1:] == (torch.float32, torch.float32) for c in vae_calls), vae_calls
    assert all(math.isfinite(r["loss"]) for r in result.losses) and len(result.losses) == 2
    assert all(torch.isfinite(t).all() for t in load_file(result.lora_file).values())
    assert all(math.isfinite(s) for s in result.validations[0]["scores"])


def test_latents_do_not_depend_on_the_precision(tiny_kolors, training_folder, tmp_path, vae_calls):
    """An fp32 run reuses the latents an fp16 run cached (same key: the VAE dtype is always fp32)."""
    with pytest.MonkeyPatch.context() as mp:  # its own: undoing it keeps the VAE spies
        mp.setattr(loop, "precision_dtypes", lambda precision, device: (torch.float16, torch.float16))
        train_lora(TrainJob(tiny_kolors, training_folder, tmp_path / "a", cache_dir=tmp_path / "cache"),
                   TrainSettings.from_dict({**BASE, "precision": "fp16"}), device=CPU)
    assert any(c[0] == "encode" for c in vae_calls)
    vae_calls.clear()
    train_lora(TrainJob(tiny_kolors, training_folder, tmp_path / "b", cache_dir=tmp_path / "cache"),
               TrainSettings.from_dict({**BASE, "precision": "fp32"}), device=CPU)
    assert not [c for c in vae_calls if c[0] == "encode"]


def test_real_fp16_precision_on_this_device_trains_finite(tiny_kolors, training_folder, tmp_path):
    """train.precision: fp16 as precision_dtypes really maps it here (bf16 autocast on CPU)."""
    result = train_lora(TrainJob(tiny_kolors, training_folder, tmp_path / "out"),
                        TrainSettings.from_dict({**BASE, "precision": "fp16"}), device=CPU)
    assert all(math.isfinite(r["loss"]) for r in result.losses)
    assert loop.LATENT_VAE_DTYPE == torch.float32


# ---------------------------------------------------------------- (b) add_time_ids
def kolors_trainer_time_ids(width: int, height: int, size: int) -> list[int]:
    """Kwai-Kolors/Kolors dreambooth/train_dreambooth_lora.py, DreamBoothDataset.__getitem__."""
    resize_ratio = max(size / width, size / height)
    resize_size = (round(height * resize_ratio), round(width * resize_ratio))
    offsite_width = (resize_size[1] - size) // 2
    offsite_height = (resize_size[0] - size) // 2
    return [resize_size[0], resize_size[1], offsite_height, offsite_width, size, size]


@pytest.mark.parametrize("width, height", [(32, 32), (80, 96), (96, 80), (1000, 333), (97, 211), (20, 24)])
def test_centre_crop_time_ids_follow_kolors_trainer(tmp_path, width, height):
    image = tmp_path / "x.png"
    Image.new("RGB", (width, height)).save(image)
    ex = Example(image, "x")
    assign_sizes([ex], TrainSettings(resolution=32))
    assert size_conditioning(ex, crop_origin(ex, "center", None)) == kolors_trainer_time_ids(width, height, 32)


@pytest.fixture
def unet_time_ids(monkeypatch) -> list[torch.Tensor]:
    """The time_ids of every UNet forward in the test."""
    from diffusers import UNet2DConditionModel

    seen, original = [], UNet2DConditionModel.forward

    def spy(self, *args, added_cond_kwargs=None, **kwargs):
        seen.append(added_cond_kwargs["time_ids"].detach().float().cpu())
        return original(self, *args, added_cond_kwargs=added_cond_kwargs, **kwargs)
    monkeypatch.setattr(UNet2DConditionModel, "forward", spy)
    return seen


def test_square_image_at_training_size_is_conditioned_as_at_inference(tiny_kolors, tmp_path, unet_time_ids):
    size = 32
    folder = write_training_folder(tmp_path / "data", [(size, size)] * 2, ["水墨画", "山水"])
    train_lora(TrainJob(tiny_kolors, folder, tmp_path / "out"),
               TrainSettings.from_dict({**BASE, "steps": 1}), device=CPU)
    training = torch.cat(unet_time_ids)
    unet_time_ids.clear()
    pipe = load_pipeline(tiny_kolors, SamplerSettings(steps=1, precision="fp32"), CPU, text_encoder=False)
    width = pipe.unet.config.encoder_hid_dim
    embeds, pooled = torch.zeros(1, 256, width), torch.zeros(1, width)
    pipe(prompt_embeds=embeds, pooled_prompt_embeds=pooled, negative_prompt_embeds=embeds,
         negative_pooled_prompt_embeds=pooled, width=size, height=size, num_inference_steps=1, output_type="latent")
    inference = torch.cat(unet_time_ids)
    expected = pipe._get_add_time_ids((size, size), (0, 0), (size, size), torch.float32, width)
    assert expected.tolist() == [[size, size, 0, 0, size, size]]
    assert torch.equal(inference, expected.repeat(2, 1))  # negative and positive halves of CFG
    assert torch.equal(training, expected.repeat(len(training), 1))


# ---------------------------------------------------------------- (c) DiffSynth's DDIM
@pytest.mark.parametrize("steps", [1, 2, 3, 7, 20, 50, 1099, 1100, 1200])
def test_ddim_timesteps_are_diffsynths(steps):
    ours, ref = make_scheduler("ddim", KOLORS_SCHEDULER), diffsynth_ddim()
    ours.set_timesteps(steps)
    ref.set_timesteps(steps)
    assert torch.equal(ours.timesteps.float(), ref.timesteps)
    if steps > 1:
        assert ours.timesteps[0] == 1099 and ours.timesteps[-1] == 0


def test_diffusers_ddim_with_kolors_spacing_would_sample_other_timesteps():
    from diffusers import DDIMScheduler

    stock, ref = DDIMScheduler.from_config(KOLORS_SCHEDULER), diffsynth_ddim()
    stock.set_timesteps(50)
    ref.set_timesteps(50)
    assert stock.timesteps[0] != 1099 and not torch.equal(stock.timesteps.float(), ref.timesteps)


def test_ddim_schedule_is_diffsynths_and_the_training_one():
    from diffusers import DDPMScheduler

    ours, ref = make_scheduler("ddim", KOLORS_SCHEDULER), diffsynth_ddim()
    assert isinstance(ours, DiffSynthDDIMScheduler)
    assert ours.alphas_cumprod.tolist() == ref.alphas_cumprod
    assert torch.equal(ours.alphas_cumprod, DDPMScheduler.from_config(KOLORS_SCHEDULER).alphas_cumprod)


def test_ddim_step_is_bitwise_diffsynths():
    ours, ref = make_scheduler("ddim", KOLORS_SCHEDULER), diffsynth_ddim()
    ours.set_timesteps(50)
    ref.set_timesteps(50)
    gen = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 4, 8, 8, generator=gen)
    for t_ours, t_ref in zip(ours.timesteps, ref.timesteps):
        eps = torch.randn(2, 4, 8, 8, generator=gen)
        expected = ref.step(eps, t_ref.unsqueeze(0), sample)
        assert torch.equal(ours.step(eps, t_ours, sample, return_dict=False)[0], expected)
        sample = expected


def diffsynth_loop(unet, noise, pos, neg, height: int, width: int, steps: int, cfg: float,
                   one_batch: bool = False) -> list[torch.Tensor]:
    """diffsynth/pipelines/sdxl_image.py's denoising loop for Kolors: its scheduler, the float
    timestep of shape (1,) as the UNet's timestep, time ids (h, w, 0, 0, h, w), positive and
    negative as two UNet calls, noise_nega + cfg * (noise_posi - noise_nega), then its step.
    one_batch: both halves in one UNet call, [negative, positive], as KolorsPipeline batches them."""
    scheduler = diffsynth_ddim()
    scheduler.set_timesteps(steps)
    time_ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=torch.float32)
    latents, trajectory = noise, []
    for timestep in scheduler.timesteps:
        timestep = timestep.unsqueeze(0)
        if one_batch:
            out = unet(torch.cat([latents] * 2), timestep, encoder_hidden_states=torch.cat([neg[0], pos[0]]),
                       added_cond_kwargs={"text_embeds": torch.cat([neg[1], pos[1]]),
                                          "time_ids": time_ids.repeat(2, 1)}).sample
            nega, posi = out.chunk(2)
        else:
            posi, nega = (unet(latents, timestep, encoder_hidden_states=e,
                               added_cond_kwargs={"text_embeds": p, "time_ids": time_ids}).sample for e, p in (pos, neg))
        latents = scheduler.step(nega + cfg * (posi - nega), timestep, latents)
        trajectory.append(latents)
    return trajectory


@torch.no_grad()
def test_ddim_pipeline_reproduces_diffsynth_step_for_step(tiny_kolors):
    """The baseline's settings (DDIM, CFG 4, 50 steps) on the tiny UNet, non-square, same noise."""
    steps, cfg, height, width = 50, 4.0, 48, 32
    pipe = load_pipeline(tiny_kolors, SamplerSettings(sampler="ddim", steps=steps, precision="fp32"), CPU,
                         text_encoder=False)
    gen = torch.Generator().manual_seed(0)
    text = pipe.unet.config.encoder_hid_dim
    pos = (torch.randn(1, 256, text, generator=gen), torch.randn(1, text, generator=gen))
    neg = (torch.randn(1, 256, text, generator=gen), torch.randn(1, text, generator=gen))
    scale = pipe.vae_scale_factor
    noise = torch.randn(1, pipe.unet.config.in_channels, height // scale, width // scale, generator=gen)

    ours, timesteps = [], []

    def record(pipeline, i, t, kwargs):
        ours.append(kwargs["latents"].clone())
        timesteps.append(int(t))
        return kwargs
    pipe(prompt_embeds=pos[0], pooled_prompt_embeds=pos[1], negative_prompt_embeds=neg[0],
         negative_pooled_prompt_embeds=neg[1], latents=noise.clone(), height=height, width=width,
         num_inference_steps=steps, guidance_scale=cfg, output_type="latent", callback_on_step_end=record)

    ref_scheduler = diffsynth_ddim()
    ref_scheduler.set_timesteps(steps)
    assert timesteps == [int(t) for t in ref_scheduler.timesteps]
    # With the UNet batched as the pipeline batches it, every step's latents are bitwise DiffSynth's.
    same_batching = diffsynth_loop(pipe.unet, noise.clone(), pos, neg, height, width, steps, cfg, one_batch=True)
    assert len(ours) == len(same_batching) == steps
    assert all(torch.equal(a, b) for a, b in zip(ours, same_batching))
    # DiffSynth's own two UNet calls: CPU kernels round a batch of 1 and of 2 differently in the
    # last bits (~1e-6 of the latents' scale here), nothing more.
    for i, (a, b) in enumerate(zip(ours, diffsynth_loop(pipe.unet, noise.clone(), pos, neg, height, width, steps, cfg))):
        assert (a - b).abs().max() <= 1e-5 * b.abs().max(), (i, (a - b).abs().max().item())
    assert np.isfinite(ours[-1].numpy()).all()
