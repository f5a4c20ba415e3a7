"""Gather what the GPU check (kolors_story.tools.gpu_check) needs on an offline GPU host that has torch.

    kolors-story-wheelhouse --python 3.12 --out wheelhouse        # or: make wheelhouse PY=3.12

Downloads (from PyPI, on a machine with network) the wheels of the GPU check's packages at the
versions pinned in this environment, with everything they need, minus torch, torchvision and what
those two bring (the host's own torch stays in charge of CUDA, numpy and pillow). It adds a copy of
the Kolors ChatGLM tokenizer (from the diffsynth wheel, which the host does not need). On the host:
`make gpu-check` installs them into a private folder and runs the check.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement

ROOTS = ("diffusers", "transformers", "peft", "accelerate", "safetensors", "sentencepiece",
         "simple-aesthetics-predictor")
HOST_HAS = ("torch", "torchvision")  # and everything they require
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64")


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def closure(roots: tuple[str, ...], python: str) -> dict[str, str]:
    """name -> installed version of the roots and their requirements, markers evaluated for `python`."""
    env = {**default_environment(), "python_version": python, "python_full_version": f"{python}.0", "extra": ""}
    found: dict[str, str] = {}
    todo = list(roots)
    while todo:
        name = _norm(todo.pop())
        if name in found:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            raise SystemExit(f"wheelhouse: {name} is not installed here; run `make env` first") from None
        found[name] = dist.version
        for line in dist.requires or ():
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate(env):
                todo.append(req.name)
    return found


def wanted(python: str) -> dict[str, str]:
    host = closure(HOST_HAS, python)
    return {name: version for name, version in sorted(closure(ROOTS, python).items()) if name not in host}


def download(packages: dict[str, str], python: str, out: Path) -> None:
    platform_args = [arg for p in PLATFORMS for arg in ("--platform", p)]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", python,
           "--implementation", "cp", *platform_args, "-d", str(out), *(f"{n}=={v}" for n, v in packages.items())]
    subprocess.run(cmd, check=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--python", default="3.12", help="the GPU host's Python (major.minor)")
    parser.add_argument("--out", type=Path, default=Path("wheelhouse"))
    args = parser.parse_args(argv)
    from kolors_story.models.random_kolors import kolors_tokenizer_dir

    packages = wanted(args.python)
    args.out.mkdir(parents=True, exist_ok=True)
    download(packages, args.python, args.out)
    (args.out / "requirements.txt").write_text("".join(f"{n}=={v}\n" for n, v in packages.items()), encoding="utf-8")
    shutil.copytree(kolors_tokenizer_dir(), args.out / "kolors_tokenizer", dirs_exist_ok=True)
    size = sum(p.stat().st_size for p in args.out.rglob("*") if p.is_file()) / 2**20
    print(f"wheelhouse: {len(packages)} packages + the Kolors tokenizer in {args.out} ({size:.0f} MiB): "
          + ", ".join(packages))
    return 0


if __name__ == "__main__":
    sys.exit(main())
