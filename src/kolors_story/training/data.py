"""Training examples: metadata.csv rows, aspect-ratio buckets, crops and the batch order."""

from __future__ import annotations

import csv
import functools
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from kolors_story.data.training_folder import too_small_for_a_step
from kolors_story.errors import UserError
from kolors_story.files import sha256_file
from kolors_story.training.settings import TrainSettings


@dataclass
class Example:
    image_path: Path
    caption: str
    repeats: int = 1  # times shown per epoch (kohya's <repeats>_<name>/ folders)
    original_size: tuple[int, int] = (0, 0)  # (height, width), Kolors' SDXL-style conditioning
    target_size: tuple[int, int] = (0, 0)  # (height, width) of the crop the UNet sees

    @functools.cached_property
    def digest(self) -> str:
        """sha256 of the image file, read once: the run fingerprint and the latent cache both key on it."""
        return sha256_file(self.image_path)


def read_metadata(dataset_dir: Path) -> list[Example]:
    """Rows of <dataset_dir>/train/metadata.csv (file_name,text), DiffSynth-Studio's layout, with
    an optional `repeats` column (written only when some image repeats)."""
    csv_path = Path(dataset_dir) / "train" / "metadata.csv"
    if not csv_path.is_file():
        raise UserError(f"training data: {csv_path} not found (built by rule build_metadata).")
    with open(csv_path, encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise UserError(f"training data: {csv_path} has no rows; check filter settings.")
    return [Example(csv_path.parent / r["file_name"], r["text"], _repeats(r, csv_path, n))
            for n, r in enumerate(rows, 1)]


def _repeats(row: dict, csv_path: Path, n: int) -> int:
    value = (row.get("repeats") or "1").strip()
    if not value.isdigit() or int(value) < 1:
        raise UserError(f"training data: {csv_path} row {n} ({row.get('file_name')}) has repeats {value!r}, not a whole number >= 1; "
                        "rerun rule build_metadata.")
    return int(value)


def examples_per_epoch(examples: list[Example]) -> int:
    """Images times their repeats: what one pass over the data shows."""
    return sum(ex.repeats for ex in examples)


def check_dataset_size(examples: list[Example], settings: TrainSettings, processes: int, csv_path: Path) -> None:
    """Refuse a dataset smaller than one optimizer step (batch_size x gradient_accumulation x
    processes examples): every step would show images more than once. encode_texts refuses it
    first (check_step_fits, with the plan's train settings); this guards a folder given by hand."""
    step = {"batch_size": settings.batch_size, "gradient_accumulation": settings.gradient_accumulation,
            "processes": processes}
    error = too_small_for_a_step(len(examples), examples_per_epoch(examples), step, f"training data: {csv_path}")
    if error:
        raise error


def check_step_fits(dataset_dir: Path, step: dict) -> None:
    """Refuse a training folder smaller than one optimizer step of the strictest training that
    reads it (JobPlan.step_examples): encode_texts' check, where the workflow first has the count
    and before ChatGLM or the UNet loads."""
    examples = read_metadata(dataset_dir)
    error = too_small_for_a_step(len(examples), examples_per_epoch(examples), step, f"The dataset {dataset_dir}")
    if error:
        raise error


def make_buckets(resolution: int, step: int, max_ratio: float = 2.0) -> list[tuple[int, int]]:
    """(height, width) pairs, multiples of `step`, each about resolution**2 pixels."""
    area, buckets = resolution * resolution, set()
    for width in range(step, int(resolution * math.sqrt(max_ratio)) + step, step):
        height = max(step, round(area / width / step) * step)
        if 1 / max_ratio <= width / height <= max_ratio:
            buckets.update({(height, width), (width, height)})  # landscape and portrait alike
    return sorted(buckets)


def nearest_bucket(size_hw: tuple[int, int], buckets: list[tuple[int, int]]) -> tuple[int, int]:
    ratio = math.log(size_hw[1] / size_hw[0])
    return min(buckets, key=lambda b: (abs(math.log(b[1] / b[0]) - ratio), -b[0] * b[1]))


def assign_sizes(examples: list[Example], settings: TrainSettings) -> None:
    """Set each example's original size and the target size it trains at (square or bucket)."""
    buckets = make_buckets(settings.resolution, settings.bucket_step) if settings.bucketing else None
    for ex in examples:
        with Image.open(ex.image_path) as image:
            ex.original_size = (image.height, image.width)
        square = (settings.resolution, settings.resolution)
        ex.target_size = nearest_bucket(ex.original_size, buckets) if buckets else square


def resized_size(ex: Example) -> tuple[int, int]:
    """(width, height) of the image scaled to just cover its target size."""
    (oh, ow), (th, tw) = ex.original_size, ex.target_size
    scale = max(th / oh, tw / ow)
    return max(tw, round(ow * scale)), max(th, round(oh * scale))


def crop_origin(ex: Example, crop: str, gen: torch.Generator | None) -> tuple[int, int]:
    """(top, left) of the crop in the resized image: centered, or drawn from the generator."""
    (width, height), (th, tw) = resized_size(ex), ex.target_size
    if crop == "random":
        left = int(torch.randint(0, width - tw + 1, (1,), generator=gen))
        top = int(torch.randint(0, height - th + 1, (1,), generator=gen))
        return top, left
    return (height - th) // 2, (width - tw) // 2


def size_conditioning(ex: Example, top_left: tuple[int, int]) -> list[int]:
    """Kolors' add_time_ids for one crop, as Kolors' own dreambooth/LoRA trainer builds them:
    [resized height, resized width, crop top, crop left, target height, target width]. The first
    pair is the image after the covering resize, not the file's own size (the SDXL paper's
    "original size"): both Kolors references (its trainer, and DiffSynth's [h, w, 0, 0, h, w])
    never pass a size below the target, and inference passes (H, W, 0, 0, H, W), so a low-res
    dataset does not teach the LoRA under a "small original" condition the scenes never use.
    The crop pair is the crop actually taken (Kolors' trainer always reports the centre offsets,
    also for its random crops); for a centre crop both agree."""
    width, height = resized_size(ex)
    return [height, width, *top_left, *ex.target_size]


def load_pixels(ex: Example, top_left: tuple[int, int], flip: bool) -> torch.Tensor:
    """Resize to cover the target size, crop at top_left (see crop_origin), optionally mirror.
    Returns pixels in [-1, 1], shape (3, H, W)."""
    th, tw = ex.target_size
    image = Image.open(ex.image_path).convert("RGB").resize(resized_size(ex), Image.BICUBIC)
    top, left = top_left
    image = image.crop((left, top, left + tw, top + th))
    if flip:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    return pixels.view(th, tw, 3).permute(2, 0, 1).float() / 127.5 - 1.0


class BatchOrder:
    """Seeded batch order: each epoch shuffles the examples (each as often as its repeats),
    groups them by target size (a batch never mixes sizes) and shuffles the batches. Its state is
    plain lists, so it checkpoints."""

    def __init__(self, examples: list[Example], batch_size: int):
        self.sizes = [ex.target_size for ex in examples]
        # An example with repeats r takes r places in every epoch (kohya's repeats); with none,
        # the places are the examples themselves, so the order is what it was without repeats.
        self.places = [i for i, ex in enumerate(examples) for _ in range(ex.repeats)]
        self.batch_size = batch_size
        self.pending: list[list[int]] = []

    def _epoch(self, gen: torch.Generator) -> list[list[int]]:
        order = [self.places[j] for j in torch.randperm(len(self.places), generator=gen).tolist()]
        groups: dict[tuple[int, int], list[int]] = {}
        for i in order:
            groups.setdefault(self.sizes[i], []).append(i)
        batches = [g[k:k + self.batch_size] for g in groups.values() for k in range(0, len(g), self.batch_size)]
        return [batches[i] for i in torch.randperm(len(batches), generator=gen).tolist()]

    def next(self, gen: torch.Generator) -> list[int]:
        if not self.pending:
            self.pending = self._epoch(gen)
        return self.pending.pop(0)

    def state_dict(self) -> dict:
        return {"pending": [list(b) for b in self.pending]}

    def load_state_dict(self, state: dict) -> None:
        self.pending = [list(b) for b in state["pending"]]
