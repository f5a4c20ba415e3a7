"""The training job's host-memory request grows with train.processes (SLURM's --mem is made from
it), the profile sets none of its own for it, and a value given by the user still wins."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from workflow_copy import ROOT, snakemake


def train_mem_mb(folder: Path, *args: str) -> int:
    """mem_mb of the train_lora job in a dry run of the demo (more config files or flags in args)."""
    proc = snakemake(folder, "-n", "--cores", "2", "--configfile", "demo/config.yaml", *args, "--until", "train_lora")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "rule train_lora:" in out, out[-3000:]
    return int(re.search(r"resources: .*\bmem_mb=(\d+)", out[out.index("rule train_lora:"):])[1])


def test_the_training_job_asks_host_memory_per_process(tmp_path):
    (tmp_path / "two.yaml").write_text("train:\n  processes: 2\n", encoding="utf-8")
    (tmp_path / "eight.yaml").write_text("train:\n  processes: 8\n", encoding="utf-8")
    assert train_mem_mb(tmp_path) == 24000
    assert train_mem_mb(tmp_path, "two.yaml") == 32000
    assert train_mem_mb(tmp_path, "eight.yaml") == 80000
    assert train_mem_mb(tmp_path, "eight.yaml", "--set-resources", "train_lora:mem_mb=64000") == 64000


def test_the_slurm_profile_leaves_training_memory_to_the_rule():
    profile = yaml.safe_load((ROOT / "profiles/slurm/config.yaml").read_text(encoding="utf-8"))
    assert "mem_mb" not in profile["set-resources"]["train_lora"]
