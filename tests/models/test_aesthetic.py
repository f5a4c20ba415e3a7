"""The aesthetic metric: tiny predictor layout/determinism, and equality with the challenge's code."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kolors_story.errors import UserError
from kolors_story.models.aesthetic import AestheticScorer, write_scores
from kolors_story.models.hub import check_aesthetic_dir
from kolors_story.models.random_aesthetic import build_tiny_aesthetic_predictor
from challenge_reference import reference_evaluate


@pytest.fixture(scope="module")
def predictor_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_aesthetic_predictor(tmp_path_factory.mktemp("aesthetic") / "predictor", seed=0)


@pytest.fixture(scope="module")
def scorer(predictor_dir: Path) -> AestheticScorer:
    return AestheticScorer(predictor_dir)


@pytest.fixture(scope="module")
def panel_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A few PNG panels unlike each other: sizes that need resize + crop, RGBA, grey, noise."""
    folder = tmp_path_factory.mktemp("panels")
    rng = np.random.default_rng(7)
    ramp = np.linspace(0, 255, 320).astype(np.uint8)
    gradient = np.stack([np.tile(ramp, (240, 1)), np.tile(ramp[:240, None], (1, 320)),
                         np.full((240, 320), 90, np.uint8)], axis=-1)
    Image.fromarray(gradient).save(folder / "p1.png")
    Image.fromarray(rng.integers(0, 256, (300, 200, 3), dtype=np.uint8)).save(folder / "p2.png")
    Image.new("RGBA", (256, 256), (200, 30, 40, 128)).save(folder / "p3.png")
    Image.new("L", (224, 224), 128).save(folder / "p4.png")
    return folder


def test_mean_equals_challenge_reference(scorer: AestheticScorer, predictor_dir: Path, panel_dir: Path):
    scores = scorer.score_files(sorted(panel_dir.iterdir()))
    ours = sum(scores.values()) / len(scores)
    assert ours == pytest.approx(reference_evaluate(str(predictor_dir), str(panel_dir)), abs=1e-5)


def test_scores_vary_between_images(scorer: AestheticScorer, panel_dir: Path):
    scores = scorer.score_files(sorted(panel_dir.iterdir()))
    assert list(scores) == ["p1.png", "p2.png", "p3.png", "p4.png"]
    assert max(scores.values()) - min(scores.values()) > 0.1
    assert all(-5.0 < s < 15.0 for s in scores.values())


def test_tiny_predictor_is_deterministic_per_seed(predictor_dir: Path, tmp_path: Path, panel_dir: Path):
    again = build_tiny_aesthetic_predictor(tmp_path / "again", seed=0)
    other = build_tiny_aesthetic_predictor(tmp_path / "other", seed=1)
    first, second = (torch.load(d / "pytorch_model.bin", weights_only=True) for d in (predictor_dir, again))
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    image = Image.open(panel_dir / "p1.png")
    assert AestheticScorer(again).score(image) == AestheticScorer(predictor_dir).score(image)
    assert AestheticScorer(other).score(image) != AestheticScorer(predictor_dir).score(image)


def test_tiny_predictor_has_real_layout(predictor_dir: Path):
    # AI-ModelScope/aesthetics-predictor-v2-sac-logos-ava1-l14-linearMSE's files (FACTS.md).
    for name in ("config.json", "pytorch_model.bin", "preprocessor_config.json", "vocab.json", "merges.txt",
                 "tokenizer.json"):
        assert (predictor_dir / name).is_file(), name
    assert not list(predictor_dir.glob("*.safetensors"))
    config = json.loads((predictor_dir / "config.json").read_text())
    assert config["architectures"] == ["AestheticsPredictorV2Linear"]
    pre = json.loads((predictor_dir / "preprocessor_config.json").read_text())
    assert pre["size"] == {"shortest_edge": 224}
    assert pre["crop_size"] == {"height": 224, "width": 224}
    assert pre["resample"] == 3 and pre["do_center_crop"] and pre["do_normalize"]
    assert pre["image_mean"] == [0.48145466, 0.4578275, 0.40821073]
    assert pre["image_std"] == [0.26862954, 0.26130258, 0.27577711]
    head = torch.load(predictor_dir / "pytorch_model.bin", weights_only=True)
    assert [tuple(head[f"layers.{i}.weight"].shape) for i in (0, 2, 4, 6, 7)] == [
        (1024, 32), (128, 1024), (64, 128), (16, 64), (1, 16)
    ]


def test_check_dir_lists_missing_files(predictor_dir: Path, tmp_path: Path):
    broken = tmp_path / "broken"
    shutil.copytree(predictor_dir, broken)
    (broken / "preprocessor_config.json").unlink()
    (broken / "pytorch_model.bin").unlink()
    (broken / "tokenizer.json").unlink()
    (broken / "vocab.json").unlink()
    with pytest.raises(UserError) as err:
        check_aesthetic_dir(broken)
    message = str(err.value)
    assert "preprocessor_config.json" in message and "pytorch_model.bin" in message
    assert "vocab.json" in message and "models.aesthetic" in message
    assert str(broken) in message
    with pytest.raises(UserError, match="does not exist"):
        AestheticScorer(tmp_path / "nowhere")


def test_score_files_errors_name_the_file(scorer: AestheticScorer, panel_dir: Path, tmp_path: Path):
    with pytest.raises(UserError, match="missing.png"):
        scorer.score_files([tmp_path / "missing.png"])
    (tmp_path / "a").mkdir()
    shutil.copy(panel_dir / "p1.png", tmp_path / "a" / "p1.png")
    with pytest.raises(UserError, match="p1.png"):
        scorer.score_files([panel_dir / "p1.png", tmp_path / "a" / "p1.png"])
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(UserError, match="bad.png"):
        scorer.score_files([tmp_path / "bad.png"])


def test_write_scores(tmp_path: Path):
    scores = {"s2.png": 6.5, "s1.png": 5.9, "s3.png": 6.0}
    summary = write_scores(scores, tmp_path / "scores.csv", tmp_path / "out" / "scores.json")
    with (tmp_path / "scores.csv").open(newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == ["image", "score"]
    assert [(r[0], float(r[1])) for r in rows[1:]] == list(scores.items())
    on_disk = json.loads((tmp_path / "out" / "scores.json").read_text())
    assert on_disk == summary
    assert summary["mean"] == pytest.approx(6.1333333)
    assert summary["passes"] is True and summary["threshold"] == 6.0 and summary["n"] == 3
    assert summary["scores"] == scores
    assert write_scores(scores, tmp_path / "b.csv", tmp_path / "b.json", threshold=6.5)["passes"] is False
    empty = write_scores({}, tmp_path / "e.csv", tmp_path / "e.json")
    assert empty["mean"] == 0 and empty["n"] == 0 and empty["passes"] is False


def test_consistency_of_identical_images_is_one_and_only_shared_characters_pair(predictor_dir, panel_dir):
    from kolors_story.models.aesthetic import consistency_report

    scorer = AestheticScorer(predictor_dir)
    files = sorted(panel_dir.iterdir())
    scores, embeddings = scorer.score_and_embed_files(files)
    assert scores == scorer.score_files(files)
    first = embeddings[files[0].name]
    report = consistency_report(
        {"a": first, "b": first.clone(), "c": embeddings[files[1].name], "d": embeddings[files[2].name]},
        {"a": ["girl"], "b": ["girl"], "c": ["girl", "prince"], "d": ["prince"]},
    )
    pairs = {(p["a"], p["b"]): p["similarity"] for p in report["pairs"]}
    assert set(pairs) == {("a", "b"), ("a", "c"), ("b", "c"), ("c", "d")}
    assert pairs[("a", "b")] == pytest.approx(1.0, abs=1e-6)
    assert pairs[("a", "c")] < 1.0
    assert report["characters"]["prince"] == pytest.approx(pairs[("c", "d")])
    assert report["mean"] == pytest.approx(sum(pairs.values()) / 4)


def test_consistency_comparison_pairs_the_with_and_without_reports():
    from kolors_story.models.aesthetic import consistency_comparison, consistency_report

    characters = {"a.png": ["girl"], "b.png": ["girl"], "c.png": ["prince"]}
    x, y = torch.tensor([1.0, 0.0]), torch.tensor([0.6, 0.8])
    with_option = consistency_report({"a.png": x, "b.png": x.clone(), "c.png": y}, characters)
    without = consistency_report({"a.png": x, "b.png": y, "c.png": y}, characters)
    comparison = consistency_comparison(with_option, without)
    (pair,) = comparison["pairs"]
    assert (pair["a"], pair["b"], pair["characters"]) == ("a.png", "b.png", ["girl"])
    assert pair["with"] == pytest.approx(1.0) and pair["without"] == pytest.approx(0.6)
    assert comparison["gain"] == pytest.approx(0.4) and comparison["mean_without"] == pytest.approx(0.6)
    nothing = consistency_comparison(consistency_report({}, {}), consistency_report({}, {}))
    assert nothing == {"mean_with": None, "mean_without": None, "gain": None, "pairs": []}
