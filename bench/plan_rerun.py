"""What tracking a local dataset by content costs when Snakemake plans a rerun.

    python bench/plan_rerun.py            (10,000 images; goal: a rerun planned in under 5 s)
    python bench/plan_rerun.py --smoke    (200 images, in make test; the figures then mean little)

It writes a style folder of small JPEGs (half with a caption sidecar) and a copy of the workflow,
runs the demo config with `dataset.path` pointing at the folder up to download_dataset (the job
that records what it read), then times `snakemake -n` of the whole DAG (median of --repeats):
- baseline: the demo's own dataset (a folder a rule builds: no content digest; the planning floor),
- warm: the user's folder, every file's hash already cached by its identity (a rerun),
- cold: the same with the content cache deleted (the first plan after a copy: every file hashed),
- edited: one caption rewritten in place with its time kept (that file hashed again, named in the log).
Ratios are against the baseline measured in the same run. Writes --out (JSON) and a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
GOAL_S = 5.0  # issue 27: planning a rerun over a 10,000-image folder on a 2-core machine
WORKFLOW_PARTS = ["Snakefile", "config.yaml", "rules", "scripts", "schemas", "demo", "profiles", "envs", "report"]
sys.path.insert(0, str(ROOT / "src"))  # runnable without `pip install -e .`
from kolors_story.plan.content_digest import CACHE_FOLDER as CONTENT_CACHE  # noqa: E402  (what the rules use)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="200 images: the code path, in seconds")
    parser.add_argument("--images", type=int, default=None, help="default 10000 (--smoke: 200)")
    parser.add_argument("--repeats", type=int, default=None, help="default 3 (--smoke: 1)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/kolors-plan-rerun"))
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "reference" / "plan_rerun.json")
    return parser.parse_args(argv)


def write_style(folder: Path, n: int) -> None:
    """n distinct 64x64 JPEGs (~2 KB), every other one with a caption sidecar."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        pixels = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        Image.fromarray(pixels).resize((64, 64), Image.NEAREST).save(folder / f"img_{i:05d}.jpg", quality=80)
        if i % 2 == 0:
            (folder / f"img_{i:05d}.txt").write_text(f"ink style, picture {i}", encoding="utf-8")


def snakemake(flow: Path, *args: str) -> tuple[float, str]:
    command = [str(Path(sys.executable).with_name("snakemake")), "--cores", "2", *args]
    started = time.perf_counter()
    proc = subprocess.run(command, cwd=flow, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if proc.returncode:
        raise SystemExit(f"plan_rerun: snakemake {' '.join(args)} failed:\n{(proc.stdout + proc.stderr)[-4000:]}")
    return seconds, proc.stdout + proc.stderr


def plan(flow: Path, configs: list[str], repeats: int, before=None) -> tuple[float, str]:
    """Median seconds of `snakemake -n` over `repeats` (`before()` runs ahead of each)."""
    times, out = [], ""
    for _ in range(repeats):
        if before:
            before()
        seconds, out = snakemake(flow, "-n", "--configfile", *configs)
        times.append(seconds)
    return statistics.median(times), out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    n = args.images or (200 if args.smoke else 10_000)
    args.repeats = args.repeats or (1 if args.smoke else 3)
    shutil.rmtree(args.work, ignore_errors=True)
    flow = args.work / "flow"
    flow.mkdir(parents=True)
    for name in WORKFLOW_PARTS:
        (shutil.copytree if (ROOT / name).is_dir() else shutil.copy2)(ROOT / name, flow / name)
    style = args.work / "style"
    started = time.perf_counter()
    write_style(style, n)
    print(f"plan_rerun: {n} images written in {time.perf_counter() - started:.0f} s", flush=True)
    (flow / "own.yaml").write_text(json.dumps({"dataset": {"path": str(style)}}), encoding="utf-8")
    own = ["demo/config.yaml", "own.yaml"]
    first, _ = snakemake(flow, "--configfile", *own, "--until", "download_dataset")
    print(f"plan_rerun: first run up to download_dataset: {first:.0f} s", flush=True)

    baseline, _ = plan(flow, ["demo/config.yaml"], args.repeats)
    warm, _ = plan(flow, own, args.repeats)
    cold, _ = plan(flow, own, args.repeats, before=lambda: shutil.rmtree(flow / CONTENT_CACHE, ignore_errors=True))
    caption = style / "img_00000.txt"

    original, edits = caption.read_text(encoding="utf-8"), iter(range(1, 1 << 30))

    def edit() -> None:  # each repeat another text than the one download_dataset read
        st = caption.stat()
        caption.write_text(f"{original}, edit {next(edits)}", encoding="utf-8")
        os.utime(caption, ns=(st.st_atime_ns, st.st_mtime_ns))

    edited, out = plan(flow, own, args.repeats, before=edit)
    named = "1 edited (img_00000.txt)" in out and "download_dataset" in out
    rows = {"baseline (demo dataset, built by a rule)": baseline, "warm (a rerun)": warm,
            "cold (content cache deleted)": cold, "one caption edited, time kept": edited}
    report = {"images": n, "repeats": args.repeats, "first_run_s": round(first, 1), "goal_s": None if args.smoke else GOAL_S,
              "plan_s": {k: round(v, 2) for k, v in rows.items()}, "edit_named_and_planned": named,
              "ok": named and (args.smoke or warm < GOAL_S)}
    table = "".join(f"| {k} | {v:.2f} | {v / baseline:.2f} |\n" for k, v in rows.items())
    md = (f"# Planning a rerun over {n} images (`snakemake -n`, median of {args.repeats})\n\n"
          f"| plan | s | vs baseline |\n|---|---:|---:|\n{table}\n"
          f"The edit named and its chain planned: {named}. Goal: warm under {GOAL_S:.0f} s.\n")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    args.out.with_suffix(".md").write_text(md, encoding="utf-8")
    print(md)
    print(f"plan_rerun: {'ok' if report['ok'] else 'FAILED'}; wrote {args.out}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
