"""A rehearsal of the real run: `snakemake` itself, the default run's every rule, on full-size
random Kolors weights in the real layout, at a small resolution, on this machine's CPU.

    python bench/rehearsal.py            (make rehearsal; under 45 min on 2 cores, 24 GB; not in CI)
    python bench/rehearsal.py --smoke    (its tiny twin: the same DAG on the tiny models, in make test)

It builds (once, reused from --work) the random full-size Kolors folder with gpu_check's builder
and a full-size aesthetic predictor, writes a 4-image style folder and a config that merges over
config.yaml (a 2-scene story with one character anchor and consistency on, best-of-2, training
with validation, a few steps at 256 px), and runs the workflow's DAG with `--resources gpu=1`.
Every job's wall time and peak memory are then tabled beside the weights that job must hold:
Snakemake's benchmark `max_rss` (polled every 30 s), the job's resident high-water mark and its
sampled peak of anonymous memory (the rule log's "peak RSS" and "peak anonymous memory" lines,
kolors_story.host.rule_runner). A job whose anonymous peak exceeds its weights + 3 GiB fails the
rehearsal; the resident mark also counts the memory-mapped weight files a model is read from
(clean pages the kernel drops under pressure), so loading fp16 files into fp32 peaks at both. Precisions (printed, and in the table's title): bf16 everywhere where the
CPU computes it natively (kolors_story.models.devices); elsewhere fp32, except ChatGLM in bf16 when
its 25 GB in fp32 do not fit RAM + swap (models.text_encoder_precision: its nn.Linear layers run
bf16 weights computed in fp32 layer by layer, kolors_story.models.devices.compute_in_fp32; fp32
ChatGLM on a 24 GB machine with swap encoded no text in 12 minutes). Every model job gets --cores
threads (--set-threads): a host without a GPU runs them one at a time. The full size must finish in
under 45 minutes on a 2-core, 24 GB machine: slower is a failure too.

Writes --out (JSON) and the same table as Markdown beside it.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "src") not in sys.path:  # runnable without `pip install -e .`
    sys.path.insert(0, str(ROOT / "src"))

from kolors_story.host.rule_runner import PEAK_ANONYMOUS, PEAK_RSS  # noqa: E402  (the job logs' lines)

GIB = 2**30
TIME_GOAL_S = 45 * 60  # the full-size rehearsal's goal on a 2-core, 24 GB machine (issue 26)
CPU_MODEL_RULES = ("encode_texts", "render_anchor", "generate_scene", "score_images")
HEADROOM_GIB = 3.0  # what a job may hold beyond its weights (activations, allocator, imports)
WORKFLOW_PARTS = ["Snakefile", "config.yaml", "rules", "scripts", "schemas", "profiles", "envs", "report"]
BUILT = ".rehearsal_complete"  # written last in a built model folder: later runs reuse it
RUN = "rehearsal"
# Which models each job holds at once, and in which precision key ("train", "generate",
# "text_encoder" or fp32): its weights are what the verdict allows beyond the headroom.
JOB_WEIGHTS: dict[str, tuple[tuple[str, str], ...]] = {
    "encode_texts": (("text_encoder", "text_encoder"),),
    "train_lora": (("unet", "train"), ("vae", "fp32"), ("aesthetic", "fp32")),  # latents + validation
    "render_anchor": (("unet", "generate"), ("vae", "generate")),
    "generate_scene": (("unet", "generate"), ("vae", "generate"), ("aesthetic", "fp32")),  # best-of-N
    "score_images": (("aesthetic", "fp32"),),
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="the tiny twin: tiny models, 64 px, a minute")
    parser.add_argument("--work", type=Path, default=Path("/tmp/kolors-rehearsal"),
                        help="models (built once, reused), the style folder and the workflow's copy")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "reference" / "rehearsal.json")
    parser.add_argument("--cores", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                        help="auto: bf16 where the CPU computes it natively, else fp32 (ChatGLM bf16 if it must)")
    return parser.parse_args(argv)


Precisions = dict[str, str]  # "text_encoder", "train", "generate" -> fp32 | bf16


def pick_precisions(asked: str, params: dict[str, int]) -> tuple[Precisions, str]:
    """Each model's precision, and why (a bf16 on a CPU without it is forced through KOLORS_CPU_BF16)."""
    from kolors_story.models.devices import cpu_has_native_bf16

    if asked != "auto":
        return dict.fromkeys(("text_encoder", "train", "generate"), asked), "asked for"
    if cpu_has_native_bf16():
        return dict.fromkeys(("text_encoder", "train", "generate"), "bf16"), "this CPU computes bf16 natively"
    chosen = dict.fromkeys(("text_encoder", "train", "generate"), "fp32")
    if weights_gib("encode_texts", params, chosen) + 1.0 > memory_gib(swap=False):  # swap would thrash
        chosen["text_encoder"] = "bf16"
        return chosen, "no native bf16: fp32, but ChatGLM in bf16 (its fp32 weights do not fit in RAM)"
    return chosen, "this CPU has no native bf16"


def build_models(models: Path, smoke: bool) -> tuple[Path, Path]:
    """The Kolors folder (gpu_check's builder: the real layout and shard count) and the predictor."""
    from kolors_story.models import random_aesthetic, random_kolors

    kolors, aesthetic = models / "kolors", models / "aesthetic"
    if not (kolors / BUILT).is_file():
        shutil.rmtree(kolors, ignore_errors=True)
        started = time.perf_counter()
        (random_kolors.build_tiny_kolors if smoke else random_kolors.build_full_kolors)(kolors)
        print(f"rehearsal: built the Kolors folder in {time.perf_counter() - started:.0f} s", flush=True)
        (kolors / BUILT).touch()
    if not (aesthetic / BUILT).is_file():
        config = None if smoke else random_aesthetic.full_clip_vision_config()
        random_aesthetic.build_tiny_aesthetic_predictor(aesthetic, config=config)
        (aesthetic / BUILT).touch()
    return kolors, aesthetic


def write_style_folder(folder: Path, size: int) -> Path:
    """4 smooth random images with .txt captions: a local style dataset as users give one."""
    import numpy as np
    from PIL import Image

    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(4):
        low = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
        Image.fromarray(low).resize((size, size), Image.BICUBIC).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(("水墨画，山水", "水墨画，少女")[i % 2], encoding="utf-8")
    return folder


def rehearsal_config(kolors: Path, aesthetic: Path, style: Path, precision: Precisions, size: int) -> dict:
    """Merged over config.yaml: every rule of the default run, a few steps, at `size` px."""
    sampling = {"steps": 2, "width": size, "height": size}
    return {
        "run": RUN,
        "dataset": {"source": "local", "path": str(style), "default_caption": "水墨画"},
        "filter": {"ops": [{"image_shape_filter": {"min_width": size, "min_height": size}},
                           {"image_deduplicator": {"method": "phash"}}]},
        "models": {"kolors": str(kolors), "aesthetic": str(aesthetic), "text_encoder_precision": precision["text_encoder"]},
        "train": {"steps": 2, "resolution": size, "precision": precision["train"], "checkpoint_every": 1,
                  "validation": {"every": 2, "size": size, "steps": 2,
                                 "prompts": [{"prompt": "水墨画，一个少女站在山顶", "seed": 0}]}},
        "generate": {**sampling, "precision": precision["generate"], "candidates": 2,
                     "consistency": {"enabled": True, "compare": False}},
        "story": {"title": "山中少女", "style": "水墨画", "characters": {"girl": "一个穿红色汉服的少女"},
                  "scenes": [{"id": "s1", "characters": ["girl"], "action": "站在山顶", "setting": "云海"},
                             {"id": "s2", "characters": ["girl"], "action": "坐在小桥边", "setting": "流水"}]},
    }


def run_workflow(flow: Path, config: dict, cores: int, env: dict) -> float:
    """A fresh copy of the workflow at `flow`, then snakemake on the config; its wall seconds."""
    import yaml

    shutil.rmtree(flow, ignore_errors=True)
    flow.mkdir(parents=True)
    for name in WORKFLOW_PARTS:
        (shutil.copytree if (ROOT / name).is_dir() else shutil.copy2)(ROOT / name, flow / name)
    (flow / "rehearsal.yaml").write_text(yaml.safe_dump(config, allow_unicode=True, sort_keys=False), "utf-8")
    # Every model job gets the cores, as a host without a GPU should give them: --resources gpu=1
    # runs them one at a time anyway (training already takes every core, rules/train.smk).
    threads = [f"{rule}={cores}" for rule in CPU_MODEL_RULES]
    command = [str(Path(sys.executable).with_name("snakemake")), "--cores", str(cores), "--resources", "gpu=1",
               "--set-threads", *threads, "--configfile", "rehearsal.yaml"]
    print("rehearsal:", " ".join(command), f"(in {flow})", flush=True)
    started = time.perf_counter()
    with open(flow / "snakemake.log", "w", encoding="utf-8") as out:
        proc = subprocess.run(command, cwd=flow, env=env, stdout=out, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - started
    if proc.returncode:
        tail = (flow / "snakemake.log").read_text(encoding="utf-8", errors="replace")[-4000:]
        raise SystemExit(f"rehearsal: snakemake failed ({proc.returncode}) after {seconds:.0f} s:\n{tail}")
    return seconds


@dataclass
class JobRow:
    job: str  # rule/wildcards, from the benchmark file's path
    seconds: float
    snakemake_max_rss_gib: float | None  # Snakemake's polled figure (NA for very short jobs)
    peak_rss_gib: float | None  # the job's resident high-water mark, mapped files included (its log)
    peak_anonymous_gib: float | None  # what the job held itself, sampled (its log): the verdict's figure
    weights_gib: float
    limit_gib: float
    ok: bool


def model_bytes(kolors: Path, aesthetic: Path) -> dict[str, int]:
    """Parameters x 1 byte of each model part (so bytes in a dtype = this x its element size)."""
    import torch
    from safetensors import safe_open

    counts: dict[str, int] = {}
    for part in ("unet", "vae", "text_encoder"):
        total = 0
        for file in sorted((kolors / part).glob("*.safetensors")):
            with safe_open(str(file), framework="pt") as f:
                total += sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
        counts[part] = total
    state = torch.load(aesthetic / "pytorch_model.bin", map_location="cpu", mmap=True, weights_only=True)
    counts["aesthetic"] = sum(t.numel() for t in state.values())
    return counts


def weights_gib(rule: str, params: dict[str, int], precision: Precisions) -> float:
    element = {"bf16": 2, "fp32": 4}
    held = JOB_WEIGHTS.get(rule, ())
    return sum(params[part] * (4 if key == "fp32" else element[precision[key]]) for part, key in held) / GIB


def read_jobs(results: Path, params: dict[str, int], precision: Precisions) -> list[JobRow]:
    """A row per benchmark file (every job that ran), with the peak from the job's log beside it."""
    rows = []
    for bench in sorted(results.rglob("benchmarks/**/*.tsv")):
        rel = bench.relative_to(results)
        parts = rel.parts[rel.parts.index("benchmarks") + 1:]
        rule = parts[0].removesuffix(".tsv")
        with open(bench, encoding="utf-8") as f:
            record = next(csv.DictReader(f, delimiter="\t"))
        log_file = results / Path(*rel.parts[:rel.parts.index("benchmarks")]) / "logs" / Path(*parts).with_suffix(".log")
        weights = weights_gib(rule, params, precision)
        polled = None if record["max_rss"] in ("NA", "") else float(record["max_rss"]) / 1024
        peak, anonymous = peak_from_log(log_file, PEAK_RSS), peak_from_log(log_file, PEAK_ANONYMOUS)
        held = anonymous if anonymous is not None else max(v for v in (polled, peak, 0.0) if v is not None)
        rows.append(JobRow("/".join(parts).removesuffix(".tsv"), round(float(record["s"]), 1),
                           polled and round(polled, 2), peak and round(peak, 2), anonymous and round(anonymous, 2),
                           round(weights, 4), round(weights + HEADROOM_GIB, 2), held <= weights + HEADROOM_GIB))
    return rows


def peak_from_log(log_file: Path, marker: str) -> float | None:
    """The largest figure the job logged on its `marker` lines (itself or its largest child), GiB."""
    if not log_file.is_file():
        return None
    figures = []
    for line in log_file.read_text(encoding="utf-8", errors="replace").splitlines():
        if marker in line:
            words = line.split(marker, 1)[1].replace("(", " ").replace(")", " ").split()
            figures += [float(w) for w in words if w.replace(".", "", 1).isdigit()]
    return max(figures) if figures else None


def markdown(report: dict) -> str:
    precision = ", ".join(f"{k} {v}" for k, v in report["precision"].items())
    head = (f"# Rehearsal ({report['size']} size; {precision}: {report['precision_reason']})\n\n"
            f"{report['cpu']}, {report['cores']} cores; snakemake {report['workflow_seconds']:.0f} s"
            + (f" (goal: under {report['time_goal_s']} s)" if report.get("time_goal_s") else "") + ", "
            f"models {'reused' if report['models_reused'] else 'built'}.\n\n"
            "| job | s | max_rss (Snakemake) GiB | peak RSS (job) GiB | peak anonymous GiB | weights GiB | limit GiB "
            "| ok |\n|---|---:|---:|---:|---:|---:|---:|---|\n")
    rows = "".join(f"| {r['job']} | {r['seconds']} | {r['snakemake_max_rss_gib']} | {r['peak_rss_gib']} | "
                   f"{r.get('peak_anonymous_gib')} | "
                   f"{r['weights_gib']} | {r['limit_gib']} | {'yes' if r['ok'] else '**NO**'} |\n"
                   for r in report["jobs"])
    return head + rows


def memory_gib(swap: bool = True) -> float:
    """RAM (+ swap)."""
    meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    kib = int(meminfo["MemTotal"].split()[0]) + (int(meminfo["SwapTotal"].split()[0]) if swap else 0)
    return kib / 2**20


def check_memory(params: dict[str, int], precision: Precisions) -> None:
    """Refuse before the DAG starts where the largest job's weights cannot fit in RAM + swap."""
    total = memory_gib()
    largest = max(JOB_WEIGHTS, key=lambda rule: weights_gib(rule, params, precision))
    need = weights_gib(largest, params, precision) + 1.0
    if need > total:
        raise SystemExit(f"rehearsal: {largest} holds {need - 1:.1f} GiB of weights ({precision}), more than this "
                         f"machine's RAM + swap ({total:.1f} GiB). Add swap (as root: fallocate -l 16G /swapfile; "
                         "chmod 600 /swapfile; mkswap /swapfile; swapon /swapfile) or run on a CPU with native bf16.")


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text(encoding="ascii", errors="replace").splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    size = 64 if args.smoke else 256
    models = args.work / ("models-tiny" if args.smoke else "models-full")
    reused = (models / "kolors" / BUILT).is_file()
    kolors, aesthetic = build_models(models, args.smoke)
    params = model_bytes(kolors, aesthetic)
    precision, reason = pick_precisions(args.precision, params)
    print(f"rehearsal: {'tiny' if args.smoke else 'full'} size, {precision} ({reason}), {size} px", flush=True)
    check_memory(params, precision)
    style = write_style_folder(args.work / "style", size)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if "bf16" in precision.values():
        env["KOLORS_CPU_BF16"] = "1"  # honored even without native bf16 where chosen or asked for
    flow = args.work / "flow"
    seconds = run_workflow(flow, rehearsal_config(kolors, aesthetic, style, precision, size), args.cores, env)
    jobs = read_jobs(flow / "results", params, precision)
    report = {"size": "tiny" if args.smoke else "full", "precision": precision, "precision_reason": reason,
              "cpu": cpu_name(), "cores": args.cores, "resolution": size, "models_reused": reused,
              "workflow_seconds": round(seconds, 1), "headroom_gib": HEADROOM_GIB,
              "time_goal_s": None if args.smoke else TIME_GOAL_S, "jobs": [asdict(r) for r in jobs]}
    late = report["time_goal_s"] is not None and seconds > report["time_goal_s"]
    report["ok"] = all(r.ok for r in jobs) and not late
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    args.out.with_suffix(".md").write_text(markdown(report), encoding="utf-8")
    print(markdown(report))
    failed = [r.job for r in jobs if not r.ok]
    faults = ([", ".join(failed) + " held more than weights + 3 GiB"] if failed else []) + (
        [f"{seconds / 60:.0f} min, over the {TIME_GOAL_S // 60} min goal"] if late else [])
    print(f"rehearsal: {'FAILED: ' + '; '.join(faults) if faults else 'ok'}; "
          f"wrote {args.out} and {args.out.with_suffix('.md')}")
    return 1 if faults else 0


if __name__ == "__main__":
    sys.exit(main())
