"""Scene-job cost on CPU with the full-size Kolors UNet (random weights, bf16 or fp32), in one process.

    .venv/bin/python bench/scene_job.py [--steps 4] [--size 256] [--candidates 4] [--repeats 2]

Measures, with one pipeline built once and reused (`KolorsPipeline(vae, None, None, unet,
scheduler)`, random prompt embeds of the real shapes, Euler on Kolors' betas, CFG 5):

1. best-of-N: N candidates as one batched pipeline call (N CPU generators, embeds repeated; the
   project's `scenes.render` with batch_candidates=True) vs N single calls
   (batch_candidates=False): seconds per image and the ratio batched / single.
2. character consistency: one scene image with anchor sharing (anchor recorded once with
   `character_sharing.record_anchor`, its time reported on its own; `enable_sharing` strength 1,
   steps_fraction 0.6, max_tokens 1024; `disable` afterwards) vs the same image without.

Peak memory: process peak RSS (ru_maxrss) after each phase, the phase's own peak (VmHWM after a
reset, where the kernel allows it) and the bytes of the recorded anchor features.
Timings are CPU timings; a GPU changes every ratio (batching pays off far more there). On CPUs
without bf16 kernels (AVX2 only) use --dtype fp32: bf16 is about 100x slower there. The README's
numbers: `--dtype fp32 --repeats 1 --out bench/results/scene_job_fp32.json` (about 10 minutes on
2 cores, 12 GiB). Writes bench/results/scene_job.json by default.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
from _common import (  # noqa: E402
    ROOT, default_dtype, gib, peak_rss_bytes, release_memory, reset_peak_rss,
    rss_bytes, ru_maxrss_bytes,
)

from kolors_story.render.character_sharing import disable, enable_sharing, record_anchor  # noqa: E402
from kolors_story.render.scenes import SamplerSettings, Scene, candidate_seeds, render  # noqa: E402
from kolors_story.models.kolors_configs import KOLORS_SCHEDULER  # noqa: E402

OUT = ROOT / "bench" / "results" / "scene_job.json"
DTYPE = torch.bfloat16


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


_PEAK = [0]


def memory(phase: str, mem: dict) -> None:
    # Resetting VmHWM (clear_refs) also lowers ru_maxrss on Linux, so the process peak is the
    # running maximum of the readings taken after each phase.
    _PEAK[0] = max(_PEAK[0], ru_maxrss_bytes(), peak_rss_bytes() or 0)
    mem[phase] = {"process_peak_gib": gib(_PEAK[0]), "ru_maxrss_gib": gib(ru_maxrss_bytes()),
                  "phase_peak_gib": gib(peak_rss_bytes()), "rss_now_gib": gib(rss_bytes())}
    log(f"memory after {phase}: {mem[phase]}")


VAE_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def build(vae_name: str = "fp32", seed: int = 0):
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, KolorsPipeline, UNet2DConditionModel

    torch.manual_seed(seed)
    t_unet, unet = timed(lambda: _in_dtype(lambda: UNet2DConditionModel(**C.SIZES.unet).eval(), DTYPE))
    n_params = sum(p.numel() for p in unet.parameters())
    log(f"UNet built in {t_unet:.1f} s: {n_params:,} parameters, {unet.dtype}")
    t_vae, vae = timed(lambda: _in_dtype(lambda: AutoencoderKL(**C.SIZES.vae).eval(), DTYPE))
    vae_dtype = VAE_DTYPES[vae_name]
    if vae_dtype != DTYPE:
        # bf16 VAE decode is pathologically slow on this CPU (a 64 px decode took 124 s vs 0.9 s in
        # fp32), so the VAE runs in fp32 and the pipeline's bf16 latents are cast on the way in.
        vae = vae.to(vae_dtype)
        vae.post_quant_conv.register_forward_pre_hook(lambda m, a: tuple(x.to(vae_dtype) for x in a))
    log(f"VAE built in {t_vae:.1f} s ({vae_dtype})")
    pipe = KolorsPipeline(vae=vae, text_encoder=None, tokenizer=None, unet=unet,
                          scheduler=EulerDiscreteScheduler(**KOLORS_SCHEDULER),
                          force_zeros_for_empty_prompt=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe, {"unet_init_s": round(t_unet, 2), "unet_params": n_params, "vae_init_s": round(t_vae, 2),
                  "vae_dtype": str(vae_dtype).removeprefix("torch.")}


def _in_dtype(fn, dtype):
    with default_dtype(dtype):
        return fn()


def random_embeds(seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g).to(DTYPE)

    width = C.SIZES.text_width
    return {"prompt_embeds": r(1, 256, width), "pooled_prompt_embeds": r(1, width),
            "negative_prompt_embeds": r(1, 256, width), "negative_pooled_prompt_embeds": r(1, width)}


def median_runs(fn, repeats: int) -> tuple[float, list[float]]:
    runs = [round(timed(fn)[0], 3) for _ in range(repeats)]
    return statistics.median(runs), runs


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--candidates", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=2, help="runs per measurement (median reported)")
    ap.add_argument("--guidance", type=float, default=5.0)
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--vae-dtype", choices=sorted(VAE_DTYPES), default="fp32",
                    help="bf16 decode is pathologically slow on this CPU, hence fp32 (default)")
    ap.add_argument("--only", choices=["best_of_n", "consistency"], help="run one of the two measurements")
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16",
                    help="UNet/embeds dtype; bf16 is very slow on CPUs without AVX512-BF16/AMX (AVX2 only here)")
    ap.add_argument("--smoke", action="store_true", help="the test models' tiny widths, 64 px, 2 steps, best-of-2, "
                    "one repeat, fp32 (what make test runs: the code path, not the figures)")
    args = ap.parse_args(argv)
    if args.smoke:
        C.use_tiny_models()
        args.size, args.steps, args.candidates, args.repeats, args.dtype = 64, 2, 2, 1, "fp32"
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    global DTYPE
    DTYPE = VAE_DTYPES[args.dtype]
    warnings.filterwarnings("ignore", message=".*invalid value encountered in cast.*")

    t_start = time.perf_counter()
    mem: dict = {}
    result: dict = {
        "what": "Kolors scene job on CPU: full-size UNet (random weights), SDXL-size VAE, random embeds",
        "device": "cpu", "dtype": str(DTYPE).removeprefix("torch."), "torch": torch.__version__, "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "settings": {"steps": args.steps, "size": args.size, "candidates": args.candidates,
                     "guidance_scale": args.guidance, "sampler": "euler (Kolors betas)", "repeats": args.repeats},
        "note": f"CPU/{args.dtype} timings on this machine; a GPU differs (batching gains much more there).",
    }
    reset_peak_rss()
    pipe, info = build(args.vae_dtype)
    result["build"] = info
    memory("build", mem)

    embeds = random_embeds()
    scene = Scene(id="bench", prompt="", seed=1234, width=args.size, height=args.size)
    single = SamplerSettings(steps=args.steps, guidance_scale=args.guidance, precision="bf16",
                             candidates=args.candidates, batch_candidates=False)
    batched = SamplerSettings(steps=args.steps, guidance_scale=args.guidance, precision="bf16",
                              candidates=args.candidates, batch_candidates=True)
    seeds = candidate_seeds(scene.seed, args.candidates)

    with torch.inference_mode():
        # ---------------------------------------------------------------- warm-up (1 step)
        t_w, _ = timed(lambda: render(pipe, scene, SamplerSettings(steps=1, guidance_scale=args.guidance),
                                      [scene.seed], embeds))
        log(f"warm-up, 1 step single image: {t_w:.1f} s")
        result["warmup_1step_single_s"] = round(t_w, 2)
        memory("warmup", mem)

        if args.only != "consistency":
            result["best_of_n"] = measure_best_of_n(pipe, scene, single, batched, seeds, embeds, args, mem)
        if args.only != "best_of_n":
            result["consistency"] = measure_consistency(pipe, scene, embeds, args, mem)
    result["memory"] = mem
    result["peak_rss_gib"] = gib(max(_PEAK[0], ru_maxrss_bytes()))
    result["total_runtime_s"] = round(time.perf_counter() - t_start, 1)
    release_memory()

    print_table(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    log(f"wrote {args.out}")
    return result


def measure_best_of_n(pipe, scene, single, batched, seeds, embeds, args, mem: dict) -> dict:
    """N candidates as one batched pipeline call vs N single calls."""
    reset_peak_rss()
    t_single, runs_single = median_runs(lambda: render(pipe, scene, single, seeds, embeds), args.repeats)
    log(f"{args.candidates} single calls: {runs_single} s")
    memory("best_of_n_single_calls", mem)
    reset_peak_rss()
    t_batch, runs_batch = median_runs(lambda: render(pipe, scene, batched, seeds, embeds), args.repeats)
    log(f"1 batched call of {args.candidates}: {runs_batch} s")
    memory("best_of_n_batched", mem)
    n = args.candidates
    return {
        "single_calls_total_s": round(t_single, 3), "single_calls_runs_s": runs_single,
        "batched_total_s": round(t_batch, 3), "batched_runs_s": runs_batch,
        "single_s_per_image": round(t_single / n, 3), "batched_s_per_image": round(t_batch / n, 3),
        "ratio_batched_vs_single": round(t_batch / t_single, 3),
        "ratio_baseline": f"{n} single pipeline calls (batch_candidates=False)",
        "unet_batch_batched": 2 * n, "unet_batch_single": 2,
    }


def measure_consistency(pipe, scene, embeds, args, mem: dict) -> dict:
    """One scene image with anchor sharing vs the same image without; the anchor's own cost."""
    from kolors_story.render.character_sharing import Anchor

    reset_peak_rss()
    t_anchor, (_, features, meta) = timed(lambda: record_anchor(
        pipe, embeds, seed=7, width=args.size, height=args.size, steps=args.steps,
        guidance_scale=args.guidance, max_tokens=1024, steps_fraction=0.6))
    anchor_bytes = sum(t.numel() * t.element_size() for t in features.values())
    log(f"anchor recorded in {t_anchor:.1f} s: {len(features)} tensors, {anchor_bytes / 2**20:.1f} MiB, "
        f"{meta['recorded_steps']} of {meta['steps']} steps, tokens/layer {sorted(set(meta['tokens'].values()))}")
    memory("anchor_record", mem)
    anchor = Anchor(features, meta)
    one = SamplerSettings(steps=args.steps, guidance_scale=args.guidance, candidates=1)
    # Alternate without/with, so slow phases of a shared machine hit both alike.
    plain_runs, shared_runs, state = [], [], None
    for _ in range(args.repeats):
        reset_peak_rss()
        plain_runs.append(round(timed(lambda: render(pipe, scene, one, [scene.seed], embeds))[0], 3))
        memory("scene_without_consistency", mem)
        reset_peak_rss()
        state = enable_sharing(pipe, [anchor], strength=1.0, steps_fraction=0.6)
        try:
            shared_runs.append(round(timed(lambda: render(pipe, scene, one, [scene.seed], embeds))[0], 3))
        finally:
            disable(pipe)
        memory("scene_with_consistency", mem)
    log(f"scene image without consistency: {plain_runs} s; with: {shared_runs} s "
        f"({state.n_active_steps} of {args.steps} steps shared)")
    t_plain, t_shared = statistics.median(plain_runs), statistics.median(shared_runs)
    return {
        "anchor_record_s": round(t_anchor, 3),
        "anchor_features_bytes": anchor_bytes, "anchor_features_mib": round(anchor_bytes / 2**20, 2),
        "anchor_tensors": len(features), "anchor_layers": len(meta["layers"]),
        "recorded_steps": meta["recorded_steps"], "tokens_per_layer": sorted(set(meta["tokens"].values())),
        "shared_steps": state.n_active_steps, "strength": 1.0, "steps_fraction": 0.6, "max_tokens": 1024,
        "without_s_per_image": round(t_plain, 3), "without_runs_s": plain_runs,
        "with_s_per_image": round(t_shared, 3), "with_runs_s": shared_runs,
        "ratio_with_vs_without": round(t_shared / t_plain, 3),
        "ratio_baseline": "the same single scene image without consistency (plain processors)",
        "anchor_record_vs_plain_image": round(t_anchor / t_plain, 3),
    }


def consistency_rows(c: dict) -> list[tuple[str, str, str, str]]:
    return [
        ("consistency", "anchor record (once per character), s", f"{c['anchor_record_s']:.2f}",
         f"x{c['anchor_record_vs_plain_image']:.2f} vs plain image"),
        ("consistency", "scene image without, s/image", f"{c['without_s_per_image']:.2f}", "baseline"),
        ("consistency", "scene image with (strength 1, 0.6), s/image", f"{c['with_s_per_image']:.2f}",
         f"x{c['ratio_with_vs_without']:.2f} vs without"),
        ("memory", "anchor features, MiB", f"{c['anchor_features_mib']:.1f}",
         f"{c['anchor_tensors']} tensors, {c['recorded_steps']} steps"),
    ]


def print_table(r: dict) -> None:
    s, rows = r["settings"], []
    n = s["candidates"]
    if "best_of_n" in r:
        b = r["best_of_n"]
        rows += [
            ("best-of-N", f"{n} single calls, s/image", f"{b['single_s_per_image']:.2f}", "baseline"),
            ("best-of-N", f"1 batched call of {n}, s/image", f"{b['batched_s_per_image']:.2f}",
             f"x{b['ratio_batched_vs_single']:.2f} vs {n} single calls"),
        ]
    if "consistency" in r:
        rows += consistency_rows(r["consistency"])
    for phase, m in r["memory"].items():
        rows.append(("memory", f"peak RSS after {phase}, GiB", f"{m['process_peak_gib']:.2f}",
                     f"this phase's peak {m['phase_peak_gib']}" if m["phase_peak_gib"] is not None else ""))
    w = [max(len(x[i]) for x in rows) for i in range(4)]
    print(f"\nKolors scene job, CPU/{r['dtype']} ({r['threads']} threads), {s['size']} px, {s['steps']} steps, "
          f"CFG {s['guidance_scale']:g}, median of {s['repeats']} (a GPU differs)")
    for x in rows:
        print("  ".join(v.ljust(w[i]) for i, v in enumerate(x)))
    print(f"total {r['total_runtime_s']} s\n")


if __name__ == "__main__":
    main()
