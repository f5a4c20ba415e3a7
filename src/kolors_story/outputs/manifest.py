"""What a run needs to be reproduced: resolved config, model ids, seeds, input hashes, versions.

Nothing from the environment goes in (no env vars, no tokens): the manifest is shared with results.
"""

from __future__ import annotations

import copy
import csv
import hashlib
import platform
import re
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import yaml

from kolors_story.errors import UserError
from kolors_story.files import sha256_file
from kolors_story.render.candidates_file import CandidateRecord

# Distribution names whose versions decide the results.
TRACKED_PACKAGES = (
    "torch",
    "diffusers",
    "transformers",
    "peft",
    "accelerate",
    "py-data-juicer",
    "simple-aesthetics-predictor",
    "modelscope",
    "snakemake",
    "kolors-story",
)
# Config keys whose values must never be written out, in case someone puts a secret in config.
_SECRET_KEY = re.compile(
    r"(^|[_-])(token|secret|password|passwd|api[_-]?key|access[_-]?key|credentials?)$", re.IGNORECASE
)
REDACTED = "<redacted>"
_CHUNK = 1 << 20


def package_versions() -> dict:
    """Python and tracked package versions; None for a package that is not installed."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in TRACKED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _tree_files(folder: Path) -> list[Path]:
    files = (p for p in folder.rglob("*") if p.is_file())
    return sorted(files, key=lambda p: p.relative_to(folder).as_posix())


def hash_tree(paths: Iterable[Path]) -> dict[str, str]:
    """Name -> sha256 for files and every file under folders, in sorted order.

    A file is named by its file name; a file in a folder by `<folder name>/<path inside it>`.
    """
    hashes: dict[str, str] = {}
    for path in map(Path, paths):
        if path.is_file():
            entries = [(path.name, path)]
        elif path.is_dir():
            entries = [(f"{path.name}/{f.relative_to(path).as_posix()}", f) for f in _tree_files(path)]
        else:
            raise UserError(f"Cannot hash {path}: it does not exist. Check the run's inputs.")
        for name, file in entries:
            if name in hashes:
                raise ValueError(f"hash_tree: two inputs give the name {name!r}; hash them separately")
            hashes[name] = sha256_file(file)
    return dict(sorted(hashes.items()))


def _tree_digest(hashes: dict[str, str]) -> str:
    """One digest for a folder: sha256 over `sha256sum`-style lines, sorted by name."""
    lines = "".join(f"{digest}  {name}\n" for name, digest in sorted(hashes.items()))
    return hashlib.sha256(lines.encode("utf-8")).hexdigest()


def _hash_input(key: str, path: Path) -> dict:
    path = Path(path)
    if path.is_file():
        return {"path": str(path), "sha256": sha256_file(path)}
    if path.is_dir():
        files = {name.split("/", 1)[1]: digest for name, digest in hash_tree([path]).items()}
        return {"path": str(path), "sha256": _tree_digest(files), "n_files": len(files), "files": files}
    raise UserError(
        f"Manifest input {key!r} ({path}) does not exist; the step that writes it must run first."
    )


def _redact(value: object) -> object:
    """Copy of a config with values under secret-looking keys replaced."""
    if isinstance(value, dict):
        return {
            k: REDACTED if _SECRET_KEY.search(str(k)) and v is not None else _redact(v)
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [_redact(v) for v in value]
    return copy.deepcopy(value)


def _platform_info() -> dict:
    """Machine facts that can change results (CPU vs GPU kernels), without host or user names."""
    info = {
        "system": platform.system(),
        "release": platform.release(),
        "machine": platform.machine(),
        "python_implementation": platform.python_implementation(),
    }
    try:
        import torch

        info["torch_cuda"] = torch.version.cuda
        info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError:  # the manifest still works without torch
        pass
    return info


def build_manifest(
    config: dict, models: dict[str, str], seeds: dict[str, int], inputs: dict[str, Path],
    panels: Sequence[CandidateRecord] = (),
) -> dict:
    """The run's manifest: run name, UTC time, config, models, seeds, each panel's recipe and how
    best-of-N picked it (the scene jobs' candidate records), input hashes, versions."""
    return {
        "run": config.get("run"),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "config": _redact(config),
        "models": dict(models),
        "seeds": {k: int(v) for k, v in seeds.items()},
        "panels": {r.scene: {"recipe": r.recipe().to_json(), "selection": r.selection()} for r in panels},
        "inputs": {key: _hash_input(key, path) for key, path in inputs.items()},
        "versions": package_versions(),
        "platform": _platform_info(),
    }


TIMING_COLUMNS = ("s", "max_rss", "mean_load", "cpu_time")  # of Snakemake's benchmark files


def read_benchmarks(files: Mapping[str, Path]) -> dict[str, dict]:
    """The GPU jobs' Snakemake benchmark rows (wall seconds, peak RSS MB, CPU load and time), keyed
    by the job's label (e.g. generate_scene/s1)."""
    timings = {}
    for name, path in files.items():
        with open(path, encoding="utf-8") as f:
            rows = list(csv.DictReader(f, delimiter="\t"))
        timings[name] = {k: float(rows[-1][k]) for k in TIMING_COLUMNS if rows and rows[-1].get(k) not in (None, "", "NA")}
    return timings


def write_resolved_config(config: dict, path: Path) -> Path:
    """The config with defaults filled in, as YAML that reruns this exact run."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = (
        f"# Resolved configuration of run {config.get('run')!r} (all defaults filled in).\n"
        f"# Reproduce this run with:\n"
        f"#   snakemake --cores 1 --configfile {path}\n"
        f"# (add --resources gpu=1 on a GPU host, as for the original run).\n"
    )
    body = yaml.safe_dump(_redact(config), allow_unicode=True, sort_keys=False)
    path.write_text(header + body, encoding="utf-8")
    return path
