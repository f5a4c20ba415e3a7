"""Fixed cost of each GPU rule's job: process start to its first model load, beside the work after it.

    .venv/bin/python bench/job_fixed_cost.py [--workdir DIR] [--repeats 3] [--out FILE] [--smoke]

Method: the demo (demo/config.yaml, tiny models, CPU) runs once in a fresh copy of the workflow
(or --workdir names a finished one). For each GPU rule, one of its jobs is forced again
(`snakemake -f <its output> --skip-script-cleanup`), which keeps the script wrapper Snakemake made
for it (the real script, with the pickled `snakemake` object of that job and its real inputs).
That wrapper is then run --repeats times, each as a fresh process, through _first_model_call.py,
which notes the wall clock of the first KolorsFolder.load_* call: fixed = that moment minus the
moment the process was started (imports, argument handling, logging set-up, GPU slot), work = the
rest. Baseline, in the same run: a process that only does `import torch, diffusers`, the floor
every job pays. Goal from issue 16 (printed, not asserted): a demo scene job's fixed cost at most
5 s on an idle 2-core machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORKFLOW_FILES = ["Snakefile", "config.yaml", "rules", "scripts", "schemas", "demo", "profiles", "envs", "report"]
SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))
# rule -> (a glob of one of its outputs under the workdir, the script name in its wrapper)
RULES = {
    "generate_scene": ("results/shared/scenes/*/*/panel.png", "generate_scene"),
    "render_anchor": ("results/shared/anchors/*/*.safetensors", "render_anchor"),
    "encode_texts": ("results/shared/embeddings/*/embeddings.safetensors", "encode_texts"),
    "train_lora": ("results/shared/lora/*/pytorch_lora_weights.safetensors", "train_lora"),
}
GOAL_SCENE_FIXED_S = 5.0


def run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def demo_workdir(target: Path) -> Path:
    """A copy of the workflow with the demo run in it."""
    for name in WORKFLOW_FILES:
        src = ROOT / name
        (shutil.copytree if src.is_dir() else shutil.copy2)(src, target / name)
    print(f"running the demo once in {target} ...", flush=True)
    run([SNAKEMAKE, "--cores", "2", "--configfile", "demo/config.yaml"], target)
    return target


def kept_wrapper(workdir: Path, rule: str) -> Path | None:
    """Force one job of `rule` again, keeping its script wrapper; None if the demo has no such job."""
    pattern, script = RULES[rule]
    outputs = sorted(workdir.glob(pattern))
    if not outputs:
        return None
    before = set((workdir / ".snakemake" / "scripts").glob(f"*{script}.py"))
    # the sweep's config plans the jobs of both demo variants: the output found may be either one's
    run([SNAKEMAKE, "--cores", "1", "--configfile", "demo/config.yaml", "demo/sweep.yaml", "--skip-script-cleanup",
         "-f", str(outputs[0].relative_to(workdir))], workdir)
    new = set((workdir / ".snakemake" / "scripts").glob(f"*{script}.py")) - before
    return max(new, key=lambda p: p.stat().st_mtime) if new else None


def time_process(cmd: list[str], cwd: Path) -> dict:
    started = time.time()
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    ended = time.time()
    line = next((x for x in proc.stdout.splitlines() if x.startswith("FIRST_MODEL_CALL ")), None)
    if line is None:
        return {"total": ended - started, "exit": proc.returncode}
    data = json.loads(line.split(" ", 1)[1])
    if data["exit"] != 0:
        raise SystemExit(f"{cmd[-1]} failed (exit {data['exit']}):\n{proc.stderr[-2000:]}")
    if "t" not in data:  # e.g. encode_texts with every text cached: the whole job is fixed cost
        return {"fixed": ended - started, "work": 0.0, "total": ended - started, "first_call": "none",
                "heavy_at_first_call": [], "exit": 0}
    return {"fixed": data["t"] - started, "work": data["end"] - data["t"], "total": ended - started,
            "first_call": data["call"], "heavy_at_first_call": data["heavy"], "exit": data["exit"]}


def measure(workdir: Path, rules: list[str], repeats: int) -> dict:
    results = {}
    base = [time_process([sys.executable, "-c", "import torch, diffusers"], workdir)["total"] for _ in range(repeats)]
    results["baseline: import torch, diffusers"] = {"total": statistics.median(base)}
    for rule in rules:
        wrapper = kept_wrapper(workdir, rule)
        if wrapper is None:
            print(f"  {rule}: no job of this rule in the demo (or no wrapper kept); skipped")
            continue
        runs = [time_process([sys.executable, str(ROOT / "bench" / "_first_model_call.py"), str(wrapper)], workdir)
                for _ in range(repeats)]
        results[rule] = {k: statistics.median(r[k] for r in runs) for k in ("fixed", "work", "total")}
        results[rule].update(first_call=runs[0]["first_call"], heavy_at_first_call=runs[0]["heavy_at_first_call"],
                             runs=runs)
    return results


def print_table(results: dict) -> None:
    floor = results["baseline: import torch, diffusers"]["total"]
    print(f"\n{'job':<34} {'fixed s':>8} {'work s':>8} {'fixed / baseline':>17}  heavy modules at the first model call")
    print(f"{'baseline: import torch, diffusers':<34} {floor:8.2f} {'':>8} {1.0:16.2f}x")
    for rule, r in results.items():
        if "fixed" in r:
            print(f"{rule:<34} {r['fixed']:8.2f} {r['work']:8.2f} {r['fixed'] / floor:16.2f}x  "
                  f"{', '.join(r['heavy_at_first_call']) or '-'}")
    scene = results.get("generate_scene")
    if scene:
        print(f"\ngoal: a demo scene job's fixed cost <= {GOAL_SCENE_FIXED_S:.0f} s on an idle 2-core machine: "
              f"{scene['fixed']:.2f} s here ({os.cpu_count()} cores, load {os.getloadavg()[0]:.1f})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, help="a workflow copy where the demo already ran (an empty or "
                        "missing folder: the demo runs there and stays)")
    parser.add_argument("--rules", default=",".join(RULES))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "job_fixed_cost.json")
    parser.add_argument("--smoke", action="store_true", help="generate_scene only, once")
    args = parser.parse_args(argv)
    rules, repeats = (["generate_scene"], 1) if args.smoke else (args.rules.split(","), args.repeats)
    with tempfile.TemporaryDirectory(prefix="job-fixed-cost-") as tmp:
        workdir = args.workdir or Path(tmp)
        if not (workdir / "results").is_dir():
            workdir.mkdir(parents=True, exist_ok=True)
            demo_workdir(workdir)
        results = measure(workdir, rules, repeats)
    print_table(results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1), encoding="utf-8")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
