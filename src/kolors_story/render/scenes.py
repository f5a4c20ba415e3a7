"""Rendering story panels with a stock diffusers KolorsPipeline plus the trained style LoRA.

A scene job encodes its prompts with ChatGLM first and drops the text encoder before the UNet and
VAE go to the GPU: the 6B text encoder and the UNet are never on the device together. With
best-of-N, the scene renders N candidates (seeds derived from the scene seed), scores each with
the challenge's aesthetic predictor and keeps the best as the panel: render_scene draws every
candidate (draw_scene), then chooses among them (choose_panel, by panel_choice's rule).
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from PIL import Image

from kolors_story.models import devices
from kolors_story.models.kolors_folder import KolorsFolder
from kolors_story.render.panel_choice import needs_scorer, pick_candidate
from kolors_story.render.samplers import make_scheduler
from kolors_story.render.candidates_file import (
    AnchorRecipe, Candidate, CandidateRecord, ConsistencyRecipe, Runtime, write_record,
)
from kolors_story.models.prompt_embeddings import PromptEmbeddings

log = logging.getLogger(__name__)

ADAPTER = "style"
SEED_STRIDE = 100_003  # candidate k of a scene uses seed + k * SEED_STRIDE (prime: no collisions
# with the neighbouring scenes' seeds, which differ by 1)


@dataclass(frozen=True)
class SamplerSettings:
    """The `generate` keys a scene job's images depend on; defaults match the schema's
    (tests/plan/test_settings_truth.py checks field for field)."""

    sampler: str = "euler"
    steps: int = 50
    guidance_scale: float = 5.0
    lora_scale: float | tuple[float, ...] = 1.0  # several: a sweep, each scale's candidates compete
    precision: str = "fp16"
    candidates: int = 1
    batch_candidates: bool = True
    compile: bool = False  # torch.compile the UNet (first call pays the compile, logged apart)
    compile_backend: str = "inductor"  # torch.compile's backend; aot_eager/eager: cheap, for tests


@dataclass(frozen=True)
class Consistency:
    """Anchor-mode character consistency (kolors_story.render.character_sharing): scene jobs attend to the
    self-attention features recorded while rendering each character's anchor. The
    `generate.consistency` keys but `enabled` (the rules' switch) and `seed` (the anchors' Scene)."""

    strength: float = 1.0
    steps_fraction: float = 0.6
    max_tokens: int = 1024
    selection_weight: float = 0.0  # best-of-N picks by aesthetic + weight * similarity to anchors
    compare: bool = False  # also render the chosen seed with sharing off (scores.json compares)


WITHOUT_CONSISTENCY = "without_consistency.png"  # in the scene's candidates folder


@dataclass(frozen=True)
class Scene:
    """One image to render; config.scene_settings resolves each field (defaults: the schema's
    story.negative_prompt, generate.seed, generate.width and generate.height)."""

    id: str
    prompt: str
    negative_prompt: str = ""
    seed: int = 0
    width: int = 1024
    height: int = 1024
    alternatives: tuple[str, ...] = ()  # other prompts: best-of-N renders each with every seed

    @property
    def prompts(self) -> tuple[str, ...]:
        return (self.prompt, *self.alternatives)


def pipeline_dtype(settings: SamplerSettings, device: torch.device) -> torch.dtype:
    """generate.precision as this device runs it (devices.runtime_dtype: bf16 on a CPU only
    where it is native, fp16 on a CPU as fp32)."""
    return devices.runtime_dtype(settings.precision, device)


def load_pipeline(model: Path | KolorsFolder, settings: SamplerSettings, device: torch.device | None = None,
                  text_encoder: bool = True):
    """The stock pipeline, on the CPU: the caller decides what goes to the device and when.
    text_encoder=False skips ChatGLM and its tokenizer (prompt embeddings come from elsewhere).
    `model`: the Kolors folder's path, or the KolorsFolder the job already checked."""
    device = device or devices.pick_device()
    folder = model if isinstance(model, KolorsFolder) else KolorsFolder(model)
    pipe = folder.load_pipeline(pipeline_dtype(settings, device), text_encoder=text_encoder)
    pipe.scheduler = make_scheduler(settings.sampler, pipe.scheduler.config)
    pipe.set_progress_bar_config(desc="denoise", leave=False)
    # Best-of-N decodes its latents one at a time: 4 at 1024 px in the upcast fp32 VAE hold ~12 GiB
    # at once, one ~3.3 GiB (bench/gpu_memory_estimate.py), and the UNet batch is unchanged.
    pipe.vae.enable_slicing()
    return pipe


def move_to_device(pipe, device: torch.device, settings: SamplerSettings) -> None:
    """The pipeline to its device, with the GPU's fast paths: TF32 for the fp32 matmuls and
    convolutions (the upcast VAE, the scorer), channels_last UNet and VAE. The CPU path stays the
    stock one (bitwise the recipe). torch.compile comes last (compile_unet), once the LoRA and the
    attention processors are in."""
    pipe.to(device)
    if device.type != "cuda":
        return
    devices.enable_tf32(device)
    pipe.unet.to(memory_format=torch.channels_last)
    pipe.vae.to(memory_format=torch.channels_last)


def compile_unet(pipe, settings: SamplerSettings) -> None:
    """torch.compile the UNet in place (generate.compile_backend), on any device. In place, not
    wrapped: pipe.unet stays the ModelMixin that diffusers' set_adapters/fuse_lora look for (a
    wrapped UNet is skipped, and its adapters seem absent). Dynamo traces at the first call, so the
    graph holds whatever LoRA and attention processors are installed by then."""
    pipe.unet.compile(backend=settings.compile_backend)


def load_style_lora(pipe, lora_file: Path, scale: float, fuse: bool = False) -> None:
    """Attach the trained LoRA with stock diffusers loading, at the given strength. fuse=True
    merges it into the UNet's weights (no LoRA branch in every attention projection at every
    step); a job that renders several LoRA scales keeps it unfused and switches by set_adapters,
    so each scale's images are exactly those of a fresh pipeline (an unfuse is not bitwise)."""
    lora_file = Path(lora_file)
    # weight_name is needed even for a local folder when the hub is offline (FACTS.md).
    pipe.load_lora_weights(str(lora_file.parent), weight_name=lora_file.name, adapter_name=ADAPTER)
    pipe.set_adapters([ADAPTER], adapter_weights=[scale])
    if fuse:
        pipe.fuse_lora(components=["unet"], adapter_names=[ADAPTER])


def warm_up(pipe, scene: "Scene", settings: SamplerSettings, embeds: dict | None, seeds: list[int]) -> float:
    """Compile the UNet and run the first denoising step of the first candidate batch exactly as
    render() calls it (the CFG batch of 2N, the sampler's first timestep, which an anchor recorded):
    the compile is paid here, logged apart, and the candidates reuse its graph. Returns seconds."""
    import time

    compile_unet(pipe, settings)

    def stop_after_first_step(pipeline, step: int, timestep, kwargs: dict) -> dict:
        pipeline._interrupt = True  # KolorsPipeline skips the remaining steps, then returns
        return kwargs

    start = time.perf_counter()
    pipe(**call_arguments(scene, settings, candidate_batches(settings, seeds)[0], embeds),
         callback_on_step_end=stop_after_first_step, output_type="latent")
    seconds = time.perf_counter() - start
    log.info("torch.compile of the UNet (%s) + first step at %dx%d: %.1f s", settings.compile_backend, scene.width,
             scene.height, seconds)
    return seconds


def pipeline_and_embeddings_per_prompt(model_dir: Path, settings: SamplerSettings, scene: Scene,
                                       device: torch.device, cache_dir: Path | None = None,
                                       embeddings: Path | None = None) -> tuple[object, list[dict]]:
    """The pipeline without its text encoder, and the embeddings of each prompt of the scene
    (scene.prompts: its prompt, then its alternatives), bitwise those of the pipeline's
    encode_prompt in the encoder's dtype, cast to the pipeline's dtype. From `embeddings` (the
    encode_texts job's file) ChatGLM is never loaded; without it, ChatGLM is loaded, used and
    released first, and only when cache_dir lacks a prompt or the negative prompt: the 6B encoder
    and the UNet never meet."""
    from kolors_story.models.prompt_embeddings import EmbeddingsFile

    folder, dtype = KolorsFolder(model_dir), pipeline_dtype(settings, device)
    source = (EmbeddingsFile(embeddings, folder, dtype, device) if embeddings is not None
              else PromptEmbeddings(folder, dtype, device, cache_dir))
    embeds = [source.for_pipeline(prompt, scene.negative_prompt) for prompt in scene.prompts]
    return load_pipeline(folder, settings, device, text_encoder=False), embeds


def candidate_seeds(seed: int, n: int) -> list[int]:
    return [seed + k * SEED_STRIDE for k in range(n)]


def call_arguments(scene: Scene, settings: SamplerSettings, seeds: list[int], embeds: dict | None) -> dict:
    """The pipeline's arguments for one call that renders `seeds` as one batch (CPU generators:
    a seed gives the same initial noise on any device)."""
    common = dict(width=scene.width, height=scene.height, num_inference_steps=settings.steps,
                  guidance_scale=settings.guidance_scale)
    generator = ([torch.Generator("cpu").manual_seed(s) for s in seeds] if len(seeds) > 1
                 else torch.Generator("cpu").manual_seed(seeds[0]))
    if embeds is None:
        return dict(prompt=scene.prompt, negative_prompt=scene.negative_prompt or None,
                    num_images_per_prompt=len(seeds), generator=generator, **common)
    # Pre-computed embeddings: repeat them to the batch (the pipeline does not for pooled ones).
    batch = {k: v.repeat_interleave(len(seeds), dim=0) for k, v in embeds.items()} if len(seeds) > 1 else embeds
    return dict(generator=generator, **batch, **common)


def render(pipe, scene: Scene, settings: SamplerSettings, seeds: list[int] | None = None,
           embeds: dict | None = None) -> list[Image.Image]:
    """Images for the given seeds (default: the scene seed), as one UNet batch when
    batch_candidates is set, else one call per seed."""
    seeds = seeds or [scene.seed]
    return [image for batch in candidate_batches(settings, seeds)
            for image in pipe(**call_arguments(scene, settings, batch, embeds)).images]


def candidate_batches(settings: SamplerSettings, seeds: list[int]) -> list[list[int]]:
    """The seeds of each pipeline call: all in one batch when batch_candidates is set, else one
    call per seed. Recorded per candidate, since a batch renders other bits than single calls."""
    return [list(seeds)] if settings.batch_candidates and len(seeds) > 1 else [[s] for s in seeds]


@dataclass(frozen=True)
class RenderInputs:
    """What a scene or anchor job reads besides its scene and settings: the Kolors folder, the
    style LoRA, the prompt embeddings (the encode_texts job's file, else a cache ChatGLM fills),
    and the aesthetic predictor that picks best-of-N."""

    model_dir: Path
    lora_file: Path
    aesthetic_dir: Path | None = None
    cache_dir: Path | None = None
    embeddings: Path | None = None


def render_scene(
    inputs: RenderInputs,
    scene: Scene,
    settings: SamplerSettings,
    out_path: Path,
    candidates_dir: Path | None = None,
    device: torch.device | None = None,
    anchors: Sequence[Path] = (),
    consistency: Consistency | None = None,
) -> CandidateRecord:
    """Render a scene's panel (best of `settings.candidates`), write it, and return the record of
    candidates (written to candidates_dir/candidates.json when given). With anchors (one per
    character the scene shows), self-attention is shared with them for consistent characters;
    consistency.compare renders the kept candidate again without, beside the candidates."""
    scored = needs_scorer(settings.candidates, settings.lora_scale, len(scene.prompts))
    if scored and inputs.aesthetic_dir is None:  # refused before any GPU work, not after rendering
        raise ValueError("best-of-N (generate.candidates > 1) and a sweep of generate.lora_scale pick "
                         "the panel with the aesthetic predictor (models.aesthetic): pass aesthetic_dir")
    device = device or devices.pick_device()
    pipe, embeds = pipeline_and_embeddings_per_prompt(inputs.model_dir, settings, scene, device, inputs.cache_dir,
                                                      inputs.embeddings)
    consistency = (consistency or Consistency()) if anchors else None
    drawing = draw_scene(pipe, inputs.lora_file, scene, settings, device, embeds, anchors, consistency)
    compare = bool(drawing.sharing and consistency.compare and candidates_dir is not None)
    if not compare:
        del pipe  # frees the UNet before the predictor loads (sharing's hooks hold the pipeline weakly)
        if settings.compile:
            gc.collect()  # Module.compile's compiled call refers back to the UNet: a cycle
    record = choose_panel(drawing, scene, settings, device, inputs.aesthetic_dir if scored else None, anchors,
                          Path(out_path), candidates_dir)
    if candidates_dir is not None:
        if compare:
            record = render_without_sharing(pipe, scene, settings, embeds, record, Path(candidates_dir))
        write_record(record, Path(candidates_dir))
    return record


@dataclass(frozen=True)
class Drawing:
    """A scene's candidates as drawn, in rendering order (images[k] is candidates[k]'s), before
    anything scores them."""

    images: tuple[Image.Image, ...]
    candidates: tuple[Candidate, ...]  # how each was drawn; scores and files still None
    lora_fused: bool  # the one LoRA scale is merged into the UNet; several: adapters switched
    sharing: ConsistencyRecipe | None  # attention shared with the anchors, as the record says it


def draw_scene(pipe, lora_file: Path, scene: Scene, settings: SamplerSettings, device: torch.device,
               embeds: list[dict], anchors: Sequence[Path], consistency: Consistency | None) -> Drawing:
    """Every candidate of the scene on `pipe` (its text encoder already dropped; `embeds`: one per
    prompt of scene.prompts): the pipeline to the device, the style LoRA in, attention shared with
    the anchors, the UNet compiled last, then the candidates drawn."""
    move_to_device(pipe, device, settings)
    scales = lora_scales(settings)
    # Several scales switch adapters between candidates: an unfuse is not bitwise.
    fused = len(scales) == 1
    load_style_lora(pipe, lora_file, scales[0], fuse=fused)
    sharing = share_anchors(pipe, scene, anchors, consistency) if anchors else None
    if settings.compile:  # the last change to the UNet: LoRA and processors are in
        warm_up(pipe, scene, settings, embeds[0], candidate_seeds(scene.seed, settings.candidates))
    images, candidates = draw_candidates(pipe, scene, settings, scales, embeds, fused)
    return Drawing(tuple(images), tuple(candidates), fused, sharing)


def draw_candidates(pipe, scene: Scene, settings: SamplerSettings, scales: list[float], embeds: list[dict],
                    fused: bool = False) -> tuple[list[Image.Image], list[Candidate]]:
    """Every (LoRA scale, prompt, seed) candidate, in that nesting (`embeds`: one per prompt of
    scene.prompts), and per image how it was drawn: its seed, scale, the seeds of the pipeline call
    that drew it (what renders it again bit for bit) and its prompt when it is an alternative.
    fused: the one scale is already merged into the UNet."""
    seeds = candidate_seeds(scene.seed, settings.candidates)
    log.info("scene %s: %d candidate(s) from seed %d, %dx%d, %s %d steps, CFG %.1f, LoRA scale(s) %s, %d prompt(s)",
             scene.id, len(seeds) * len(scales) * len(embeds), scene.seed, scene.width, scene.height,
             settings.sampler, settings.steps, settings.guidance_scale, scales, len(embeds))
    images, drawn = [], []
    for scale in scales:
        if not fused:
            pipe.set_adapters([ADAPTER], adapter_weights=[scale])
        for k, prompt_embeds in enumerate(embeds):
            alternative = scene.prompts[k] if k else None  # None: the scene's own prompt
            for batch in candidate_batches(settings, seeds):
                images += render(pipe, scene, settings, batch, prompt_embeds)
                drawn += [Candidate(seed, scale, tuple(batch), prompt=alternative) for seed in batch]
    return images, drawn


def share_anchors(pipe, scene: Scene, anchors: Sequence[Path], consistency: Consistency) -> ConsistencyRecipe:
    """Turn on attention sharing with the scene's anchors; what the record says about it."""
    from kolors_story.render.character_sharing import enable_sharing, load_anchor

    loaded = [load_anchor(Path(p)) for p in anchors]
    recipes = tuple(AnchorRecipe.from_meta(a.meta, Path(p)) for a, p in zip(loaded, anchors))
    enable_sharing(pipe, loaded, consistency.strength, consistency.steps_fraction)
    log.info("scene %s: sharing attention with %d anchor(s), strength %.2f", scene.id,
             len(anchors), consistency.strength)
    return ConsistencyRecipe(strength=consistency.strength, steps_fraction=consistency.steps_fraction,
                             selection_weight=consistency.selection_weight, anchors=recipes)


def choose_panel(drawing: Drawing, scene: Scene, settings: SamplerSettings, device: torch.device,
                 aesthetic_dir: Path | None, anchors: Sequence[Path], out_path: Path,
                 candidates_dir: Path | None) -> CandidateRecord:
    """The panel picked among the drawn candidates (panel_choice.pick_candidate; aesthetic_dir
    None: the only one), written to out_path, and the scene's record; each candidate's image is
    saved under candidates_dir when given."""
    sharing = drawing.sharing
    weight = sharing.selection_weight if sharing else 0.0
    chosen, candidates = pick_candidate(drawing.images, drawing.candidates, aesthetic_dir, device,
                                        anchors if weight else [], weight, candidates_dir)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    drawing.images[chosen].save(out_path)
    record = scene_record(scene, settings, device, drawing.lora_fused, candidates, chosen, sharing)
    if len(candidates) > 1:
        log.info("scene %s: scores %s -> candidate %d (seed %d, LoRA scale %.2f, prompt %d of %d)", scene.id,
                 ", ".join(f"{s:.3f}" for s in record.scores), chosen, record.seed, record.lora_scale,
                 scene.prompts.index(record.recipe().prompt) + 1, len(scene.prompts))
    return record


def scene_record(scene: Scene, settings: SamplerSettings, device: torch.device, fused: bool,
                 candidates: tuple[Candidate, ...], chosen: int, sharing: ConsistencyRecipe | None) -> CandidateRecord:
    """What candidates.json keeps of a rendered scene: its recipe, every candidate, the choice."""
    return CandidateRecord(
        scene=scene.id, prompt=scene.prompt, negative_prompt=scene.negative_prompt or "", width=scene.width,
        height=scene.height, sampler=settings.sampler, steps=settings.steps,
        guidance_scale=settings.guidance_scale, precision=settings.precision,
        dtype=str(pipeline_dtype(settings, device)).removeprefix("torch."), device=device.type, lora_fused=fused,
        candidates=candidates, chosen=chosen, consistency=sharing, runtime=Runtime.current(device))


def render_without_sharing(pipe, scene: Scene, settings: SamplerSettings, embeds: list[dict],
                           record: CandidateRecord, out_dir: Path) -> CandidateRecord:
    """The kept candidate (its seed, LoRA scale and prompt) rendered again with attention sharing
    off: that panel as it would look without the option, everything else equal (the with/without
    comparison). Returns the record naming that file."""
    from kolors_story.render.character_sharing import disable

    disable(pipe)
    if not record.lora_fused:  # fused: merged at the panel's scale already
        pipe.set_adapters([ADAPTER], adapter_weights=[record.lora_scale])
    kept_prompt = scene.prompts.index(record.recipe().prompt)
    render(pipe, scene, settings, [record.seed], embeds[kept_prompt])[0].save(out_dir / WITHOUT_CONSISTENCY)
    log.info("scene %s: rendered seed %d without consistency for the comparison", scene.id, record.seed)
    return replace(record, without_consistency=WITHOUT_CONSISTENCY)


def render_anchor(inputs: RenderInputs, scene: Scene, settings: SamplerSettings, consistency: Consistency,
                  out_path: Path, device: torch.device | None = None) -> Path:
    """Render a character's anchor with the scenes' sampler and LoRA, recording the
    self-attention features the scene jobs will share (out_path: .safetensors, image beside)."""
    from kolors_story.render.character_sharing import record_anchor, save_anchor

    device = device or devices.pick_device()
    pipe, [embeds] = pipeline_and_embeddings_per_prompt(inputs.model_dir, settings, scene, device, inputs.cache_dir,
                                                        inputs.embeddings)
    move_to_device(pipe, device, settings)
    scale = lora_scales(settings)[0]
    load_style_lora(pipe, inputs.lora_file, scale, fuse=True)  # one scale: merged, as a one-scale scene job
    if settings.compile:  # traced at the first step, with record_anchor's processors in
        compile_unet(pipe, settings)
    image, features, meta = record_anchor(
        pipe, embeds, scene.seed, scene.width, scene.height, settings.steps, settings.guidance_scale,
        max_tokens=consistency.max_tokens, steps_fraction=consistency.steps_fraction)
    log.info("anchor %s: %d features over %s steps", scene.id, len(features), meta.get("recorded_steps"))
    # The whole recipe (candidates_file.AnchorRecipe): scene records carry it into prompts.json.
    recipe = {"id": scene.id, "prompt": scene.prompt, "negative_prompt": scene.negative_prompt or "",
              "sampler": settings.sampler, "lora_scale": scale, "steps_fraction": consistency.steps_fraction,
              "runtime": asdict(Runtime.current(device))}
    return save_anchor(Path(out_path), features, {**meta, **recipe}, image)


def lora_scales(settings: SamplerSettings) -> list[float]:
    scale = settings.lora_scale
    return [float(x) for x in scale] if isinstance(scale, (list, tuple)) else [float(scale)]


__all__ = ["SamplerSettings", "Scene", "candidate_seeds", "compile_unet", "load_pipeline", "load_style_lora",
           "move_to_device", "render", "render_scene", "warm_up"]
