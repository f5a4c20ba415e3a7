"""gpu_check.json, the GPU check's report, under names a type checks: the timed phases (Phase),
the check under way when one fails (Stage), and a dataclass per section the check writes or
reads back (Header, Failure, TrainFigures, RenderFigures, Summary). The file's shape is the one
docs/gpu-host.md documents: header, status, phases (name -> figures), summary, failed.

Its imports are the standard library and torch: the GPU host has them (tests/gpu_host).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from enum import Enum
from importlib import resources
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

# bench/gpu_memory_estimate.py's full-size trace (`--out` this file to renew it). Package data
# (pyproject.toml), not a path into a checkout: an installed project and the offline host's copy
# of src/ find it alike.
ESTIMATES = resources.files("kolors_story.tools") / "gpu_memory_estimate.json"


class Phase(str, Enum):
    """Every timed phase, by its name in gpu_check.json's `phases`."""

    BUILD_KOLORS = "build_kolors"
    BUILD_AESTHETIC = "build_aesthetic"
    CHATGLM_LOAD = "chatglm_disk_load_to_gpu"
    ENCODE_TEXTS = "encode_texts"
    WRITE_EMBEDDINGS = "write_embeddings_file"
    TRAIN_ENCODE = "train_encode_captions_and_latents"
    TRAIN_UNET_DISK_LOAD = "train_unet_disk_load"
    TRAIN_UNET_TO_GPU = "train_unet_to_gpu"
    TRAIN = "train"
    SCENE_EMBEDDINGS = "scene_prompt_embeddings_from_file"
    SCENE_DISK_LOAD = "scene_unet_vae_disk_load"
    SCENE_TO_GPU = "scene_move_to_gpu"
    SCENE_LORA_LOAD = "scene_lora_load"
    SCENE_LORA_FUSE = "scene_lora_fuse"
    SCENE_COMPILE = "scene_compile_and_warm_up"
    SCENE_RENDER = "scene_render"
    LORA_ROUND_TRIP = "lora_round_trip"
    SCORE = "score"
    ANCHOR_JOB = "anchor_job"
    CONSISTENCY_SCENE_JOB = "consistency_scene_job"


class Stage(str, Enum):
    """The check under way: what `failed.phase` names when it fails between two timed phases."""

    START = "start"
    BUILD_MODELS = "build_models"
    TEXT_ENCODER = "text_encoder"
    TRAINING = "training"
    SCENE = "scene"
    CONSISTENCY = "consistency"


Record = dict[str, Any]  # one phase's figures: what the phase adds, then its peak memory and seconds


@dataclass(frozen=True)
class Header:
    device: str
    versions: dict[str, str | None]
    settings: dict[str, Any]  # the command line's options, as JSON values


@dataclass(frozen=True)
class Failure:
    phase: str  # a Phase's or a Stage's name
    error: str
    traceback: str

    @classmethod
    def of(cls, where: Phase | Stage, err: BaseException) -> Failure:
        """Called in the `except` block, where the traceback is err's."""
        return cls(where.value, f"{type(err).__name__}: {err}", traceback.format_exc())


@dataclass(frozen=True)
class TrainFigures:
    steps: int
    precision: str
    final_loss: float
    seconds_per_step_median: float | None  # None after one step: the first step also loads the UNet
    seconds_per_step_min: float | None
    validation: dict[str, Any]  # every, size, steps, prompts, pick_best: the validation the check ran
    validations: list[dict[str, Any]]  # step, mean score
    picked_step: int


@dataclass(frozen=True)
class RenderFigures:
    images: int
    steps: int
    guidance_scale: float
    precision: str
    vae_decode_seconds: float
    vae_decode_calls: int
    denoise_seconds: float
    seconds_per_image: float
    seconds_per_step: float


@dataclass(frozen=True)
class Measured:
    """What the summary and the exit status read back from the checks."""

    train: TrainFigures
    render: RenderFigures
    round_trip: dict[str, Any]  # lora_round_trip.compare_round_trip's record: ok, problems, weights, images


@dataclass(frozen=True)
class ModelLoadSeconds:
    train_job_unet_disk: float
    train_job_unet_to_gpu: float
    chatglm_disk_to_gpu: float
    scene_job_unet_vae_disk: float
    scene_job_to_gpu: float
    scene_job_lora_load: float
    scene_job_lora_fuse: float


@dataclass(frozen=True)
class MemoryComparison:
    estimated_gib: float
    estimate_of: list[str]  # bench/gpu_memory_estimate.py's phases whose largest estimate this is
    measured_reserved_gib: float | None  # None off CUDA


@dataclass(frozen=True)
class Summary:
    seconds_per_training_step: float | None
    seconds_per_image: float
    model_load_seconds: ModelLoadSeconds
    estimates: dict[str, Any] | None  # the trace's `estimate` section
    estimated_vs_measured_gib: dict[str, MemoryComparison] | None
    estimates_source: str
    total_seconds: float


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class Phases:
    """Seconds and peak GPU memory (allocated and reserved by torch's allocator) of each phase,
    written to `out` after each one (and with the traceback when one fails)."""

    def __init__(self, device: torch.device, out: Path, header: Header):
        self.device, self.out, self.header = device, out, header
        self.results: dict[Phase, Record] = {}
        self.failed: Failure | None = None
        self.stage = Stage.START

    @contextlib.contextmanager
    def measure(self, name: Phase) -> Iterator[Record]:
        cuda = self.device.type == "cuda"
        sync(self.device)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        record: Record = {}
        start = time.perf_counter()
        try:
            yield record
        except BaseException as err:
            self.failed = Failure.of(name, err)
            self.write()
            raise
        sync(self.device)
        if cuda:
            record["peak_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
            record["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 3)
        record["seconds"] = round(time.perf_counter() - start, 3)
        self.results[name] = record
        log.info("%s: %s", name.value, record)
        self.write()

    def seconds(self, phase: Phase) -> float:
        return self.results[phase]["seconds"]

    def peak_reserved_gib(self, phase: Phase) -> float | None:
        return self.results[phase].get("peak_reserved_gib")

    def write(self, summary: Summary | None = None) -> None:
        status = "failed" if self.failed else ("complete" if summary else "running")
        report = {**dataclasses.asdict(self.header), "status": status,
                  "phases": {phase.value: record for phase, record in self.results.items()},
                  **(dataclasses.asdict(summary) if summary else {})}
        if self.failed:
            report["failed"] = dataclasses.asdict(self.failed)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.out.with_name(self.out.name + ".tmp")
        tmp.write_text(json.dumps(report, indent=1, ensure_ascii=False), encoding="utf-8")
        tmp.replace(self.out)

    def release(self) -> None:
        from diffusers.training_utils import free_memory

        free_memory()  # gc, then the accelerator's cache


# gpu_check phase -> bench/gpu_memory_estimate.py's phases (estimates with margins) it is measured against
MEMORY_PAIRS: dict[Phase, tuple[str, ...]] = {
    Phase.TRAIN_ENCODE: ("vae_encoding",), Phase.TRAIN: ("training",), Phase.ENCODE_TEXTS: ("text_encoding",),
    Phase.SCENE_RENDER: ("scene_best_of_4",), Phase.ANCHOR_JOB: ("anchor",), Phase.SCORE: ("scoring",),
}


def compare_memory(estimate: dict[str, Any], phases: Phases) -> dict[str, MemoryComparison]:
    """bench/gpu_memory_estimate.py's per-phase estimates (with margins) beside the measured peaks."""
    est = {k: v / 2**30 for k, v in estimate["phases_with_margins"].items()}
    return {phase.value: MemoryComparison(round(max(est[n] for n in names), 3), list(names),
                                          phases.peak_reserved_gib(phase))
            for phase, names in MEMORY_PAIRS.items() if phase in phases.results and all(n in est for n in names)}


def model_load_seconds(phases: Phases) -> ModelLoadSeconds:
    return ModelLoadSeconds(
        train_job_unet_disk=phases.seconds(Phase.TRAIN_UNET_DISK_LOAD),
        train_job_unet_to_gpu=phases.seconds(Phase.TRAIN_UNET_TO_GPU),
        chatglm_disk_to_gpu=phases.seconds(Phase.CHATGLM_LOAD),
        scene_job_unet_vae_disk=phases.seconds(Phase.SCENE_DISK_LOAD),
        scene_job_to_gpu=phases.seconds(Phase.SCENE_TO_GPU),
        scene_job_lora_load=phases.seconds(Phase.SCENE_LORA_LOAD),
        scene_job_lora_fuse=phases.seconds(Phase.SCENE_LORA_FUSE),
    )


def summary(phases: Phases, measured: Measured, estimates_file: Any, total_seconds: float) -> Summary:
    """`estimates_file`: a Path or the packaged file (an importlib.resources Traversable)."""
    estimates = json.loads(estimates_file.read_text(encoding="utf-8")) if estimates_file.is_file() else None
    return Summary(
        seconds_per_training_step=measured.train.seconds_per_step_median,
        seconds_per_image=measured.render.seconds_per_image,
        model_load_seconds=model_load_seconds(phases),
        estimates=None if estimates is None else estimates.get("estimate"),
        estimated_vs_measured_gib=None if estimates is None else compare_memory(estimates["estimate"], phases),
        estimates_source=(str(estimates_file) if estimates is not None
                          else f"not found: run bench/gpu_memory_estimate.py --out {estimates_file}"),
        total_seconds=total_seconds,
    )
