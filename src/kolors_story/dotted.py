"""Nested settings as dotted keys (`train.rank`): what sweeps name variants by and the leaderboard
compares them by."""

from __future__ import annotations

import json
from typing import Any


def flatten(config: dict, prefix: str = "") -> dict[str, Any]:
    """Dotted key -> value for every leaf of nested mappings (lists are leaves)."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{dotted}."))
        else:
            flat[dotted] = value
    return flat


def differing_settings(configs: dict[str, dict], ignore: tuple[str, ...] = ("run",)) -> list[str]:
    """The dotted keys whose values differ between the variants (story order of first appearance)."""
    flats = {name: flatten(c) for name, c in configs.items()}
    keys = list(dict.fromkeys(k for flat in flats.values() for k in flat))
    return [k for k in keys if k not in ignore and k.split(".")[0] not in ignore
            and len({json.dumps(f.get(k), sort_keys=True, ensure_ascii=False) for f in flats.values()}) > 1]
