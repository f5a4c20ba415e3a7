"""One-command check of the real code path at full size on one CUDA GPU, with no download.

    kolors-story-gpu-check [--model DIR] [--out gpu_check.json] [--compile]      # or: make gpu-check

Without --model it builds random-weight Kolors components at the real sizes from the real configs
and saves them in the real Kwai-Kolors/Kolors-diffusers layout (fp16 files, sharded text encoder),
plus a random full-size aesthetic predictor in its real layout; a later run reuses them from
--work. Then, through the project's own functions (the ones the Snakemake jobs call), it runs the
default run's GPU work in the default config's precisions: the text-encoder job (ChatGLM loaded
once, straight to the GPU, every prompt and caption into one embeddings file), the trainer's
latent encoding and LoRA steps at 1024 px (rank 16, gradient checkpointing, validation as the
default run's config.yaml sets it, at the check's size and steps), one best-of-4 scene (50 steps,
CFG 5: disk load, move to GPU, LoRA load and fuse, steps, VAE decode, scoring, each timed apart),
a LoRA round trip (tools/lora_round_trip.py: every layer's update in the saved file, and as
diffusers loaded it, equals the trained adapter's within rounding; with the LoRA scaled up so its
effect dwarfs rounding, the fused render matches the unfused one and differs from the render
without it; rendered by the eager UNet, so --compile compiles once), and a character anchor with
a consistency scene. gpu_check.json (its shape: gpu_check_report) is written after every phase: a
crash leaves the finished phases, the failing phase's name and its traceback. The validation is
the default run's: config.yaml's train.validation, read in the current folder (--config).

It imports only the standard library, the wheelhouse's packages (`make wheelhouse`) and what the
GPU host's image has (tests/gpu_host/packages.txt; tests/tools/test_gpu_check.py runs it on a Python
path that holds nothing else). `--size tiny --device cpu` runs the same path on the tiny models.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import platform
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from kolors_story.tools.gpu_check_report import (
    ESTIMATES, Failure, Header, Measured, Phase, Phases, RenderFigures, Stage, TrainFigures, summary, sync,
)
from kolors_story.training.settings import TrainJob, TrainSettings, ValidationSettings

# The default run, whose validation the check's training runs: in the current folder, as Snakemake reads it.
DEFAULT_CONFIG = Path("config.yaml")
CAPTIONS = ("二次元，水墨画，山水", "二次元，少女，樱花", "水墨画，古风，小桥流水", "二次元，猫，窗台")
PROMPT = "二次元，水墨画，一个少女站在山顶，看着远处的云海"
NEGATIVE = "模糊，低质量，变形"
CHARACTER = "二次元，水墨画，一个穿红色汉服的少女"
BUILT = ".gpu_check_complete"  # written last in a built model folder: a later run reuses it


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from kolors_story.render.scenes import SamplerSettings
    from kolors_story.training.settings import TrainSettings

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
    parser.add_argument("--train-precision", choices=("bf16", "fp16", "fp32"), default=TrainSettings().precision,
                        help="train.precision (default: the config's default)")
    parser.add_argument("--precision", choices=("bf16", "fp16", "fp32"), default=SamplerSettings().precision,
                        help="generate.precision (default: the config's default)")
    parser.add_argument("--sampler", default="euler")
    parser.add_argument("--sample-steps", type=int, default=50)
    parser.add_argument("--cfg", type=float, default=5.0)
    parser.add_argument("--candidates", type=int, default=4)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile of the UNet (generate.compile)")
    parser.add_argument("--compile-backend", choices=("inductor", "aot_eager", "eager"), default="inductor",
                        help="generate.compile_backend (aot_eager: a cheap compile, e.g. with --device cpu)")
    parser.add_argument("--estimates", type=Path, default=ESTIMATES,
                        help="bench/gpu_memory_estimate.py's trace (default: the one the package holds)")
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG,
                        help="the default run's config, whose train.validation the check runs (default: ./config.yaml)")
    return parser.parse_args(argv)


def _reusable(folder: Path) -> bool:
    return (folder / BUILT).is_file()


def build_models(args: argparse.Namespace, phases: Phases) -> tuple[Path, Path]:
    """The Kolors folder and the predictor folder: given, reused from --work, or built."""
    from kolors_story.models import random_aesthetic, random_kolors

    kolors, aesthetic = args.model, args.aesthetic
    if kolors is None:
        kolors = args.work / f"kolors-{args.size}"
        with phases.measure(Phase.BUILD_KOLORS) as record:
            record["reused"] = _reusable(kolors)
            if not record["reused"]:
                (kolors / BUILT).unlink(missing_ok=True)
                if args.size == "full":
                    random_kolors.build_full_kolors(kolors, device=phases.device)
                else:
                    random_kolors.build_tiny_kolors(kolors)
                (kolors / BUILT).touch()
            record["gb_on_disk"] = round(sum(p.stat().st_size for p in kolors.rglob("*") if p.is_file()) / 1e9, 3)
        phases.release()
    if aesthetic is None:
        aesthetic = args.work / f"aesthetic-{args.size}"
        with phases.measure(Phase.BUILD_AESTHETIC) as record:
            record["reused"] = _reusable(aesthetic)
            if not record["reused"]:
                config = random_aesthetic.full_clip_vision_config() if args.size == "full" else None
                random_aesthetic.build_tiny_aesthetic_predictor(aesthetic, config=config)
                (aesthetic / BUILT).touch()
    return kolors, aesthetic


def write_dataset(root: Path, images: int, resolution: int) -> Path:
    """train/metadata.csv + smooth random images at the training size (DiffSynth's layout)."""
    from PIL import Image

    from kolors_story.data.training_folder import write_metadata

    (root / "train").mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    rows = []
    for i in range(images):
        low = torch.rand(3, 8, 8, generator=gen)  # upsampled: image-like, not pixel noise
        pixels = torch.nn.functional.interpolate(low[None], size=(resolution, resolution), mode="bicubic")[0]
        array = (pixels.clamp(0, 1) * 255).byte().permute(1, 2, 0).numpy()
        Image.fromarray(array).save(root / "train" / f"{i}.png")
        rows.append((f"{i}.png", CAPTIONS[i % len(CAPTIONS)], 1))
    write_metadata(root / "train" / "metadata.csv", rows)
    return root


def validation_settings(args: argparse.Namespace) -> ValidationSettings:
    """The default run's validation (config.yaml's train.validation: its prompts, CFG, pick_best)
    at the check's scale: every `every` steps, or every half of the check's steps when it trains
    fewer than two such periods (then it validates twice and pick_best has two checkpoints to
    choose from); its size and steps capped by the check's resolution and sampling steps (on a GPU
    the default's 512 px and 20 steps; 2 steps at 256 px on a CPU rehearsal)."""
    import yaml

    config = args.config
    if not config.is_file():
        raise FileNotFoundError(f"{config} not found: gpu_check validates as the default run does and reads "
                                "train.validation there; run it in the project's folder or give --config")
    default = ValidationSettings.from_dict(yaml.safe_load(config.read_text(encoding="utf-8"))["train"].get("validation"))
    every = default.every if args.train_steps >= 2 * default.every else max(1, args.train_steps // 2)
    return dataclasses.replace(default, every=every, size=min(default.size, args.resolution),
                               steps=min(default.steps, args.sample_steps))


def train_settings(args: argparse.Namespace) -> TrainSettings:
    return TrainSettings(steps=args.train_steps, resolution=args.resolution, rank=args.rank,
                         precision=args.train_precision, gradient_checkpointing=True, checkpoint_every=0,
                         validation=validation_settings(args))


def train_figures(result, settings: TrainSettings) -> TrainFigures:
    """The train phase's figures from the trainer's result (training.loop.TrainResult)."""
    elapsed = [row["seconds"] for row in result.losses]
    steps = [b - a for a, b in zip(elapsed, elapsed[1:])]  # the first step also loads the UNet
    validation = settings.validation
    return TrainFigures(
        steps=len(result.losses), precision=settings.precision, final_loss=result.losses[-1]["loss"],
        seconds_per_step_median=round(statistics.median(steps), 4) if steps else None,
        seconds_per_step_min=round(min(steps), 4) if steps else None,
        validation={"every": validation.every, "size": validation.size, "steps": validation.steps,
                    "prompts": len(validation.prompts), "pick_best": validation.pick_best},
        validations=[{"step": v["step"], "mean": round(v["mean"], 4)} for v in result.validations],
        picked_step=result.picked_step)


def check_training(args: argparse.Namespace, phases: Phases, kolors: Path, aesthetic: Path, dataset: Path,
                   store: Path) -> tuple[Path, TrainFigures]:
    """The trainer's prepare_batches (caption embeddings from the encode job's file, latents
    encoded and cached), the UNet's load, then training from warm caches with the default run's
    validation. Returns the LoRA file and the training's figures (picked_step: the step the file
    was saved from, pick_best's choice)."""
    from kolors_story.models.kolors_folder import KolorsFolder
    from kolors_story.training.data import assign_sizes, read_metadata
    from kolors_story.training.loop import precision_dtypes, prepare_batches, train_lora
    settings = train_settings(args)
    folder, cache = KolorsFolder(kolors), args.work / "cache"
    dtype, _ = precision_dtypes(settings.precision, phases.device)
    examples = read_metadata(dataset)
    assign_sizes(examples, settings)
    with phases.measure(Phase.TRAIN_ENCODE) as record:
        timesteps = folder.config("scheduler")["num_train_timesteps"]
        prepare_batches(folder, examples, settings, cache, phases.device, dtype, timesteps,
                        validating=bool(settings.validation.every), embeddings=store)
        record["captions"], record["images"] = len(set(e.caption for e in examples)), len(examples)
    phases.release()
    with phases.measure(Phase.TRAIN_UNET_DISK_LOAD):
        unet = folder.load_unet(dtype)
    with phases.measure(Phase.TRAIN_UNET_TO_GPU):
        unet.to(phases.device)
    del unet
    phases.release()
    with phases.measure(Phase.TRAIN) as record:
        result = train_lora(TrainJob(kolors, dataset, args.work / "lora", cache_dir=cache, aesthetic_dir=aesthetic,
                                     embeddings=store), settings)
        figures = train_figures(result, settings)
        record.update(dataclasses.asdict(figures))
    phases.release()
    return result.lora_file, figures


def check_text_encoder(args, phases: Phases, kolors: Path) -> Path:
    """The encode_texts job: ChatGLM from disk straight to the GPU, once, every prompt and negative
    of the scenes encoded, then its embeddings file (scene and anchor jobs never load ChatGLM)."""
    from kolors_story.render.scenes import SamplerSettings, pipeline_dtype
    from kolors_story.models.kolors_folder import KolorsFolder
    from kolors_story.models.prompt_embeddings import PromptEmbeddings, write_embeddings

    dtype = pipeline_dtype(SamplerSettings(precision=args.precision), phases.device)
    embeddings = PromptEmbeddings(KolorsFolder(kolors), dtype, phases.device, args.work / "cache")
    with phases.measure(Phase.CHATGLM_LOAD):
        tokenizer = embeddings.folder.load_tokenizer()
        encoder = embeddings.folder.load_text_encoder(dtype, phases.device)
    from kolors_story.training.validation import validation_texts

    # the run's every text: prompts, captions and the validation's prompts
    texts = list(dict.fromkeys([PROMPT, NEGATIVE, CHARACTER, *CAPTIONS,
                                *validation_texts(validation_settings(args))]))
    with phases.measure(Phase.ENCODE_TEXTS) as record:
        from kolors_story.models.prompt_embeddings import encode_prompts

        for text in texts:  # into the cache the scene and anchor jobs read
            embeds, pooled = encode_prompts(tokenizer, encoder, [text], phases.device)
            embeddings.cache.put(embeddings._key(text), {"embeds": embeds[0].float(), "pooled": pooled[0].float()})
        record["texts"] = len(texts)
    del encoder, embeds, pooled
    phases.release()
    with phases.measure(Phase.WRITE_EMBEDDINGS) as record:  # from the cache just filled: no second load
        store = write_embeddings(embeddings.folder, texts, args.work / "embeddings.safetensors", dtype,
                                 phases.device, args.work / "cache")
        record["mib"] = round(store.stat().st_size / 2**20, 1)
    return store


class DecodeTimer:
    """Seconds spent in the VAE's decode inside pipeline calls (synchronised on CUDA)."""

    def __init__(self, vae, device: torch.device):
        self.seconds, self.calls, self._decode, self.device = 0.0, 0, vae.decode, device
        vae.decode = self

    def __call__(self, *args, **kwargs):
        sync(self.device)
        start = time.perf_counter()
        out = self._decode(*args, **kwargs)
        sync(self.device)
        self.seconds += time.perf_counter() - start
        self.calls += 1
        return out


def scene_pipeline(args, phases: Phases, kolors: Path, lora: Path, settings, store: Path):
    """A scene job's pipeline, each step timed: UNet + VAE from disk, to the GPU, LoRA in."""
    from kolors_story.render.scenes import Scene, load_pipeline, load_style_lora, move_to_device
    from kolors_story.models.kolors_folder import KolorsFolder
    from kolors_story.models.prompt_embeddings import PromptEmbeddings

    scene = Scene("gpu_check", PROMPT, NEGATIVE, seed=0, width=args.resolution, height=args.resolution)
    with phases.measure(Phase.SCENE_EMBEDDINGS):
        from kolors_story.render.scenes import pipeline_dtype

        embeds = PromptEmbeddings(KolorsFolder(kolors), pipeline_dtype(settings, phases.device), phases.device,
                                  store=store).for_pipeline(scene.prompt, scene.negative_prompt)
    with phases.measure(Phase.SCENE_DISK_LOAD):
        pipe = load_pipeline(kolors, settings, phases.device, text_encoder=False)
    with phases.measure(Phase.SCENE_TO_GPU):
        move_to_device(pipe, phases.device, settings)
    with phases.measure(Phase.SCENE_LORA_LOAD):
        load_style_lora(pipe, lora, 1.0)
    return pipe, scene, embeds


def render_figures(seconds: float, timer: DecodeTimer, images: int, settings) -> RenderFigures:
    """The scene render's figures: `seconds` in all, `timer`'s of them in the VAE's decode."""
    return RenderFigures(
        images=images, steps=settings.steps, guidance_scale=settings.guidance_scale, precision=settings.precision,
        vae_decode_seconds=round(timer.seconds, 3), vae_decode_calls=timer.calls,
        denoise_seconds=round(seconds - timer.seconds, 3), seconds_per_image=round(seconds / images, 3),
        seconds_per_step=round((seconds - timer.seconds) / settings.steps, 4))


def check_scene(args: argparse.Namespace, phases: Phases, kolors: Path, lora: Path, aesthetic: Path, store: Path,
                picked_step: int) -> tuple[RenderFigures, dict]:
    """One best-of-N scene as generate_scene renders it, then the LoRA round trip on its pipeline.
    Returns the render's figures and the round trip's record."""
    from kolors_story.render.panel_choice import score_candidates
    from kolors_story.render.scenes import SamplerSettings, candidate_seeds, render, warm_up

    settings = SamplerSettings(sampler=args.sampler, steps=args.sample_steps, guidance_scale=args.cfg,
                               precision=args.precision, candidates=args.candidates, compile=args.compile,
                               compile_backend=args.compile_backend)
    pipe, scene, embeds = scene_pipeline(args, phases, kolors, lora, settings, store)
    with phases.measure(Phase.SCENE_LORA_FUSE):
        pipe.fuse_lora(components=["unet"], adapter_names=["style"])
    if args.compile:
        with phases.measure(Phase.SCENE_COMPILE):
            warm_up(pipe, scene, settings, embeds, candidate_seeds(scene.seed, settings.candidates))
    seeds = candidate_seeds(scene.seed, settings.candidates)
    timer = DecodeTimer(pipe.vae, phases.device)
    with phases.measure(Phase.SCENE_RENDER) as record:
        images = render(pipe, scene, settings, seeds, embeds)
    figures = render_figures(phases.seconds(Phase.SCENE_RENDER), timer, len(images), settings)
    record.update(dataclasses.asdict(figures))
    with phases.measure(Phase.LORA_ROUND_TRIP) as record:  # its fp32 renders hold the UNet in fp32
        trip = round_trip(pipe, scene, settings, embeds, lora, train_settings(args),
                          trained_adapter(args.work / "lora" / "work", picked_step))
        record.update(trip)
    del pipe
    phases.release()
    with phases.measure(Phase.SCORE) as record:
        scores, _ = score_candidates(images, aesthetic, phases.device)
        record["scores"] = [round(s, 4) for s in scores]
    best = max(range(len(images)), key=lambda k: scores[k])
    images[best].save(args.work / "panel.png")
    return figures, trip


@contextlib.contextmanager
def eager_unet(pipe) -> Iterator[None]:
    """The UNet runs eagerly inside: a round-trip render must not trigger another torch.compile
    (the timed warm-up compiles the fused UNet once)."""
    with torch.compiler.set_stance("force_eager"):  # scenes.compile_unet compiles in place
        yield


def _float_image(pipe, scene, settings, embeds) -> torch.Tensor:
    """The scene seed rendered (float pixels in [0, 1]) by the eager UNet, the embeddings in its dtype."""
    with eager_unet(pipe):
        embeds = {name: tensor.to(pipe.unet.dtype) for name, tensor in embeds.items()}
        return pipe(width=scene.width, height=scene.height, num_inference_steps=settings.steps,
                    guidance_scale=settings.guidance_scale, generator=torch.Generator("cpu").manual_seed(scene.seed),
                    output_type="pt", **embeds).images[0].float().cpu()


def trained_adapter(work: Path, step: int) -> dict[str, torch.Tensor]:
    """The adapter's tensors as the trainer held them at `step`, the checkpoint the run's LoRA file
    was saved from (pick_best's choice, else the last step: the trainer checkpoints both); peft
    naming, alpha / rank not folded."""
    from kolors_story.training import checkpoints

    name = checkpoints.checkpoint_dir(Path("."), step).name
    found = sorted(work.glob(f"*/{name}"))
    if len(found) != 1:
        raise FileNotFoundError(f"{len(found)} training checkpoints {work}/*/{name}, not one: the trainer writes one "
                                f"at each validation and at its last step")
    return checkpoints.load_file(checkpoints.lora_of(found[0]))


def round_trip(pipe, scene, settings, embeds, lora: Path, trained: TrainSettings,
               adapter: dict[str, torch.Tensor]) -> dict:
    """lora_round_trip.compare_round_trip on the scene's pipeline, called with the LoRA fused as the
    scene rendered; its renders are the scene seed at the scene's settings."""
    from kolors_story.tools.lora_round_trip import compare_round_trip

    with eager_unet(pipe):
        pipe.unfuse_lora(components=["unet"])
        return compare_round_trip(pipe, lambda: _float_image(pipe, scene, settings, embeds), lora, adapter,
                                  trained.alpha / trained.rank)


def check_consistency(args, phases: Phases, kolors: Path, lora: Path, store: Path) -> None:
    """An anchor as render_anchor records it, then a scene sharing attention with it."""
    from kolors_story.render.scenes import Consistency, RenderInputs, SamplerSettings, Scene, render_anchor, render_scene

    settings = SamplerSettings(sampler=args.sampler, steps=args.sample_steps, guidance_scale=args.cfg,
                               precision=args.precision, candidates=1, compile=args.compile,
                               compile_backend=args.compile_backend)
    consistency = Consistency()
    size = dict(width=args.resolution, height=args.resolution)
    anchor = args.work / "anchors" / "girl.safetensors"
    with phases.measure(Phase.ANCHOR_JOB) as record:
        render_anchor(RenderInputs(kolors, lora, embeddings=store),
                      Scene("girl", CHARACTER, NEGATIVE, seed=7, **size), settings, consistency, anchor,
                      device=phases.device)
        record["anchor_mib"] = round(anchor.stat().st_size / 2**20, 1)
    phases.release()
    with phases.measure(Phase.CONSISTENCY_SCENE_JOB):
        render_scene(RenderInputs(kolors, lora, embeddings=store),
                     Scene("with_girl", PROMPT, NEGATIVE, seed=1, **size), settings,
                     args.work / "consistency_panel.png", device=phases.device, anchors=[anchor],
                     consistency=consistency)
    phases.release()


def header(args: argparse.Namespace, device: torch.device) -> Header:
    import diffusers
    import peft
    import transformers

    return Header(
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        versions={"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
                  "diffusers": diffusers.__version__, "transformers": transformers.__version__,
                  "peft": peft.__version__},
        # paths (and the packaged estimates' Traversable) as strings: the settings are JSON
        settings={k: v if v is None or isinstance(v, (str, int, float, bool)) else str(v)
                  for k, v in vars(args).items()},
    )


def run_checks(args: argparse.Namespace, phases: Phases) -> Measured:
    import shutil

    for stale in ("cache", "lora", "dataset", "anchors"):  # a rerun measures encoding and training again
        shutil.rmtree(args.work / stale, ignore_errors=True)
    phases.stage = Stage.BUILD_MODELS
    kolors, aesthetic = build_models(args, phases)
    phases.stage = Stage.TEXT_ENCODER
    store = check_text_encoder(args, phases, kolors)
    phases.stage = Stage.TRAINING
    dataset = write_dataset(args.work / "dataset", args.images, args.resolution)
    lora, trained = check_training(args, phases, kolors, aesthetic, dataset, store)
    phases.stage = Stage.SCENE
    rendered, trip = check_scene(args, phases, kolors, lora, aesthetic, store, trained.picked_step)
    phases.stage = Stage.CONSISTENCY
    check_consistency(args, phases, kolors, lora, store)
    return Measured(train=trained, render=rendered, round_trip=trip)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU visible (torch.cuda.is_available() is False); use --device cpu --size tiny "
              "for the CPU run at tiny size", file=sys.stderr)
        return 2
    args.work.mkdir(parents=True, exist_ok=True)
    phases = Phases(device, args.out, header(args, device))
    started = time.perf_counter()
    try:
        measured = run_checks(args, phases)
    except Exception as err:
        if phases.failed is None:  # between two timed phases: name the check it was in
            phases.failed = Failure.of(phases.stage, err)
            phases.write()
        print(f"gpu_check: phase {phases.failed.phase} failed; the finished phases and the traceback are "
              f"in {args.out}", file=sys.stderr)
        raise
    report = summary(phases, measured, args.estimates, total_seconds=round(time.perf_counter() - started, 1))
    phases.write(report)
    trip = measured.round_trip
    print(f"gpu_check: {report.seconds_per_training_step} s/training step, {report.seconds_per_image} s/image, "
          f"LoRA round trip {'ok' if trip['ok'] else 'FAILED'}, {report.total_seconds} s in all; wrote {args.out}")
    for problem in trip["problems"]:
        print(f"gpu_check: LoRA round trip: {problem}", file=sys.stderr)
    return 0 if trip["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
