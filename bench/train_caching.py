"""LoRA training steps of the full-size Kolors UNet: cached text/latents vs recomputing them.

    .venv/bin/python bench/train_caching.py [--steps 3] [--resolution 256] [--rank 4]
                                            [--te-layers 2] [--device cpu] [--dtype auto]
    .venv/bin/python bench/train_caching.py --report bench/results/train_caching.json

Two modes, each in its own subprocess so its peak memory is its own:

  cached     the project's trainer: every distinct caption is encoded once by ChatGLM and every
             image once by the VAE before the loop; each model is freed before the next one is
             built; each step runs only the UNet on the cached tensors.
  recompute  DiffSynth-Studio 1.1's way (the challenge baseline): ChatGLM, VAE and UNet all
             resident; every step loads the image, tokenizes + encodes the caption with ChatGLM,
             encodes the image with the VAE, then runs the UNet step.

All models are full size with random weights (the UNet: the real Kolors config, 2.58 B
parameters; the VAE: the SDXL config), except that ChatGLM3-6B is full width (hidden 4096, ffn
13696, 32 heads, MQA 2 groups, vocab 65024) but only --te-layers deep, to fit a 24 GiB machine.
Its per-layer time and per-layer weight size are measured and the results are also given scaled
to the real 28 layers (columns marked "scaled"). Both modes: LoRA rank --rank on to_q/to_k/to_v/
to_out.0 (fp32 LoRA params), AdamW, gradient checkpointing, batch 1; the same seeds, so both
modes print the same losses.

--dtype auto picks bf16 weights + bf16 autocast on CUDA and on CPUs with native bf16 matmul
(AVX512-BF16 or AMX), and fp32 (no autocast) elsewhere: on an AVX2-only CPU a bf16 matmul is
~50-150x slower than fp32 (measured on the AMD EPYC this was written on), which would make one
step take hours. In fp32 every weight term is twice its bf16 size; weights dominate both modes,
so the memory ratios move little (the ~0.5 GiB interpreter baseline does not double).
bench/gpu_memory_estimate.py gives exact bf16 sizes.

Per-step time is the median of --steps measured steps after one warm-up step. Peak memory is the
process's peak RSS (getrusage ru_maxrss) and, per phase, the kernel's VmHWM (reset between
phases); on CUDA also torch.cuda.max_memory_allocated. Results go to
bench/results/train_caching.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

CAPTIONS = [
    "水墨画风格，一位身穿白衣的少女站在竹林中，清晨的薄雾，细腻的笔触",
    "ink wash painting, a young woman in white standing in a bamboo forest, morning mist",
]
RESULTS = C.ROOT / "bench" / "results" / "train_caching.json"


# ---------------------------------------------------------------- child: one mode
class Phases:
    """Wall time and peak RSS per phase (VmHWM reset at each phase start), plus CUDA peaks."""

    def __init__(self, device: torch.device):
        self.device = device
        self.rows: dict[str, dict] = {}
        self.hwm_reset_works = True

    def start(self, name: str) -> None:
        self.name, self.t0 = name, time.perf_counter()
        self.hwm_reset_works &= C.reset_peak_rss()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()

    def end(self, **extra) -> dict:
        row = {
            "seconds": round(time.perf_counter() - self.t0, 3),
            "peak_rss_gib": C.gib(C.peak_rss_bytes()) if self.hwm_reset_works else None,
            "rss_after_gib": C.gib(C.rss_bytes()),
        }
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            row["cuda_max_allocated_gib"] = C.gib(torch.cuda.max_memory_allocated())
            row["cuda_max_reserved_gib"] = C.gib(torch.cuda.max_memory_reserved())
        row.update(extra)
        self.rows[self.name] = row
        print(f"  [{self.name}] " + ", ".join(f"{k} {v}" for k, v in row.items()), flush=True)
        return row


def make_images(folder: Path, n: int) -> list[Path]:
    """Synthetic non-square RGB images on disk (the trainer reads files; so does DiffSynth)."""
    from PIL import Image

    gen = torch.Generator().manual_seed(0)
    paths = []
    for i in range(n):
        h, w = 600 + 40 * i, 800
        smooth = torch.nn.functional.interpolate(torch.rand(1, 3, h // 25, w // 25, generator=gen),
                                                 size=(h, w), mode="bilinear")
        array = (smooth[0].permute(1, 2, 0) * 255).to(torch.uint8).numpy()
        paths.append(folder / f"img{i}.png")
        Image.fromarray(array).save(paths[-1])
    return paths


def load_pixels(path: Path, resolution: int) -> torch.Tensor:
    """Short side to `resolution`, center crop; [1, 3, r, r] in [-1, 1] (DiffSynth's transform)."""
    from PIL import Image

    image = Image.open(path).convert("RGB")
    scale = resolution / min(image.size)
    image = image.resize((max(resolution, round(image.width * scale)),
                          max(resolution, round(image.height * scale))), Image.BICUBIC)
    left, top = (image.width - resolution) // 2, (image.height - resolution) // 2
    image = image.crop((left, top, left + resolution, top + resolution))
    pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    return (pixels.view(resolution, resolution, 3).permute(2, 0, 1).float() / 127.5 - 1.0)[None]


class LayerTimer:
    """Forward time of each ChatGLM block, via pre/post forward hooks."""

    def __init__(self, blocks, device: torch.device):
        self.times: list[float] = []
        self.cpu_times: list[float] = []
        self.device = device
        for block in blocks:
            block.register_forward_pre_hook(self._pre)
            block.register_forward_hook(self._post)

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def _pre(self, module, args):
        self._sync()
        self._t, self._c = time.perf_counter(), time.process_time()

    def _post(self, module, args, out):
        self._sync()
        self.times.append(time.perf_counter() - self._t)
        self.cpu_times.append(time.process_time() - self._c)


@dataclass
class ModeRun:
    """One mode's context: its settings, device, dtype, phase recorder and results dict."""

    args: argparse.Namespace
    device: torch.device
    dtype: torch.dtype
    phases: "Phases"
    out: dict
    images: list[Path]

    @property
    def cached(self) -> bool:
        return self.args.child == "cached"


def run_mode(args) -> dict:
    from diffusers.pipelines.kolors.tokenizer import ChatGLMTokenizer

    from kolors_story.models.random_kolors import kolors_tokenizer_dir

    device = torch.device(args.device)
    run = ModeRun(args, device, {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype], Phases(device),
                  {"mode": args.child, "device": str(device), "torch_threads": torch.get_num_threads()},
                  make_images(Path(args.tmp), len(CAPTIONS)))
    load0 = os.getloadavg()
    tokenizer = ChatGLMTokenizer.from_pretrained(str(kolors_tokenizer_dir()))
    C.release_memory()
    run.out["rss_baseline_gib"] = C.gib(C.rss_bytes())
    encode_text, timer, text_cache = text_side(run, tokenizer)
    vae, latent_cache = vae_side(run)
    unet, params, optimizer, scheduler = unet_side(run)
    train_steps(run, (encode_text, timer, text_cache), (vae, latent_cache), (unet, params, optimizer, scheduler))
    run.out["load_avg_start_end"] = [load0, os.getloadavg()]
    return summarise_mode(run)


def text_side(run: ModeRun, tokenizer):
    """ChatGLM (full width, --te-layers deep); in cached mode every caption encoded once and the
    model freed, as the trainer does. Returns (encode one caption, layer timer, cache)."""
    from kolors_story.models.prompt_embeddings import encode_prompts

    run.phases.start("build_text_encoder")
    text_encoder = C.build_text_encoder(run.args.te_layers, run.dtype).to(run.device)
    blocks = text_encoder.encoder.layers
    layer_bytes, te_bytes = C.param_bytes(blocks[0]), C.param_bytes(text_encoder)
    timer = LayerTimer(blocks, run.device)
    run.phases.end(param_gib=C.gib(te_bytes), layer_param_gib=C.gib(layer_bytes))
    run.out["text_encoder"] = {"layers": run.args.te_layers, "param_bytes": te_bytes, "layer_param_bytes": layer_bytes}

    def encode_text(caption):
        embeds, pooled = encode_prompts(tokenizer, text_encoder, [caption], run.device)
        return embeds.float(), pooled.float()

    text_cache: dict = {}
    if not run.cached:
        return encode_text, timer, text_cache
    run.phases.start("encode_captions")  # the trainer's order: texts, free ChatGLM, latents, free VAE, UNet
    t0 = time.perf_counter()
    for caption in CAPTIONS:  # one ChatGLM pass per distinct caption
        text_cache[caption] = encode_text(caption)
    per_caption = (time.perf_counter() - t0) / len(CAPTIONS)
    run.phases.end(per_caption_s=round(per_caption, 3))
    run.out.update(encode_per_caption_s=per_caption, layer_times_s=list(timer.times),
                   layer_cpu_times_s=list(timer.cpu_times))
    del encode_text, blocks, timer
    text_encoder = None  # the last reference (encode_text's cell): ChatGLM is freed
    C.release_memory()
    run.out["rss_after_text_release_gib"] = C.gib(C.rss_bytes())
    return None, None, text_cache


def vae_side(run: ModeRun):
    """The VAE; in cached mode every image encoded once and the VAE freed. Returns (vae, cache)."""
    from kolors_story.training import encode_latents

    run.phases.start("build_vae")
    vae = C.build_vae(run.dtype).to(run.device)
    run.phases.end(param_gib=C.gib(C.param_bytes(vae)))
    latent_cache: dict = {}
    if not run.cached:
        return vae, latent_cache
    run.phases.start("encode_latents")
    for path in run.images:  # one VAE pass per image
        latent_cache[path] = encode_latents(vae, load_pixels(path, run.args.resolution), run.device)
    run.phases.end()
    del vae
    C.release_memory()
    run.out["rss_after_vae_release_gib"] = C.gib(C.rss_bytes())
    return None, latent_cache


def unet_side(run: ModeRun):
    """The UNet with a rank --rank LoRA, gradient checkpointing, AdamW and the DDPM schedule."""
    from diffusers import DDPMScheduler

    from kolors_story.models.kolors_configs import KOLORS_SCHEDULER
    from kolors_story.training import TrainSettings, add_lora

    run.phases.start("build_unet")
    unet = C.build_unet(run.dtype).to(run.device)
    params = add_lora(unet, TrainSettings(rank=run.args.rank, seed=0))
    unet.enable_gradient_checkpointing()
    unet.train()
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    scheduler = DDPMScheduler.from_config(KOLORS_SCHEDULER)
    run.phases.end(unet_param_gib=C.gib(C.param_bytes(unet, trainable=False)),
                   lora_params=sum(p.numel() for p in params))
    run.out["lora_params"] = sum(p.numel() for p in params)
    return unet, params, optimizer, scheduler


def step_inputs(run: ModeRun, step: int, text, vae_side_) -> tuple[tuple, tuple[float, float, float]]:
    """(latents, embeds, pooled) of one step and the seconds spent on (image, ChatGLM, VAE):
    recomputed in recompute mode, read from the caches in cached mode."""
    from kolors_story.training import encode_latents

    (encode_text, timer, text_cache), (vae, latent_cache) = text, vae_side_
    caption, path = CAPTIONS[step % len(CAPTIONS)], run.images[step % len(CAPTIONS)]
    if run.cached:
        return (latent_cache[path], *text_cache[caption]), (0.0, 0.0, 0.0)
    t = time.perf_counter()
    pixels = load_pixels(path, run.args.resolution)
    t_img = time.perf_counter() - t
    n_layer_times = len(timer.times)
    t = time.perf_counter()
    embeds, pooled = encode_text(caption)
    t_text = time.perf_counter() - t
    if step > 0:
        run.out.setdefault("layer_times_s", []).extend(timer.times[n_layer_times:])
        run.out.setdefault("layer_cpu_times_s", []).extend(timer.cpu_times[n_layer_times:])
    t = time.perf_counter()
    latents = encode_latents(vae, pixels, run.device)
    return (latents, embeds, pooled), (t_img, t_text, time.perf_counter() - t)


def unet_step(run: ModeRun, unet_side_, inputs: tuple, gen: torch.Generator) -> float:
    """One LoRA optimisation step of the UNet on (latents, embeds, pooled); returns the loss."""
    unet, params, optimizer, scheduler = unet_side_
    res, dtype, device = run.args.resolution, run.dtype, run.device
    latents, embeds, pooled = (x.to(device) for x in inputs)
    noise = torch.randn(latents.shape, generator=gen).to(device)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (1,), generator=gen).to(device)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    time_ids = torch.tensor([[res, res, 0, 0, res, res]], dtype=dtype, device=device)
    # fp32: no autocast, everything fp32 (the trainer's fp32 mode)
    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        pred = unet(noisy.to(dtype), timesteps, encoder_hidden_states=embeds.to(dtype),
                    added_cond_kwargs={"text_embeds": pooled.to(dtype), "time_ids": time_ids}).sample
    loss = torch.nn.functional.mse_loss(pred.float(), noise.float())
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return loss.item()


def train_steps(run: ModeRun, text, vae_side_, unet_side_) -> None:
    """--steps measured steps after one warm-up; each step's wall, CPU and per-part seconds."""
    gen = torch.Generator().manual_seed(0)
    steps, cpu_steps, parts = [], [], {"load_image": [], "text_encoder": [], "vae": [], "unet": []}
    run.phases.start("train_steps")
    for step in range(run.args.steps + 1):  # step 0 is the warm-up
        t_step, cpu_step = time.perf_counter(), time.process_time()
        inputs, (t_img, t_text, t_vae) = step_inputs(run, step, text, vae_side_)
        t = time.perf_counter()
        loss = unet_step(run, unet_side_, inputs, gen)
        t_unet = time.perf_counter() - t
        total, cpu_total = time.perf_counter() - t_step, time.process_time() - cpu_step
        print(f"  step {step}{' (warm-up)' if step == 0 else ''}: {total:.2f} s, cpu {cpu_total:.2f} s "
              f"(image {t_img:.2f}, text {t_text:.2f}, vae {t_vae:.2f}, unet {t_unet:.2f}) loss {loss:.4f}", flush=True)
        if step > 0:
            steps.append(total)
            cpu_steps.append(cpu_total)
            for k, v in zip(parts, (t_img, t_text, t_vae, t_unet)):
                parts[k].append(v)
    run.phases.end()
    run.out.update(step_times_s=steps, step_s=statistics.median(steps), step_cpu_times_s=cpu_steps,
                   step_cpu_s=statistics.median(cpu_steps),
                   parts_median_s={k: statistics.median(v) for k, v in parts.items()})


def summarise_mode(run: ModeRun) -> dict:
    out, phases = run.out, run.phases
    out["layer_s"] = statistics.median(out["layer_times_s"])
    out["layer_cpu_s"] = statistics.median(out["layer_cpu_times_s"])
    out["phases"] = phases.rows
    out["peak_rss_hwm_reset_works"] = phases.hwm_reset_works
    out["peak_rss_gib"] = C.gib(C.ru_maxrss_bytes())
    if run.device.type == "cuda":
        out["cuda_max_allocated_gib"] = max(r["cuda_max_allocated_gib"] for r in phases.rows.values())
    return out


# ---------------------------------------------------------------- parent: both modes + table
def scale(result: dict, layers: int, target: int, elem_bytes: int) -> dict:
    """Add a (target - layers)-layer ChatGLM to one mode's measurements.

    Time: each extra block costs the measured median block time wherever ChatGLM runs (every
    step in `recompute`, once per caption in `cached`). Memory: each extra block adds its
    weights wherever ChatGLM is resident, plus its 256-token hidden state that
    output_hidden_states keeps; no-grad activations of one block are freed before the next runs,
    so the transient peak does not grow with depth.
    """
    extra = target - layers
    hidden_state = C.CHATGLM3_6B["seq_length"] * C.CHATGLM3_6B["hidden_size"] * elem_bytes
    add_bytes = extra * (result["text_encoder"]["layer_param_bytes"] + hidden_state)
    add_s = extra * result["layer_s"]
    phases = result["phases"]
    te_phases = ["build_text_encoder", "encode_captions"]  # cached: ChatGLM resident only here
    if result["mode"] == "recompute":
        step_s = result["step_s"] + add_s
        step_cpu_s = result["step_cpu_s"] + extra * result["layer_cpu_s"]
        peak = result["peak_rss_gib"] + add_bytes / C.GIB
        train_peak = (phases["train_steps"]["peak_rss_gib"] or result["peak_rss_gib"]) + add_bytes / C.GIB
        per_caption = None
    else:
        step_s = result["step_s"]
        step_cpu_s = result["step_cpu_s"]
        te_peak = max((phases[p]["peak_rss_gib"] or 0) for p in te_phases if p in phases) + add_bytes / C.GIB
        unet_peak = max(phases[p]["peak_rss_gib"] or 0
                        for p in ("build_vae", "encode_latents", "build_unet", "train_steps"))
        peak = max(te_peak, unet_peak) if phases["train_steps"]["peak_rss_gib"] else None
        train_peak = phases["train_steps"]["peak_rss_gib"]
        per_caption = result["encode_per_caption_s"] + add_s
    return {"step_s": step_s, "step_cpu_s": step_cpu_s, "peak_rss_gib": peak, "train_phase_peak_rss_gib": train_peak,
            "encode_per_caption_s": per_caption, "extra_layers": extra,
            "extra_gib": add_bytes / C.GIB, "extra_s_per_text_encoding": add_s}


def fmt(x, spec=".2f"):
    return "-" if x is None else format(x, spec)


def report(args, results: dict) -> dict:
    """Add the 28-layer scaling to each mode's results, print the table, return the ratios."""
    target = C.CHATGLM3_6B_LAYERS
    elem = 2 if args.dtype == "bf16" else 4
    for r in results.values():
        r["scaled_to_28_layers"] = scale(r, args.te_layers, target, elem)

    print()
    print(f"Full-size Kolors UNet LoRA training, {args.resolution} px "
          f"({args.resolution // 8}x{args.resolution // 8} latents), rank {args.rank}, {args.dtype} weights, "
          f"gradient checkpointing, batch 1, device {args.device}, {torch.get_num_threads()} threads")
    print(f"ChatGLM: full width, {args.te_layers} layers measured; 'scaled' adds "
          f"{target - args.te_layers} more layers at the measured per-layer time and weight size.")
    cols = ["wall s/step", "CPU s/step", "peak RSS GiB", "train-loop RSS GiB"]
    print(f"{'':<10} " + " ".join(f"{c:^19}" for c in cols))
    print(f"{'mode':<10} " + " ".join(f"{'measured':>9} {'scaled':>9}" for _ in cols))

    for mode, r in results.items():
        s = r["scaled_to_28_layers"]
        _row(mode, [r["step_s"], s["step_s"], r["step_cpu_s"], s["step_cpu_s"], r["peak_rss_gib"],
                    s["peak_rss_gib"], r["phases"]["train_steps"]["peak_rss_gib"], s["train_phase_peak_rss_gib"]])
    if {"cached", "recompute"} <= set(results):
        return compare_modes(args, results["cached"], results["recompute"], elem)
    return {}


def _row(name, values):
    print(f"{name:<10} " + " ".join(f"{fmt(v):>9}" for v in values))


def compare_modes(args, c: dict, r: dict, elem: int) -> dict:
    """Cached vs recompute: the ratios (printed as a table row) and the per-part breakdown."""
    cs, rs = c["scaled_to_28_layers"], r["scaled_to_28_layers"]

    def ratio(a, b):
        return None if a is None or b is None else a / b

    summary = {
        "time_ratio_measured": ratio(r["step_s"], c["step_s"]),
        "time_ratio_scaled": ratio(rs["step_s"], cs["step_s"]),
        "cpu_time_ratio_measured": ratio(r["step_cpu_s"], c["step_cpu_s"]),
        "cpu_time_ratio_scaled": ratio(rs["step_cpu_s"], cs["step_cpu_s"]),
        "peak_rss_ratio_measured": ratio(r["peak_rss_gib"], c["peak_rss_gib"]),
        "peak_rss_ratio_scaled": ratio(rs["peak_rss_gib"], cs["peak_rss_gib"]),
        "train_loop_rss_ratio_measured": ratio(r["phases"]["train_steps"]["peak_rss_gib"],
                                               c["phases"]["train_steps"]["peak_rss_gib"]),
        "train_loop_rss_ratio_scaled": ratio(rs["train_phase_peak_rss_gib"], cs["train_phase_peak_rss_gib"]),
    }
    _row("ratio r/c", list(summary.values()))
    # Per-part estimate, insensitive to load changes between the two subprocesses: the cached
    # step plus what recompute adds (image load, ChatGLM, VAE), timed inside the same run.
    p = r["parts_median_s"]
    added = p["load_image"] + p["text_encoder"] + p["vae"]
    summary["time_ratio_parts_measured"] = (c["step_s"] + added) / c["step_s"]
    summary["time_ratio_parts_scaled"] = (c["step_s"] + added + rs["extra_s_per_text_encoding"]) / c["step_s"]
    print(f"per-part time ratio (cached step + recompute's image/ChatGLM/VAE time) / cached step: "
          f"{summary['time_ratio_parts_measured']:.2f} measured, {summary['time_ratio_parts_scaled']:.2f} scaled")
    print("(scaled = ChatGLM deepened to 28 layers from the measured per-layer time and weights; "
          "wall time is noisy when other processes share the CPU, CPU time less so)")
    print()
    p = r["parts_median_s"]
    print(f"recompute step parts (median s): image {p['load_image']:.2f}, ChatGLM {p['text_encoder']:.2f} "
          f"({args.te_layers} layers; {p['text_encoder'] + rs['extra_s_per_text_encoding']:.2f} scaled), "
          f"VAE encode {p['vae']:.2f}, UNet step {p['unet']:.2f}")
    print(f"ChatGLM block: {r['layer_s']:.3f} s wall / {r['layer_cpu_s']:.3f} s CPU (median, recompute run), "
          f"{c['layer_s']:.3f} s / {c['layer_cpu_s']:.3f} s (cached run); "
          f"weights {r['text_encoder']['layer_param_bytes'] / C.GIB:.3f} GiB/layer {args.dtype}")
    print(f"cached one-off text encoding: {c['encode_per_caption_s']:.2f} s/caption measured, "
          f"{cs['encode_per_caption_s']:.2f} s scaled; its phase peak is in 'peak RSS' "
          f"(scaled: the 28-layer ChatGLM alone is {C.CHATGLM3_6B_PARAMS * elem / C.GIB:.1f} GiB "
          f"in {args.dtype})")
    if not (c["peak_rss_hwm_reset_works"] and r["peak_rss_hwm_reset_works"]):
        print("note: /proc/self/clear_refs not writable; per-phase peaks unavailable")
    return summary


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3, help="measured steps per mode (after 1 warm-up)")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--te-layers", type=int, default=2, help="ChatGLM depth actually built (real: 28)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["auto", "bf16", "fp32"], default="auto",
                        help="weights (and autocast) dtype; auto: bf16 on CUDA or on CPUs with native bf16 "
                             "matmul (AVX512-BF16/AMX), else fp32 (bf16 on an AVX2-only CPU is ~50x slower)")
    parser.add_argument("--modes", default="cached,recompute")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--report", type=Path, metavar="JSON",
                        help="only print the table again from a saved results file")
    parser.add_argument("--smoke", action="store_true", help="the test models' tiny widths, 64 px, 1 step, fp32 "
                        "(what make test runs: the code path, not the figures)")
    parser.add_argument("--child", choices=["cached", "recompute"], help=argparse.SUPPRESS)
    parser.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--tmp", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.te_layers < 2:
        parser.error("--te-layers must be >= 2 (prompt embeddings are hidden_states[-2])")
    if args.smoke:
        C.use_tiny_models()
        args.resolution, args.steps, args.dtype = 64, 1, "fp32"

    return args


def run_modes(args: argparse.Namespace) -> tuple[dict, str | None]:
    """Each mode in a subprocess of its own (its memory peak is its own): {mode: its results}."""
    dtype_reason = None
    if args.dtype == "auto":
        args.dtype, dtype_reason = C.pick_dtype(args.device)
        print(f"dtype: {args.dtype} ({dtype_reason})")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in args.modes.split(","):
            print(f"== {mode} (subprocess)", flush=True)
            child_out = Path(tmp) / f"{mode}.json"
            cmd = [sys.executable, __file__, "--child", mode, "--child-out", str(child_out), "--tmp", tmp,
                   "--steps", str(args.steps), "--resolution", str(args.resolution), "--rank", str(args.rank),
                   "--te-layers", str(args.te_layers), "--device", args.device, "--dtype", args.dtype,
                   *(["--smoke"] if args.smoke else [])]
            t0 = time.perf_counter()
            subprocess.run(cmd, check=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
            results[mode] = json.loads(child_out.read_text())
            results[mode]["subprocess_wall_s"] = round(time.perf_counter() - t0, 1)

    return results, dtype_reason


def main() -> None:
    args = parse_args()
    if args.report:
        saved = json.loads(args.report.read_text())
        for key in ("resolution", "rank", "te_layers", "device", "dtype"):
            setattr(args, key, saved["settings"][key])
        saved["summary"] = report(args, saved["results"])
        args.report.write_text(json.dumps(saved, indent=1, ensure_ascii=False))
        return
    if args.child:
        result = run_mode(args)
        args.child_out.write_text(json.dumps(result, indent=1))
        return

    start = time.perf_counter()
    results, dtype_reason = run_modes(args)
    summary = report(args, results)
    payload = {
        "benchmark": "train_caching",
        "settings": {"steps": args.steps, "resolution": args.resolution, "rank": args.rank,
                     "te_layers": args.te_layers, "te_layers_scaled_to": C.CHATGLM3_6B_LAYERS, "device": args.device,
                     "dtype": args.dtype, "dtype_reason": dtype_reason,
                     "gradient_checkpointing": True, "batch_size": 1},
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                    "torch": torch.__version__, "load_avg_at_end": os.getloadavg()},
        "results": results,
        "summary": summary,
        "total_wall_s": round(time.perf_counter() - start, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=1, ensure_ascii=False))
    print(f"\nwrote {args.out} (total {payload['total_wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
