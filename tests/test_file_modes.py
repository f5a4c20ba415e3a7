"""Outputs are as readable as the umask allows (0666 & ~umask), whichever library wrote them:
safetensors and tempfile create files 0600, so a teammate sharing results/ could not read them
(files.share_as_umask_allows). Each kind is written by the real writer a demo job uses."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch

from kolors_story.models.kolors_folder import KolorsFolder
from kolors_story.models.prompt_embeddings import write_embeddings
from kolors_story.render.scenes import Consistency, RenderInputs, SamplerSettings, Scene, render_anchor
from kolors_story.training import TrainJob, TrainSettings, train_lora

CPU = torch.device("cpu")


def modes(root: Path) -> dict[str, int]:
    """Every file's permission bits under root, by relative path."""
    return {str(p.relative_to(root)): stat.S_IMODE(p.stat().st_mode) for p in root.rglob("*") if p.is_file()}


@pytest.fixture(params=[0o022, 0o077], ids=["umask022", "umask077"])
def umask(request):
    previous = os.umask(request.param)
    yield request.param
    os.umask(previous)


def test_every_kind_of_output_is_as_readable_as_the_umask_allows(umask, tiny_kolors, training_folder, tmp_path):
    want = 0o666 & ~umask
    embeddings = write_embeddings(KolorsFolder(tiny_kolors), ["水墨画，少女", "", "二次元", "水墨画，山水"], tmp_path / "embeddings.safetensors",
                                  torch.float32, CPU, cache_root=tmp_path / "cache")
    job = TrainJob(tiny_kolors, training_folder, tmp_path / "lora", embeddings=embeddings)
    lora = train_lora(job, TrainSettings(steps=1, resolution=32, precision="fp32", rank=2, alpha=2,
                                         checkpoint_every=1)).lora_file
    anchor = render_anchor(RenderInputs(tiny_kolors, lora, embeddings=embeddings),
                           Scene("girl", "水墨画，少女", "", 0, 32, 32), SamplerSettings(steps=2),
                           Consistency(steps_fraction=1.0, max_tokens=16), tmp_path / "anchors/girl.safetensors",
                           device=CPU)
    found = modes(tmp_path)
    for kind in [embeddings, lora, anchor]:
        assert found[str(kind.relative_to(tmp_path))] == want, kind
    checkpoints = [name for name in found if "/step-" in name]
    cache = [name for name in found if name.startswith("cache/")]
    assert checkpoints and cache, found
    assert {name: mode for name, mode in found.items() if mode != want} == {}
    folders = {p: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.rglob("*") if p.is_dir()}
    assert set(folders.values()) == {0o777 & ~umask}


def test_the_tiny_models_the_demo_builds_are_readable(tiny_kolors):
    """Built under the test session's umask (022 unless the shell says otherwise)."""
    want = 0o666 & ~os.umask(os.umask(0o022))
    assert {name: mode for name, mode in modes(tiny_kolors).items() if mode != want} == {}
