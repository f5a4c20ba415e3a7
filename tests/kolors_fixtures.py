"""Shared fixtures for the Kolors model tests (loaded as a pytest plugin, see pyproject.toml)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kolors_story.tiny_kolors import build_tiny_kolors


@pytest.fixture(scope="session")
def tiny_kolors(tmp_path_factory) -> Path:
    """A tiny random-weight Kolors folder in the real Kolors-diffusers layout."""
    return build_tiny_kolors(tmp_path_factory.mktemp("models") / "kolors", seed=0)


@pytest.fixture(scope="session")
def training_folder(tmp_path_factory) -> Path:
    """A DiffSynth-style training folder: train/metadata.csv + 4 JPEGs with 2 distinct captions."""
    root = tmp_path_factory.mktemp("dataset")
    (root / "train").mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for i in range(4):
        pixels = rng.integers(0, 255, (80, 96, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / "train" / f"{i}.jpg")
        rows.append({"file_name": f"{i}.jpg", "text": "水墨画，山水" if i % 2 else "二次元"})
    with open(root / "train" / "metadata.csv", "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["file_name", "text"])
        writer.writeheader()
        writer.writerows(rows)
    return root
