"""Shared fixtures for the Kolors model tests (loaded as a pytest plugin, see pyproject.toml)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kolors_story.data.training_folder import write_metadata
from kolors_story.models.random_kolors import build_tiny_kolors


@pytest.fixture(scope="session")
def tiny_kolors(tmp_path_factory) -> Path:
    """A tiny random-weight Kolors folder in the real Kolors-diffusers layout."""
    return build_tiny_kolors(tmp_path_factory.mktemp("models") / "kolors", seed=0)


@pytest.fixture(scope="session")
def training_folder(tmp_path_factory) -> Path:
    """A DiffSynth-style training folder: train/metadata.csv + 4 JPEGs with 2 distinct captions."""
    sizes = [(96, 80)] * 4
    captions = ["二次元", "水墨画，山水", "二次元", "水墨画，山水"]
    return write_training_folder(tmp_path_factory.mktemp("dataset"), sizes, captions)


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """Tiny models are dominated by per-op overhead: one thread is as fast on an idle machine and
    many times faster on a busy one (2 threads per process oversubscribe 2 cores)."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def write_training_folder(root: Path, sizes: list[tuple[int, int]], captions: list[str], seed: int = 0) -> Path:
    """train/metadata.csv + JPEGs of the given (width, height) sizes."""
    (root / "train").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for i, ((w, h), text) in enumerate(zip(sizes, captions)):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / "train" / f"{i}.jpg")
        rows.append((f"{i}.jpg", text, 1))
    write_metadata(root / "train" / "metadata.csv", rows)
    return root
