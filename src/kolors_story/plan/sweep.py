"""Sweeps: one config, several variants, and the content keys that let variants share jobs.

`sweep:` is a list of partial configs merged over the base config. An item with `grid:` expands to
every combination of its dotted keys' values (`{train.rank: [8, 16], generate.lora_scale: [0.8,
1.0]}` -> four variants). Each variant is validated like any config, its errors prefixed with the
variant's name. Without `sweep:` the base config is the one variant, named by `run`.

`job_key` hashes what a job depends on; the workflow names shared outputs by it, so two variants
whose training inputs match point at one training output and Snakemake plans one job.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import re
from collections.abc import Callable, Iterator
from typing import Any

from kolors_story.errors import UserError

SHARED = "shared"  # results/shared/ holds the keyed jobs' outputs: no variant may take the name
VARIANT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
# Longest name that becomes a file or folder name (run, variant, scene id, character; the schema's
# maxLength): file systems allow 255 bytes, and the room left covers suffixes and CJK's 3 bytes.
NAME_MAX = 64
KEY_LENGTH = 12


def deep_merge(base: dict, override: dict) -> dict:
    """`base` with `override` merged in: mappings merge key by key, anything else replaces."""
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _nested(dotted: str, value: Any) -> dict:
    out: dict = {}
    node = out
    *parents, leaf = dotted.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value
    return out


def _value_name(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, separators=(",", ""))
    return re.sub(r"[^A-Za-z0-9._-]+", "+", str(text)).strip("+") or "x"


def _grid_items(item: dict) -> Iterator[tuple[str, dict]]:
    """(name, partial config) for each combination of one sweep item's grid."""
    grid = item.get("grid") or {}
    rest = {k: v for k, v in item.items() if k not in ("name", "grid")}
    if not grid:
        yield item["name"], rest
        return
    keys = list(grid)
    for values in itertools.product(*(grid[k] for k in keys)):
        parts = [f"{k.rsplit('.', 1)[-1]}{_value_name(v)}" for k, v in zip(keys, values)]
        name = "-".join(([item["name"]] if item.get("name") else []) + parts)
        partial = rest
        for key, value in zip(keys, values):
            partial = deep_merge(partial, _nested(key, value))
        yield name, partial


def _check_names(names: list[str]) -> None:
    problems = []
    folded = [n.casefold() for n in names]
    if twice := sorted({n for n, f in zip(names, folded) if folded.count(f) > 1}):
        problems.append(f"variant name(s) {', '.join(twice)} occur twice (case is ignored); give each "
                        "sweep item its own `name` (grid variants are named from their values).")
    if bad := [n for n in names if not VARIANT_NAME.fullmatch(n) or n.casefold() == SHARED]:
        problems.append(f"variant name(s) {bad} cannot name a folder results/<variant>/: use letters, "
                        f"digits, '.', '_' and '-', starting with a letter or digit, and not '{SHARED}'.")
    if long := [n for n in names if len(n) > NAME_MAX]:  # a grid adds its values to the item's name
        problems.append(f"variant name(s) {long} are longer than {NAME_MAX} characters, the most a folder "
                        "results/<variant>/ takes here; give the sweep item a shorter `name`, or fewer grid keys.")
    if problems:
        raise UserError("config key 'sweep': " + " ".join(problems))


def expand_sweep(config: dict, validate: Callable[[dict], dict]) -> dict[str, dict]:
    """Variant name -> its validated config (`run` set to the name, `sweep` emptied, so that the
    resolved config written beside its results reproduces exactly that variant)."""
    items = config.get("sweep") or []
    base = {k: v for k, v in config.items() if k != "sweep"}
    if not items:
        return {config["run"]: validate({**base, "sweep": []})}
    for i, item in enumerate(items):
        if not item.get("name") and not item.get("grid"):
            raise UserError(f"config key 'sweep[{i}]': give the variant a `name` (or a `grid`).")
    pairs = [pair for item in items for pair in _grid_items(item)]
    _check_names([name for name, _ in pairs])
    variants = {}
    for name, partial in pairs:
        if "run" in partial or "sweep" in partial:
            raise UserError(f"sweep variant '{name}': keys 'run' and 'sweep' cannot be set in a variant "
                            "(its name is its run name).")
        try:
            variants[name] = validate({**deep_merge(base, partial), "run": name, "sweep": []})
        except UserError as err:
            raise UserError(f"sweep variant '{name}': {err}") from None
    return variants


def job_key(*parts: Any) -> str:
    """A short stable hash of what a job depends on (canonical JSON: key order never matters)."""
    text = json.dumps(parts, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:KEY_LENGTH]
