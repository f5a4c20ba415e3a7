"""One-command check of the real code path at full size on one CUDA GPU, with no download.

    python -m kolors_story.gpu_check [--model DIR] [--out gpu_check.json]

Without --model it builds random-weight Kolors components at the real sizes from the real configs
and saves them in the real Kwai-Kolors/Kolors-diffusers layout (fp16 files, sharded text encoder),
plus a random full-size aesthetic predictor in its real layout. Then, through the project's own
functions (the ones the Snakemake jobs call), it encodes the captions, trains LoRA steps at 1024 px
(rank 16, bf16, gradient checkpointing), renders one scene best-of-4 (50 steps, CFG 5) and scores
it. It writes one JSON: seconds per training step, seconds per image, model load time per job,
peak GPU memory per phase, and the estimates of bench/gpu_memory_estimate.py beside them.

It imports only torch, diffusers, transformers, peft, accelerate, safetensors, sentencepiece,
simple-aesthetics-predictor and pillow (no Snakemake, Data-Juicer or ModelScope), so it runs on an
offline GPU host that has torch; `make wheelhouse` gathers the other wheels. `--size tiny --device
cpu` runs the same path on the tiny models (what the test does).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import platform
import shutil
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch

log = logging.getLogger("kolors_story.gpu_check")
ESTIMATES = Path(__file__).resolve().parents[2] / "bench" / "reference" / "gpu_memory_estimate.json"
CAPTIONS = ("二次元，水墨画，山水", "二次元，少女，樱花", "水墨画，古风，小桥流水", "二次元，猫，窗台")
PROMPT = "二次元，水墨画，一个少女站在山顶，看着远处的云海"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="a Kolors-diffusers folder with real weights (default: build random ones)")
    parser.add_argument("--aesthetic", type=Path, help="the aesthetic predictor folder (default: build a random one)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/kolors-gpu-check"), help="models, data, caches, LoRA")
    parser.add_argument("--out", type=Path, default=Path("gpu_check.json"))
    parser.add_argument("--size", choices=("full", "tiny"), default="full", help="random models' size")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--train-steps", type=int, default=30)
    parser.add_argument("--resolution", type=int, default=1024)
    parser.add_argument("--images", type=int, default=8, help="training images (random, at the resolution)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--precision", choices=("bf16", "fp16", "fp32"), default="bf16")
    parser.add_argument("--sampler", default="euler")
    parser.add_argument("--sample-steps", type=int, default=50)
    parser.add_argument("--cfg", type=float, default=5.0)
    parser.add_argument("--candidates", type=int, default=4)
    parser.add_argument("--estimates", type=Path, default=ESTIMATES)
    return parser.parse_args(argv)


class Phases:
    """Seconds and peak GPU memory (allocated and reserved by torch's allocator) of each phase."""

    def __init__(self, device: torch.device):
        self.device, self.results = device, {}

    @contextlib.contextmanager
    def measure(self, name: str) -> Iterator[dict]:
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        record: dict = {}
        start = time.perf_counter()
        yield record
        if cuda:
            torch.cuda.synchronize()
            record["peak_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
            record["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 3)
        record["seconds"] = round(time.perf_counter() - start, 3)
        self.results[name] = record
        log.info("%s: %s", name, record)

    def release(self) -> None:
        import gc

        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def build_models(args: argparse.Namespace, phases: Phases) -> tuple[Path, Path]:
    """The Kolors folder and the predictor folder: given, or built with random weights."""
    from kolors_story import tiny_aesthetic, tiny_kolors

    kolors, aesthetic = args.model, args.aesthetic
    if kolors is None:
        with phases.measure("build_kolors") as record:
            kolors = args.work / f"kolors-{args.size}"
            if args.size == "full":
                tiny_kolors.build_full_kolors(kolors, device=phases.device)
            else:
                tiny_kolors.build_tiny_kolors(kolors)
            record["gb_on_disk"] = round(sum(p.stat().st_size for p in kolors.rglob("*") if p.is_file()) / 1e9, 3)
        phases.release()
    if aesthetic is None:
        with phases.measure("build_aesthetic"):
            config = tiny_aesthetic.full_clip_vision_config() if args.size == "full" else None
            aesthetic = tiny_aesthetic.build_tiny_aesthetic_predictor(args.work / f"aesthetic-{args.size}", config=config)
    return kolors, aesthetic


def write_dataset(root: Path, images: int, resolution: int) -> Path:
    """train/metadata.csv + smooth random images at the training size (DiffSynth's layout)."""
    import csv

    from PIL import Image

    (root / "train").mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    rows = []
    for i in range(images):
        low = torch.rand(3, 8, 8, generator=gen)  # upsampled: image-like, not pixel noise
        pixels = torch.nn.functional.interpolate(low[None], size=(resolution, resolution), mode="bicubic")[0]
        array = (pixels.clamp(0, 1) * 255).byte().permute(1, 2, 0).numpy()
        Image.fromarray(array).save(root / "train" / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "text": CAPTIONS[i % len(CAPTIONS)]})
    with open(root / "train" / "metadata.csv", "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["file_name", "text"])
        writer.writeheader()
        writer.writerows(rows)
    return root


def check_training(args, phases: Phases, kolors: Path, dataset: Path) -> Path:
    """Encode (the trainer's own prepare_batches, caches filled), load, then train from warm caches."""
    from kolors_story.kolors_folder import KolorsFolder
    from kolors_story.training.data import assign_sizes, read_metadata
    from kolors_story.training.loop import precision_dtypes, prepare_batches, train_lora
    from kolors_story.training.settings import TrainSettings

    settings = TrainSettings(steps=args.train_steps, resolution=args.resolution, rank=args.rank,
                             precision=args.precision, gradient_checkpointing=True, checkpoint_every=0)
    folder, cache = KolorsFolder(kolors), args.work / "cache"
    dtype, _ = precision_dtypes(settings.precision, phases.device)
    examples = read_metadata(dataset)
    assign_sizes(examples, settings)
    with phases.measure("encode_captions_and_latents") as record:
        timesteps = folder.config("scheduler")["num_train_timesteps"]
        prepare_batches(folder, examples, settings, cache, phases.device, dtype, timesteps, validating=False)
        record["captions"], record["images"] = len(set(e.caption for e in examples)), len(examples)
    phases.release()
    with phases.measure("train_job_load_unet"):
        unet = folder.load_unet(dtype).to(phases.device)
    del unet
    phases.release()
    with phases.measure("train") as record:
        result = train_lora(kolors, dataset, args.work / "lora", settings, cache_dir=cache)
        elapsed = [row["seconds"] for row in result.losses]
        steps = [b - a for a, b in zip(elapsed, elapsed[1:])]  # the first step also loads the UNet
        record.update(steps=len(result.losses), final_loss=result.losses[-1]["loss"],
                      seconds_per_step_median=round(statistics.median(steps), 4) if steps else None,
                      seconds_per_step_min=round(min(steps), 4) if steps else None)
    phases.release()
    return result.lora_file


def check_scene(args, phases: Phases, kolors: Path, lora: Path, aesthetic: Path) -> None:
    """A scene job's steps as generate_scene runs them: embeddings, pipeline + LoRA, N candidates, scores."""
    from kolors_story.generation import (
        SamplerSettings, Scene, candidate_seeds, load_style_lora, pipeline_and_embeddings, render, score_candidates,
    )

    settings = SamplerSettings(sampler=args.sampler, steps=args.sample_steps, guidance_scale=args.cfg,
                               precision=args.precision, candidates=args.candidates)
    scene = Scene("gpu_check", PROMPT, seed=0, width=args.resolution, height=args.resolution)
    with phases.measure("scene_job_encode_prompt"):  # ChatGLM loaded, used, released (no cache)
        pipe, embeds = pipeline_and_embeddings(kolors, settings, scene, phases.device)
    with phases.measure("scene_job_load_pipeline"):
        pipe.to(phases.device)
        load_style_lora(pipe, lora, 1.0)
    seeds = candidate_seeds(scene.seed, settings.candidates)
    with phases.measure("render") as record:
        images = render(pipe, scene, settings, seeds, embeds)
        record.update(images=len(images), steps=settings.steps, guidance_scale=settings.guidance_scale)
    record["seconds_per_image"] = round(record["seconds"] / len(images), 3)
    del pipe
    phases.release()
    with phases.measure("score") as record:
        scores, _ = score_candidates(images, aesthetic, phases.device)
        record["scores"] = [round(s, 4) for s in scores]
    best = max(range(len(images)), key=lambda k: scores[k])
    images[best].save(args.work / "panel.png")


def compare_memory(estimate: dict, measured: dict) -> dict:
    """bench/gpu_memory_estimate.py's per-phase estimates (with margins) beside the measured peaks."""
    est = {k: v / 2**30 for k, v in estimate["phases_with_margins"].items()}
    pairs = {"text_and_vae_encoding": (max(est["text_encoding"], est["vae_encoding"]), "encode_captions_and_latents"),
             "training": (est["training"], "train")}
    return {name: {"estimated": round(value, 3), "measured_reserved": measured[phase].get("peak_reserved_gib")}
            for name, (value, phase) in pairs.items()}


def summary(args, phases: Phases) -> dict:
    import diffusers
    import peft
    import transformers

    device = phases.device
    estimates = json.loads(args.estimates.read_text()) if args.estimates.is_file() else None
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
                     "diffusers": diffusers.__version__, "transformers": transformers.__version__,
                     "peft": peft.__version__},
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "phases": phases.results,
        "seconds_per_training_step": phases.results["train"]["seconds_per_step_median"],
        "seconds_per_image": phases.results["render"]["seconds_per_image"],
        "model_load_seconds": {"train_job_unet": phases.results["train_job_load_unet"]["seconds"],
                               "scene_job_text_encoder_and_prompt": phases.results["scene_job_encode_prompt"]["seconds"],
                               "scene_job_pipeline": phases.results["scene_job_load_pipeline"]["seconds"]},
        "estimates": estimates and estimates.get("estimate"),
        "estimated_vs_measured_gib": estimates and compare_memory(estimates["estimate"], phases.results),
        "estimates_source": str(args.estimates) if estimates else f"not found: run bench/gpu_memory_estimate.py --out {args.estimates}",
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU visible (torch.cuda.is_available() is False); use --device cpu --size tiny "
              "for the CPU run at tiny size", file=sys.stderr)
        return 2
    for stale in ("cache", "lora", "dataset"):  # a rerun measures encoding and training again
        shutil.rmtree(args.work / stale, ignore_errors=True)
    args.work.mkdir(parents=True, exist_ok=True)
    phases = Phases(device)
    started = time.perf_counter()
    kolors, aesthetic = build_models(args, phases)
    dataset = write_dataset(args.work / "dataset", args.images, args.resolution)
    lora = check_training(args, phases, kolors, dataset)
    check_scene(args, phases, kolors, lora, aesthetic)
    report = summary(args, phases)
    report["total_seconds"] = round(time.perf_counter() - started, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1, ensure_ascii=False), encoding="utf-8")
    print(f"gpu_check: {report['seconds_per_training_step']} s/training step, {report['seconds_per_image']} s/image, "
          f"{report['total_seconds']} s in all; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
