"""Run manifest: versions, hashes of files and folders, no secrets, resolved config round trip."""

from __future__ import annotations

import hashlib
import json
import platform
from datetime import datetime
from pathlib import Path

import pytest
import yaml

from kolors_story.errors import UserError
from kolors_story.files import sha256_file, write_json
from kolors_story.outputs.manifest import (
    build_manifest,
    hash_tree,
    package_versions,
    write_resolved_config,
)
from kolors_story.render.candidates_file import Candidate, CandidateRecord

CONFIG = {
    "run": "demo",
    "story": {"title": "古风少女的桃花梦", "scenes": [{"id": "s1", "prompt": "古风，水墨画"}]},
    "upload": {"enabled": False, "repo_id": "me/repo", "visibility": "public"},
    "models": {"kolors": "resources/tiny/kolors"},
}


@pytest.fixture()
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    (root / "sub").mkdir(parents=True)
    (root / "b.txt").write_bytes(b"bee")
    (root / "sub" / "a.txt").write_bytes(b"ay")
    (root / "a.txt").write_bytes(b"top")
    return root


def test_package_versions():
    versions = package_versions()
    assert versions["python"] == platform.python_version()
    assert set(versions) >= {"torch", "diffusers", "transformers", "peft", "accelerate", "py-data-juicer",
                             "simple-aesthetics-predictor", "modelscope", "snakemake", "kolors-story"}
    assert versions["transformers"].startswith("4.")
    assert versions["kolors-story"] is not None


def test_sha256_and_hash_tree(tree: Path, tmp_path: Path):
    assert sha256_file(tree / "b.txt") == hashlib.sha256(b"bee").hexdigest()
    single = tmp_path / "lora.safetensors"
    single.write_bytes(b"w")
    hashes = hash_tree([tree, single])
    assert list(hashes) == ["data/a.txt", "data/b.txt", "data/sub/a.txt", "lora.safetensors"]
    assert hashes["data/sub/a.txt"] == hashlib.sha256(b"ay").hexdigest()
    with pytest.raises(UserError, match="missing"):
        hash_tree([tmp_path / "missing"])


def test_build_and_write_manifest(tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("MODELSCOPE_API_TOKEN", "ms-should-never-appear")
    lora = tmp_path / "lora.safetensors"
    lora.write_bytes(b"w")
    config = dict(CONFIG, upload=dict(CONFIG["upload"], token="ms-pasted-by-mistake"))
    manifest = build_manifest(config, models={"kolors": "resources/tiny/kolors"},
                              seeds={"train": 0, "s1": 1}, inputs={"dataset": tree, "lora": lora})
    assert list(manifest) == ["run", "created", "config", "models", "seeds", "panels", "inputs", "versions",
                              "platform"]
    assert manifest["run"] == "demo"
    assert datetime.fromisoformat(manifest["created"]).utcoffset().total_seconds() == 0
    assert manifest["inputs"]["lora"] == {"path": str(lora), "sha256": hashlib.sha256(b"w").hexdigest()}
    dataset = manifest["inputs"]["dataset"]
    assert dataset["n_files"] == 3 and list(dataset["files"]) == ["a.txt", "b.txt", "sub/a.txt"]
    assert manifest["config"]["upload"]["token"] == "<redacted>"
    assert manifest["config"]["upload"]["repo_id"] == "me/repo"
    assert config["upload"]["token"] == "ms-pasted-by-mistake"  # caller's dict untouched

    path = write_json(manifest, tmp_path / "out" / "manifest.json")
    text = path.read_text(encoding="utf-8")
    assert json.loads(text) == manifest
    assert "古风少女的桃花梦" in text
    assert "ms-should-never-appear" not in text and "ms-pasted-by-mistake" not in text

    (tree / "b.txt").write_bytes(b"changed")
    again = build_manifest(config, {}, {}, {"dataset": tree})
    assert again["inputs"]["dataset"]["sha256"] != dataset["sha256"]
    with pytest.raises(UserError, match="'weights'"):
        build_manifest(config, {}, {}, {"weights": tmp_path / "nope"})


def test_manifest_holds_each_panels_recipe_from_its_record(tmp_path: Path):
    kept = Candidate(seed=100_004, lora_scale=0.5, batch_seeds=(1, 100_004), score=6.5, file="1.png")
    record = CandidateRecord(scene="s1", prompt="古风，水墨画", negative_prompt="", width=64, height=32,
                             sampler="dpmpp_2m", steps=30, guidance_scale=4.0, precision="fp16", dtype="float16",
                             device="cuda", candidates=(Candidate(1, 0.5, (1, 100_004), 5.0, file="0.png"), kept),
                             chosen=1)
    manifest = build_manifest(CONFIG, {}, {}, {}, panels=[record])
    recipe = manifest["panels"]["s1"]["recipe"]
    assert (recipe["seed"], recipe["lora_scale"], recipe["sampler"], recipe["steps"], recipe["guidance_scale"]) == (
        100_004, 0.5, "dpmpp_2m", 30, 4.0)
    assert recipe["batch_index"] == 1 and manifest["panels"]["s1"]["selection"]["score"] == 6.5
    path = write_json(manifest, tmp_path / "manifest.json")
    assert json.loads(path.read_text(encoding="utf-8"))["panels"]["s1"]["recipe"]["batch_seeds"] == [1, 100_004]


def test_write_resolved_config(tmp_path: Path):
    path = write_resolved_config(CONFIG, tmp_path / "results" / "demo" / "config.yaml")
    text = path.read_text(encoding="utf-8")
    assert f"snakemake --cores 1 --configfile {path}" in text
    assert text.startswith("#")
    assert "古风少女的桃花梦" in text  # allow_unicode: readable, not \u escapes
    assert yaml.safe_load(text) == CONFIG
    assert list(yaml.safe_load(text)) == list(CONFIG)  # key order kept
