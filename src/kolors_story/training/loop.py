"""The LoRA training loop on the Kolors UNet: setup, step, checkpoint/resume, pick the LoRA."""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from kolors_story.models import devices
from kolors_story.errors import UserError
from kolors_story.files import sha256_file
from kolors_story.training import checkpoints as ckpt
from kolors_story.models.kolors_folder import KolorsFolder
from kolors_story.models.lora.weights import load_lora_state
from kolors_story.models.prompt_embeddings import Embedding
from kolors_story.run_files import LORA_WEIGHT_NAME
from kolors_story.training.data import (
    BatchOrder, Example, assign_sizes, check_dataset_size, crop_origin, examples_per_epoch, load_pixels,
    read_metadata, size_conditioning,
)
from kolors_story.training.encoding import cache_latents, encode_latents, encode_texts
from kolors_story.training.lora_adapter import add_lora, lora_state, save_lora
from kolors_story.training.objective import diffusion_loss, sample_noise
from kolors_story.training.processes import Processes
from kolors_story.training.settings import TrainJob, TrainSettings
from kolors_story.training.validation import Validator, best_step, validation_texts

log = logging.getLogger(__name__)
LOG_EVERY_S = 30  # a progress line in the log at least this often (and every 10% of the steps)
# The SDXL VAE (Kolors ships it unchanged) overflows in fp16, so it encodes the training latents and
# decodes validation images in fp32, as Kolors' own dreambooth trainer and diffusers' SDXL examples do.
LATENT_VAE_DTYPE = torch.float32


class TrainingDiverged(UserError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


@dataclass
class TrainResult:
    lora_file: Path
    losses: list[dict] = field(default_factory=list)
    validations: list[dict] = field(default_factory=list)
    picked_step: int = 0
    resumed_from: int = 0
    seconds: float = 0.0

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "lora_file": str(self.lora_file)})

    @classmethod
    def from_json(cls, text: str) -> "TrainResult":
        values = json.loads(text)
        return cls(**{**values, "lora_file": Path(values["lora_file"])})


@dataclass(frozen=True)
class Draw:
    """The random choices of one micro-batch: examples, flips, crop origins, noise, timesteps."""

    idx: list[int]
    flips: list[bool]
    origins: list[tuple[int, int]]
    noise: torch.Tensor
    timesteps: torch.Tensor


@dataclass
class Batches:
    """What the loop needs to build a batch: examples, cached tensors, the VAE when required."""

    examples: list[Example]
    texts: Mapping[str, Embedding]  # read per batch (the encode_texts job's file, memory-mapped)
    latents: dict[tuple[int, bool], torch.Tensor] | None
    vae: object | None
    settings: TrainSettings
    device: torch.device
    latent_geometry: tuple[int, int]  # (channels, pixels per latent cell)
    num_timesteps: int

    def draw(self, order: BatchOrder, gen: torch.Generator) -> Draw:
        """Draw the next micro-batch's randomness (no tensors built: cheap for other processes' draws)."""
        s, idx = self.settings, order.next(gen)
        flips, origins = [], []
        for i in idx:
            flips.append(s.random_flip and bool(torch.rand(1, generator=gen) < 0.5))
            origins.append(crop_origin(self.examples[i], s.crop, gen))
        (h, w), (channels, cell) = self.examples[idx[0]].target_size, self.latent_geometry
        noise = sample_noise(torch.Size((len(idx), channels, h // cell, w // cell)), s.noise_offset, gen)
        timesteps = torch.randint(0, self.num_timesteps, (len(idx),), generator=gen)
        return Draw(idx, flips, origins, noise, timesteps)

    def make(self, draw: Draw):
        """Latents, prompt embeds, pooled embeds and time ids for one drawn batch."""
        latents, time_ids = [], []
        for i, flip, origin in zip(draw.idx, draw.flips, draw.origins):
            ex = self.examples[i]
            if self.latents is None:  # random crop: a new crop every step, through the VAE
                pixels = load_pixels(ex, origin, flip)
                latents.append(encode_latents(self.vae, pixels[None], self.device)[0])
            else:
                latents.append(self.latents[(i, flip)].to(self.device))
            time_ids.append(size_conditioning(ex, origin))  # Kolors' trainer's convention (data.py)
        texts = [self.texts[self.examples[i].caption] for i in draw.idx]
        embeds = torch.stack([embeds for embeds, _ in texts]).to(self.device)
        pooled = torch.stack([pooled for _, pooled in texts]).to(self.device)
        ids = torch.tensor(time_ids, dtype=torch.float32, device=self.device)
        return torch.stack(latents), embeds, pooled, ids


def precision_dtypes(precision: str, device: torch.device) -> tuple[torch.dtype, torch.dtype | None]:
    """Weight dtype of the frozen models and the autocast dtype (None: no autocast). On a CPU with
    native bf16, bf16 is honored as on a GPU; on any other CPU the frozen weights stay fp32 (half
    kernels are slow or missing: devices.runtime_dtype says so in the log) and the autocast
    is bf16: the computation keeps the precision the setting names where the weights cannot."""
    if precision == "fp32":
        return torch.float32, None
    weights = devices.runtime_dtype(precision, device)
    if device.type == "cpu" and weights == torch.float32:
        return torch.float32, torch.bfloat16
    return weights, weights


def run_fingerprint(settings: TrainSettings, folder: KolorsFolder, examples: list[Example], processes: int = 1) -> str:
    """Checkpoints are resumed only by a run with the same settings, model, data and process count."""
    h = hashlib.sha256(settings.fingerprint().encode())
    h.update(folder.fingerprint("unet").encode())
    if settings.init_lora:  # the settings name the file; a file replaced under that name is another start
        h.update(sha256_file(Path(settings.init_lora)).encode())
    for ex in examples:
        repeats = f"\x1f{ex.repeats}" if ex.repeats != 1 else ""  # runs without repeats keep their fingerprint
        h.update(f"{ex.digest}\x1f{ex.caption}{repeats}\x1e".encode())
    if processes > 1:
        h.update(f"processes={processes}".encode())
    return h.hexdigest()[:16]


def train_lora(job: TrainJob, settings: TrainSettings, device: torch.device | None = None) -> TrainResult:
    """Train (or resume) a LoRA; write <job.out_dir>/pytorch_lora_weights.safetensors. Under
    `accelerate launch` each process trains on its share of every step (see processes.py)."""
    from diffusers import DDPMScheduler, EulerDiscreteScheduler

    procs = Processes.start(device)
    device = procs.device
    devices.enable_tf32(device)
    out_dir = job.out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    examples = read_metadata(job.dataset_dir)
    check_dataset_size(examples, settings, procs.world, job.dataset_dir / "train" / "metadata.csv")
    folder = KolorsFolder(job.model_dir)  # refuses a foreign or incomplete folder before any GPU work
    val = settings.validation
    if val.every and not (val.prompts and job.aesthetic_dir):
        raise UserError("train.validation.every > 0 needs train.validation.prompts and models.aesthetic.")
    dtype, autocast_dtype = precision_dtypes(settings.precision, device)
    assign_sizes(examples, settings)
    cache_root = job.cache_dir or out_dir / "cache"
    ckpt_root = (job.work_dir or out_dir / "work") / run_fingerprint(settings, folder, examples, procs.world)
    if procs.is_main:
        log.info("training on %d image(s) (%d examples per epoch with repeats), %d steps, %d process(es), "
                 "device %s; checkpoints in %s", len(examples), examples_per_epoch(examples), settings.steps,
                 procs.world, device, ckpt_root)

    noise_scheduler = folder.load_scheduler(DDPMScheduler)
    with procs.main_first():  # rank 0 fills the caches, the others read them
        batches = prepare_batches(folder, examples, settings, cache_root, device, dtype,
                                  noise_scheduler.config.num_train_timesteps,
                                  validating=bool(val.every) and procs.is_main, embeddings=job.embeddings)

    run = TrainState.create(folder, settings, examples, dtype, device)
    validator = None
    if val.every and procs.is_main:
        euler = folder.load_scheduler(EulerDiscreteScheduler)
        validator = Validator(val, batches.vae, euler, job.aesthetic_dir, batches.texts, out_dir / "validation", device)
    start_step = run.resume(ckpt_root)
    procs.barrier()  # every process has read the checkpoint before rank 0 writes the next one

    started = time.monotonic()
    train_steps(run, batches, procs, noise_scheduler, autocast_dtype, settings, validator, ckpt_root, start_step)

    picked = settings.steps
    if val.pick_best and run.validations:
        picked = best_step(run.validations)
        load_lora_state(run.unet, ckpt.load_checkpoint_lora(ckpt_root, picked))
        log.info("picked the checkpoint of step %d (best validation mean)", picked)
    lora_file = save_lora(run.unet, out_dir) if procs.is_main else out_dir / LORA_WEIGHT_NAME
    procs.barrier()
    return TrainResult(lora_file, run.losses, run.validations, picked, start_step, time.monotonic() - started)


def train_steps(run: "TrainState", batches, procs: Processes, noise_scheduler, autocast_dtype,
                settings: TrainSettings, validator, ckpt_root: Path, start_step: int) -> None:
    """Steps start_step+1 .. settings.steps: optimise, log, validate and checkpoint as set."""
    val = settings.validation
    started = logged = time.monotonic()
    bar = tqdm(range(start_step + 1, settings.steps + 1), desc="train", unit="step",
               initial=start_step, total=settings.steps, disable=procs.world > 1)  # children log instead
    for step in bar:
        loss = procs.average(run.params, accumulate_gradients(run, batches, procs, noise_scheduler, autocast_dtype))
        if not math.isfinite(loss):  # the same on every process: the loss is averaged
            raise_diverged(loss, step, ckpt_root)
        lr = run.optimizer_step()
        elapsed = time.monotonic() - started
        run.losses.append({"step": step, "loss": loss, "lr": lr, "seconds": round(elapsed, 3)})
        rate = (step - start_step) / max(elapsed, 1e-9)
        bar.set_postfix(loss=f"{loss:.4f}", steps_per_s=f"{rate:.2f}")
        if procs.is_main and (step % max(1, settings.steps // 10) == 0 or step == settings.steps
                              or time.monotonic() - logged >= LOG_EVERY_S):
            logged = time.monotonic()
            log.info("step %d/%d loss %.5f, %.2f steps/s, ETA %.0f s", step, settings.steps, loss,
                     rate, (settings.steps - step) / max(rate, 1e-9))
        validate = bool(val.every) and (step % val.every == 0 or step == settings.steps)
        if validate or step == settings.steps or (settings.checkpoint_every and step % settings.checkpoint_every == 0):
            if procs.is_main:
                if validate:
                    run.validations.append(validator.run(run.unet, step))
                ckpt.save_checkpoint(ckpt_root, step, lora_state(run.unet), run.state_dict(step))
                ckpt.prune_states(ckpt_root)
            procs.barrier()
    bar.close()


def raise_diverged(loss: float, step: int, ckpt_root: Path) -> None:
    last = ckpt.list_checkpoints(ckpt_root)
    raise TrainingDiverged(
        f"train_lora: loss became {loss} at step {step}; stopped. The last good "
        f"checkpoint is {last[-1] if last else 'none (no checkpoint yet)'}. Lower "
        "train.learning_rate, use train.precision: bf16 or fp32, or set train.min_snr_gamma."
    )


@dataclass
class TrainState:
    """The UNet with its LoRA and everything a checkpoint restores: optimizer, LR schedule, loss
    scaler, the run's one generator, the batch order, the loss and validation history."""

    unet: torch.nn.Module
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    lr_schedule: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    gen: torch.Generator
    order: BatchOrder
    settings: TrainSettings
    dtype: torch.dtype
    losses: list[dict] = field(default_factory=list)
    validations: list[dict] = field(default_factory=list)

    @classmethod
    def create(cls, folder: KolorsFolder, settings: TrainSettings, examples: list[Example], dtype: torch.dtype,
               device: torch.device) -> "TrainState":
        unet = folder.load_unet(dtype, device)  # straight to the device: no host copy per process
        params = add_lora(unet, settings)
        if settings.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        unet.train()
        optimizer = torch.optim.AdamW(params, lr=settings.learning_rate)
        warmup = max(1, settings.lr_warmup_steps)
        lr_schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup))
        scaler = torch.amp.GradScaler(device.type, enabled=settings.precision == "fp16" and device.type == "cuda")
        return cls(unet, params, optimizer, lr_schedule, scaler, torch.Generator().manual_seed(settings.seed),
                   BatchOrder(examples, settings.batch_size), settings, dtype)

    def state_dict(self, step: int) -> dict:
        return {"step": step, "optimizer": self.optimizer.state_dict(), "lr_scheduler": self.lr_schedule.state_dict(),
                "generator": self.gen.get_state(), "batch_order": self.order.state_dict(), "losses": self.losses,
                "validations": self.validations, "scaler": self.scaler.state_dict()}

    def resume(self, ckpt_root: Path) -> int:
        """Load the newest resumable checkpoint, if any; returns its step (0: a fresh start)."""
        resumable = ckpt.list_checkpoints(ckpt_root)
        if not resumable:
            return 0
        lora, state = ckpt.load_checkpoint(resumable[-1])
        load_lora_state(self.unet, lora)
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_schedule.load_state_dict(state["lr_scheduler"])
        self.gen.set_state(state["generator"])
        if state.get("scaler"):  # fp16: the loss scale and its growth tracker go on where they were
            self.scaler.load_state_dict(state["scaler"])
        self.order.load_state_dict(state["batch_order"])
        self.losses, self.validations = state["losses"], state["validations"]
        log.info("resuming from checkpoint %s (step %d)", resumable[-1].name, state["step"])
        return state["step"]

    def optimizer_step(self) -> float:
        """Clip, step (through the fp16 loss scaler when on), advance the LR; returns the step's LR."""
        self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.params, self.settings.max_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        lr = self.lr_schedule.get_last_lr()[0]
        self.lr_schedule.step()
        return lr


def accumulate_gradients(run: TrainState, batches: Batches, procs: Processes, noise_scheduler,
                         autocast_dtype: torch.dtype | None) -> float:
    """Forward and backward over this process's micro-batches of one step; returns its loss."""
    settings, device, dtype, loss = run.settings, batches.device, run.dtype, 0.0
    for _ in range(settings.gradient_accumulation):
        # Every process draws all processes' micro-batches, in rank order, and keeps its own.
        draw = [batches.draw(run.order, run.gen) for _ in range(procs.world)][procs.rank]
        lat, embeds, pooled, time_ids = batches.make(draw)
        noise, t = draw.noise.to(device), draw.timesteps.to(device)
        noisy = noise_scheduler.add_noise(lat, noise, t)
        # time_ids stay fp32: bf16 rounds sizes above 256 (1489 -> 1488, a crop at 341 -> 340), and
        # the UNet's add_time_proj computes its sinusoids in fp32 whatever dtype it is given.
        with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            pred = run.unet(noisy.to(dtype), t, encoder_hidden_states=embeds.to(dtype),
                            added_cond_kwargs={"text_embeds": pooled.to(dtype), "time_ids": time_ids}).sample
        micro = diffusion_loss(pred, noise, t, noise_scheduler.alphas_cumprod, settings.min_snr_gamma)
        micro = micro / settings.gradient_accumulation
        run.scaler.scale(micro).backward()
        loss += micro.item()
    return loss


def prepare_batches(
    folder: KolorsFolder, examples: list[Example], settings: TrainSettings, cache_root: Path, device: torch.device,
    dtype: torch.dtype, num_timesteps: int, validating: bool, embeddings: Path | None = None,
) -> Batches:
    """Text embeddings (ChatGLM loaded only for uncached captions, then released) and, for center
    crops, latents from the cache; the VAE stays loaded only for random crops or validation."""
    texts = encode_texts(folder, [e.caption for e in examples] + validation_texts(settings.validation),
                         cache_root, device, dtype, embeddings)
    vae_dtype = LATENT_VAE_DTYPE  # whatever train.precision is: the latents' numerics never depend on it
    load_vae = functools.cache(lambda: folder.load_vae(vae_dtype, device))
    latents = None
    if settings.crop != "random":
        flips = (False, True) if settings.random_flip else (False,)
        latents = cache_latents(load_vae, folder, examples, flips, cache_root, device, vae_dtype)
    needs_vae = settings.crop == "random" or validating
    vae = load_vae() if needs_vae else None
    if not needs_vae:
        from diffusers.training_utils import free_memory

        load_vae.cache_clear()
        free_memory()
    return Batches(examples, texts, latents, vae, settings, device, folder.latent_geometry(), num_timesteps)


__all__ = ["TrainResult", "TrainingDiverged", "train_lora", "precision_dtypes"]
