"""LoRA fine-tuning of the Kolors UNet with diffusers + peft.

Order of work keeps memory low: captions are encoded once (one ChatGLM pass per distinct caption)
and the text encoder is released before the UNet is loaded; latents are encoded once per image
when no per-step augmentation needs the VAE. The LoRA file is diffusers format with its peft
config in the safetensors metadata, so stock `KolorsPipeline.load_lora_weights` restores alpha.
"""

from __future__ import annotations

import csv
import gc
import logging
import math
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from kolors_story import models
from kolors_story.errors import UserError
from kolors_story.text_encoding import encode_prompts

log = logging.getLogger(__name__)

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"


@dataclass(frozen=True)
class TrainSettings:
    rank: int = 16
    alpha: float = 4.0
    learning_rate: float = 1e-4
    steps: int = 500
    batch_size: int = 1
    resolution: int = 1024
    crop: str = "center"
    random_flip: bool = False
    precision: str = "bf16"
    gradient_checkpointing: bool = True
    seed: int = 0
    target_modules: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
    max_grad_norm: float = 1.0

    @classmethod
    def from_dict(cls, values: dict) -> "TrainSettings":
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise UserError(f"train: unknown setting(s) {sorted(unknown)}; known: {sorted(known)}")
        values = dict(values)
        if "target_modules" in values:
            values["target_modules"] = tuple(values["target_modules"])
        return cls(**values)


@dataclass
class Example:
    """One training image: its pixels (for per-step augmentation) or cached latents, and caption."""

    image_path: Path
    caption: str
    original_size: tuple[int, int] = (0, 0)  # (height, width) before resize, as SDXL conditioning
    latents: torch.Tensor | None = None
    flipped_latents: torch.Tensor | None = None


@dataclass
class TrainResult:
    lora_file: Path
    losses: list[dict] = field(default_factory=list)
    seconds: float = 0.0


# ---------------------------------------------------------------- data
def read_metadata(dataset_dir: Path) -> list[Example]:
    """Rows of <dataset_dir>/train/metadata.csv (file_name,text), DiffSynth-Studio's layout."""
    csv_path = Path(dataset_dir) / "train" / "metadata.csv"
    if not csv_path.is_file():
        raise UserError(f"training data: {csv_path} not found (built by rule build_metadata).")
    with open(csv_path, encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise UserError(f"training data: {csv_path} has no rows; check filter settings.")
    return [Example(csv_path.parent / r["file_name"], r["text"]) for r in rows]


def load_square(
    path: Path, resolution: int, crop: str, flip: bool, gen: torch.Generator
) -> tuple[torch.Tensor, tuple[int, int], tuple[int, int]]:
    """Resize the short side to `resolution`, crop a square; return pixels in [-1, 1],
    the original (h, w) and the crop's top-left (for Kolors' SDXL-style time ids)."""
    image = Image.open(path).convert("RGB")
    original = (image.height, image.width)
    scale = resolution / min(image.size)
    size = (max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale)))
    image = image.resize(size, Image.BICUBIC)
    spare_x, spare_y = size[0] - resolution, size[1] - resolution
    if crop == "random":
        left = int(torch.randint(0, spare_x + 1, (1,), generator=gen))
        top = int(torch.randint(0, spare_y + 1, (1,), generator=gen))
    else:
        left, top = spare_x // 2, spare_y // 2
    image = image.crop((left, top, left + resolution, top + resolution))
    if flip:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    pixels = pixels.view(resolution, resolution, 3).permute(2, 0, 1).float() / 127.5 - 1.0
    return pixels, original, (top, left)


def needs_per_step_pixels(settings: TrainSettings) -> bool:
    return settings.crop == "random"


# ---------------------------------------------------------------- encoders
def encode_captions(
    model_dir: Path, captions: list[str], device: torch.device, dtype: torch.dtype
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Encode each distinct caption once, then free the text encoder (never beside the UNet)."""
    distinct = sorted(set(captions))
    log.info("encoding %d distinct caption(s) with ChatGLM", len(distinct))
    tokenizer = models.load_tokenizer(model_dir)
    text_encoder = models.load_text_encoder(model_dir, dtype).to(device)
    cache = {}
    for caption in tqdm(distinct, desc="captions", leave=False):
        embeds, pooled = encode_prompts(tokenizer, text_encoder, [caption], device)
        cache[caption] = (embeds[0].float().cpu(), pooled[0].float().cpu())
    del text_encoder
    _release(device)
    return cache


@torch.no_grad()
def encode_latents(vae, pixels: torch.Tensor, device: torch.device) -> torch.Tensor:
    dist = vae.encode(pixels.to(device, vae.dtype)).latent_dist
    return (dist.mode() * vae.config.scaling_factor).float()


def cache_latents(
    vae, examples: list[Example], settings: TrainSettings, device: torch.device
) -> None:
    """Center-cropped latents once per image (and its mirror image when flipping is on)."""
    gen = torch.Generator().manual_seed(settings.seed)
    for ex in tqdm(examples, desc="latents", leave=False):
        pixels, ex.original_size, _ = load_square(ex.image_path, settings.resolution, "center", False, gen)
        ex.latents = encode_latents(vae, pixels[None], device)[0].cpu()
        if settings.random_flip:
            ex.flipped_latents = encode_latents(vae, pixels.flip(-1)[None], device)[0].cpu()


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------- model
def add_lora(unet, settings: TrainSettings) -> list[torch.nn.Parameter]:
    """Freeze the UNet, attach LoRA adapters (seeded init) and return the trainable fp32 params."""
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig

    unet.requires_grad_(False)
    torch.manual_seed(settings.seed)
    unet.add_adapter(
        LoraConfig(
            r=settings.rank,
            lora_alpha=settings.alpha,
            init_lora_weights="gaussian",
            target_modules=list(settings.target_modules),
        )
    )
    cast_training_params(unet, dtype=torch.float32)  # LoRA in fp32 even when the UNet is bf16
    return [p for p in unet.parameters() if p.requires_grad]


def save_lora(unet, out_dir: Path) -> Path:
    from diffusers import KolorsPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    state = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()}
    KolorsPipeline.save_lora_weights(
        str(out_dir),
        unet_lora_layers=state,
        weight_name=LORA_WEIGHT_NAME,
        unet_lora_adapter_metadata=unet.peft_config["default"].to_dict(),
    )
    return Path(out_dir) / LORA_WEIGHT_NAME


# ---------------------------------------------------------------- loop
class Batcher:
    """Draws batches from the examples in a seeded order (a new permutation each epoch)."""

    def __init__(self, n: int, batch_size: int, gen: torch.Generator):
        self.n, self.batch_size, self.gen = n, batch_size, gen
        self.order: list[int] = []

    def next(self) -> list[int]:
        batch = []
        while len(batch) < self.batch_size:
            if not self.order:
                self.order = torch.randperm(self.n, generator=self.gen).tolist()
            batch.append(self.order.pop(0))
        return batch


def batch_latents(
    examples: list[Example], idx: list[int], settings: TrainSettings, vae, device, gen
) -> tuple[torch.Tensor, torch.Tensor]:
    """Latents and Kolors time ids (orig h, w, crop top, left, target h, w) for one batch."""
    latents, time_ids = [], []
    res = settings.resolution
    for i in idx:
        ex = examples[i]
        flip = settings.random_flip and bool(torch.rand(1, generator=gen) < 0.5)
        if needs_per_step_pixels(settings):
            pixels, original, top_left = load_square(ex.image_path, res, settings.crop, flip, gen)
            latents.append(encode_latents(vae, pixels[None], device)[0])
        else:
            original, top_left = ex.original_size, (0, 0)
            latents.append((ex.flipped_latents if flip else ex.latents).to(device))
        time_ids.append([*original, *top_left, res, res])
    return torch.stack(latents), torch.tensor(time_ids, dtype=torch.float32, device=device)


def train_lora(
    model_dir: Path,
    dataset_dir: Path,
    out_dir: Path,
    settings: TrainSettings,
    device: torch.device | None = None,
) -> TrainResult:
    """Train a LoRA and write <out_dir>/pytorch_lora_weights.safetensors; return losses."""
    from diffusers import DDPMScheduler

    device = device or models.pick_device()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    models.check_kolors_dir(Path(model_dir))
    dtype, autocast_dtype = _dtypes(settings.precision, device)
    examples = read_metadata(Path(dataset_dir))
    log.info("training on %d image(s) at %d px, %d steps, device %s", len(examples),
             settings.resolution, settings.steps, device)

    text_cache = encode_captions(model_dir, [e.caption for e in examples], device, dtype)
    vae = models.load_vae(model_dir, torch.float32 if device.type == "cpu" else dtype).to(device)
    if not needs_per_step_pixels(settings):
        cache_latents(vae, examples, settings, device)
        vae = None
        _release(device)

    unet = models.load_unet(model_dir, dtype).to(device)
    params = add_lora(unet, settings)
    if settings.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    scheduler = DDPMScheduler.from_pretrained(str(model_dir), subfolder="scheduler")
    optimizer = torch.optim.AdamW(params, lr=settings.learning_rate)
    scaler = torch.amp.GradScaler("cuda", enabled=settings.precision == "fp16" and device.type == "cuda")

    gen = torch.Generator().manual_seed(settings.seed)
    batcher = Batcher(len(examples), settings.batch_size, gen)
    losses, start = [], time.monotonic()
    bar = tqdm(range(1, settings.steps + 1), desc="train", unit="step")
    for step in bar:
        idx = batcher.next()
        latents, time_ids = batch_latents(examples, idx, settings, vae, device, gen)
        embeds = torch.stack([text_cache[examples[i].caption][0] for i in idx]).to(device)
        pooled = torch.stack([text_cache[examples[i].caption][1] for i in idx]).to(device)
        noise = torch.randn(latents.shape, generator=gen).to(device)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (len(idx),), generator=gen).to(device)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            pred = unet(noisy.to(dtype), timesteps, encoder_hidden_states=embeds.to(dtype),
                        added_cond_kwargs={"text_embeds": pooled.to(dtype), "time_ids": time_ids.to(dtype)}).sample
        loss = F.mse_loss(pred.float(), noise.float())
        if not math.isfinite(loss.item()):
            raise UserError(f"train_lora: loss became {loss.item()} at step {step}; lower "
                            "train.learning_rate or use train.precision: bf16/fp32.")
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        elapsed = time.monotonic() - start
        losses.append({"step": step, "loss": loss.item(), "lr": settings.learning_rate,
                       "seconds": round(elapsed, 3)})
        bar.set_postfix(loss=f"{loss.item():.4f}", steps_per_s=f"{step / max(elapsed, 1e-9):.2f}")
        if step % max(1, settings.steps // 10) == 0 or step == settings.steps:
            log.info("step %d/%d loss %.5f (%.2f steps/s)", step, settings.steps, loss.item(), step / max(elapsed, 1e-9))
    lora_file = save_lora(unet, out_dir)
    log.info("saved %s", lora_file)
    return TrainResult(lora_file, losses, time.monotonic() - start)


def _dtypes(precision: str, device: torch.device) -> tuple[torch.dtype, torch.dtype | None]:
    """Weight dtype of the frozen models and the autocast dtype (None: no autocast).

    On CPU the frozen weights stay fp32 (half-precision CPU kernels are slow or missing) and
    fp16 autocast falls back to bf16.
    """
    if precision == "fp32":
        return torch.float32, None
    if device.type == "cpu":
        return torch.float32, torch.bfloat16
    return models.torch_dtype(precision), models.torch_dtype(precision)


def write_loss_log(losses: list[dict], csv_path: Path, png_path: Path) -> None:
    """Per-step losses as CSV and a PNG curve (raw and a moving average)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(csv_path, "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["step", "loss", "lr", "seconds"])
        writer.writeheader()
        writer.writerows(losses)
    steps = [r["step"] for r in losses]
    values = [r["loss"] for r in losses]
    window = max(1, len(values) // 20)
    smooth = [sum(values[max(0, i - window + 1): i + 1]) / len(values[max(0, i - window + 1): i + 1])
              for i in range(len(values))]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, values, alpha=0.35, label="loss")
    ax.plot(steps, smooth, label=f"moving mean ({window})")
    ax.set_xlabel("step")
    ax.set_ylabel("MSE (noise prediction)")
    ax.set_title("LoRA training loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)


def settings_dict(settings: TrainSettings) -> dict:
    d = asdict(settings)
    d["target_modules"] = list(d["target_modules"])
    return d
