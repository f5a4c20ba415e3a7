"""A copy of the workflow (Snakefile, rules, scripts, configs) in a test's folder, and snakemake run
there: for tests of what the workflow plans or refuses when it is parsed."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PARTS = ["Snakefile", "config.yaml", "rules", "scripts", "schemas", "demo", "profiles", "envs", "report"]


def copy_workflow(folder: Path) -> Path:
    for name in PARTS:
        if not (folder / name).exists():
            (shutil.copytree if (ROOT / name).is_dir() else shutil.copy2)(ROOT / name, folder / name)
    return folder


def snakemake(folder: Path, *args: str) -> subprocess.CompletedProcess:
    """`snakemake ARGS` in a copy of the workflow at `folder`, offline."""
    copy_workflow(folder)
    command = [str(Path(sys.executable).with_name("snakemake")), *args]
    return subprocess.run(command, cwd=folder, env={**os.environ, "HF_HUB_OFFLINE": "1"},
                          capture_output=True, text=True, timeout=300)
