"""The sweep leaderboard: variants read from the files a run leaves (scores.json as write_scores
writes it, story.png, the resolved config.yaml), ranked, tabled (CSV round trip) and drawn."""

from __future__ import annotations

import copy
import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from kolors_story.errors import UserError
from kolors_story.outputs.leaderboard import (
    FIXED_COLUMNS,
    HIGHLIGHT_COLOUR,
    THUMB_HEIGHT,
    RunResult,
    draw_leaderboard,
    leaderboard_rows,
    load_run,
    write_leaderboard_csv,
)
from kolors_story.outputs.manifest import write_resolved_config
from kolors_story.models.aesthetic import write_scores

BASE_CONFIG = {
    "run": "base",
    "dataset": {"source": "local", "path": "resources/demo/dataset"},
    "train": {"rank": 4, "learning_rate": 0.001, "target_modules": ["to_q", "to_k"]},
    "generate": {"steps": 4, "lora_scale": 1.0, "consistency": {"enabled": True, "mode": "anchor"}},
    "story": {"title": "古风少女的桃花梦"},
    "sweep": [],
}
STORY_COLOURS = {"alpha": (220, 30, 30), "beta": (30, 30, 220), "gamma": (30, 180, 30), "delta": (200, 0, 200)}


def make_run(root: Path, name: str, panel_scores: list[float], threshold: float = 6.0,
             overrides: dict | None = None, consistency: float | None = 0.88, gain: float | None = None,
             story_size: tuple[int, int] = (354, 595)) -> RunResult:
    """A variant's results folder as the workflow writes it, then read back with load_run."""
    run_dir = root / name
    run_dir.mkdir(parents=True)
    scores = {f"s{i + 1}.png": s for i, s in enumerate(panel_scores)}
    extra: dict = {"consistency": {"mean": consistency, "pairs": [], "characters": {}}}
    if gain is not None:
        extra["consistency_comparison"] = {"mean_with": 0.9, "mean_without": 0.9 - gain, "gain": gain, "pairs": []}
    write_scores(scores, run_dir / "scores.csv", run_dir / "scores.json", threshold, extra=extra)
    Image.new("RGB", story_size, STORY_COLOURS.get(name, (90, 90, 90))).save(run_dir / "story.png")
    config = copy.deepcopy(BASE_CONFIG)
    for dotted, value in (overrides or {}).items():
        node = config
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = value
    write_resolved_config({**config, "run": name}, run_dir / "config.yaml")
    return load_run(name, run_dir / "scores.json", run_dir / "story.png", run_dir / "config.yaml")


@pytest.fixture
def sweep(tmp_path) -> list[RunResult]:
    return [
        make_run(tmp_path, "alpha", [5.0, 5.5], overrides={"train.rank": 8}),
        make_run(tmp_path, "beta", [6.5, 6.7], overrides={"generate.lora_scale": 0.8}, gain=0.012),
        make_run(tmp_path, "gamma", [6.0, 6.0], overrides={"train.target_modules": ["to_q", "to_v"]},
                 consistency=None),
        make_run(tmp_path, "delta", [5.0, 5.5], threshold=5.0,
                 overrides={"generate.consistency.mode": "off", "story.title": "桃花梦·续"}),
    ]


# ------------------------------------------------------------------------------------ reading


def test_load_run_reads_what_the_workflow_writes(sweep):
    beta = sweep[1]
    assert beta.name == "beta" and beta.story.name == "story.png"
    assert beta.summary["mean"] == pytest.approx(6.6) and beta.summary["n"] == 2
    assert beta.config["run"] == "beta" and beta.config["generate"]["lora_scale"] == 0.8


@pytest.mark.parametrize("broken", ["scores.json", "story.png", "config.yaml"])
def test_a_missing_file_is_a_user_error_naming_it(tmp_path, broken):
    run = make_run(tmp_path, "alpha", [5.0])
    (tmp_path / "alpha" / broken).unlink()
    with pytest.raises(UserError, match=rf"alpha/{broken} does not exist"):
        load_run("alpha", tmp_path / "alpha" / "scores.json", run.story, tmp_path / "alpha" / "config.yaml")


@pytest.mark.parametrize(("name", "content", "message"), [
    ("scores.json", "{not json", "cannot be read"),
    ("scores.json", '{"threshold": 6.0}', "no numeric 'mean'"),
    ("scores.json", "[1, 2]", "holds list, not a mapping"),
    ("config.yaml", "train: [unclosed", "cannot be read"),
    ("config.yaml", "- just a list", "holds list, not a mapping"),
])
def test_an_unreadable_file_is_a_user_error_naming_it(tmp_path, name, content, message):
    make_run(tmp_path, "alpha", [5.0])
    (tmp_path / "alpha" / name).write_text(content, encoding="utf-8")
    with pytest.raises(UserError, match=message) as err:
        load_run("alpha", tmp_path / "alpha" / "scores.json", tmp_path / "alpha" / "story.png",
                 tmp_path / "alpha" / "config.yaml")
    assert str(tmp_path / "alpha" / name) in str(err.value)


# ------------------------------------------------------------------------------------- ranking


def test_rows_rank_by_mean_with_ties_by_name(sweep):
    rows = leaderboard_rows(sweep)
    assert [r["variant"] for r in rows] == ["beta", "gamma", "alpha", "delta"]  # alpha, delta tie at 5.25
    assert [r["rank"] for r in rows] == [1, 2, 3, 4]
    assert [r["best"] for r in rows] == [True, False, False, False]
    assert [r["mean_score"] for r in rows] == pytest.approx([6.6, 6.0, 5.25, 5.25])
    assert leaderboard_rows(list(reversed(sweep))) == rows  # input order never matters


def test_passes_is_the_mean_against_each_runs_own_threshold(sweep):
    rows = {r["variant"]: r for r in leaderboard_rows(sweep)}
    assert rows["beta"]["passes"] is True
    assert rows["gamma"]["passes"] is True  # exactly at the threshold passes
    assert rows["alpha"]["passes"] is False  # 5.25 < 6.0
    assert rows["delta"]["passes"] is True and rows["delta"]["threshold"] == 5.0  # same mean, lower bar


def test_consistency_columns_and_empty_cells(sweep):
    rows = {r["variant"]: r for r in leaderboard_rows(sweep)}
    assert rows["alpha"]["consistency"] == pytest.approx(0.88) and rows["alpha"]["consistency_gain"] == ""
    assert rows["beta"]["consistency_gain"] == pytest.approx(0.012)
    assert rows["gamma"]["consistency"] == ""  # no character pairs: the mean is null
    assert all(r["panels"] == 2 for r in rows.values())


def test_columns_are_fixed_then_the_differing_settings(sweep):
    rows = leaderboard_rows(sweep)
    settings = ["train.rank", "train.target_modules", "generate.lora_scale", "generate.consistency.mode", "story.title"]
    assert list(rows[0]) == [*FIXED_COLUMNS, *settings]  # `run` differs too but is the variant itself
    by_name = {r["variant"]: r for r in rows}
    assert by_name["alpha"]["train.rank"] == 8 and by_name["beta"]["train.rank"] == 4
    assert by_name["gamma"]["train.target_modules"] == '["to_q", "to_v"]'  # a list: JSON
    assert by_name["alpha"]["train.target_modules"] == '["to_q", "to_k"]'
    assert by_name["delta"]["generate.consistency.mode"] == "off"  # nested two levels down
    assert by_name["delta"]["story.title"] == "桃花梦·续"


def test_one_variant_has_no_setting_columns_and_is_best(tmp_path):
    rows = leaderboard_rows([make_run(tmp_path, "alpha", [3.9])])
    assert list(rows[0]) == list(FIXED_COLUMNS) and rows[0]["best"] and not rows[0]["passes"]


def test_no_runs_or_repeated_names_are_user_errors(tmp_path, sweep):
    with pytest.raises(UserError, match="No variants"):
        leaderboard_rows([])
    with pytest.raises(UserError, match="repeat"):
        leaderboard_rows([sweep[0], sweep[0]])


# ----------------------------------------------------------------------------------------- CSV


def test_csv_round_trips_every_value(sweep, tmp_path):
    rows = leaderboard_rows(sweep)
    path = write_leaderboard_csv(rows, tmp_path / "out" / "leaderboard.csv")
    with path.open(encoding="utf-8", newline="") as handle:
        read = list(csv.DictReader(handle))
    assert [list(r) for r in read] == [list(r) for r in rows]
    for original, back in zip(rows, read):
        assert float(back["mean_score"]) == original["mean_score"]  # exact: written with repr
        assert back["passes"] == str(original["passes"]) and back["best"] == str(original["best"])
        if original["consistency"] != "":
            assert float(back["consistency"]) == original["consistency"]
        assert json.loads(back["train.target_modules"]) == json.loads(original["train.target_modules"])
    assert read[3]["story.title"] == "桃花梦·续"
    assert "桃花梦·续".encode() in path.read_bytes()  # UTF-8, not escaped


def test_awkward_float_survives_the_csv(tmp_path):
    run = make_run(tmp_path, "alpha", [0.1, 0.2, 0.4])  # a mean with no short decimal form
    rows = leaderboard_rows([run])
    path = write_leaderboard_csv(rows, tmp_path / "lb.csv")
    assert float(next(csv.DictReader(path.open(encoding="utf-8")))["mean_score"]) == run.summary["mean"]


# ------------------------------------------------------------------------------------- picture


def _colour_rows(image: np.ndarray, colour: tuple[int, int, int]) -> np.ndarray:
    """Pixel rows where a story thumbnail of `colour` shows (its flat fill)."""
    match = np.all(np.abs(image.astype(int) - colour) <= 2, axis=2)
    return np.flatnonzero(match.sum(axis=1) > 50)


def test_picture_has_a_row_per_variant_in_rank_order_with_the_best_framed(sweep, tmp_path):
    rows = leaderboard_rows(sweep)
    path = draw_leaderboard(rows, sweep, tmp_path / "leaderboard.png")
    image = np.asarray(Image.open(path).convert("RGB"))
    assert image.shape[0] >= len(rows) * THUMB_HEIGHT
    spans = {name: _colour_rows(image, STORY_COLOURS[name]) for name in STORY_COLOURS}
    for name, span in spans.items():  # each thumbnail is THUMB_HEIGHT tall (aspect kept)
        assert span.size and span[-1] - span[0] + 1 == THUMB_HEIGHT, name
    tops = [spans[r["variant"]][0] for r in rows]
    assert tops == sorted(tops)  # drawn in rank order, top to bottom
    second_top = spans[rows[1]["variant"]][0]
    highlight = np.all(image == HIGHLIGHT_COLOUR, axis=2)
    frame = np.flatnonzero(highlight.sum(axis=1) > 0.8 * image.shape[1])  # the frame's top and bottom edges
    assert frame.size and frame.min() < tops[0] and spans[rows[0]["variant"]][-1] < frame.max() < second_top
    inside = highlight[frame.min() + 10:frame.max() - 10, 20:-20]  # within the frame's edges
    assert inside.sum(axis=1).max() > 20  # the "★ best" badge beside the name
    assert not highlight[second_top:].any()  # nothing highlighted below the best row


def test_thumbnail_keeps_the_story_aspect(tmp_path):
    run = make_run(tmp_path, "alpha", [5.0], story_size=(600, 200))
    image = np.asarray(Image.open(draw_leaderboard(leaderboard_rows([run]), [run], tmp_path / "lb.png")).convert("RGB"))
    match = np.all(np.abs(image.astype(int) - STORY_COLOURS["alpha"]) <= 2, axis=2)
    ys, xs = np.nonzero(match)
    assert ys.max() - ys.min() + 1 == THUMB_HEIGHT and xs.max() - xs.min() + 1 == 3 * THUMB_HEIGHT


def test_pass_and_fail_badges_differ_in_colour(tmp_path):
    from kolors_story.outputs.leaderboard import FAIL_COLOUR, PASS_COLOUR

    runs = [make_run(tmp_path, "alpha", [7.0]), make_run(tmp_path, "beta", [3.0])]
    image = np.asarray(Image.open(draw_leaderboard(leaderboard_rows(runs), runs, tmp_path / "lb.png")).convert("RGB"))
    passed, failed = _colour_rows(image, PASS_COLOUR), _colour_rows(image, FAIL_COLOUR)
    alpha, beta = _colour_rows(image, STORY_COLOURS["alpha"]), _colour_rows(image, STORY_COLOURS["beta"])
    assert passed.size and alpha[0] <= passed.min() and passed.max() <= alpha[-1]
    assert failed.size and beta[0] <= failed.min() and failed.max() <= beta[-1]


def test_same_inputs_give_the_same_png_bytes(sweep, tmp_path):
    rows = leaderboard_rows(sweep)
    first = draw_leaderboard(rows, sweep, tmp_path / "a.png").read_bytes()
    second = draw_leaderboard(rows, sweep, tmp_path / "b.png").read_bytes()
    assert first == second
    assert b"tIME" not in first and b"tEXt" not in first


def test_chinese_setting_values_draw_as_real_glyphs(tmp_path):
    """Two different Chinese values draw differently: missing-glyph boxes would look the same."""
    images = []
    for title in ("山水画", "花鸟图"):
        root = tmp_path / title
        runs = [make_run(root, "alpha", [5.0]), make_run(root, "beta", [4.0], overrides={"story.title": title})]
        images.append(np.asarray(Image.open(draw_leaderboard(leaderboard_rows(runs), runs, root / "lb.png"))))
    assert images[0].shape == images[1].shape and not np.array_equal(images[0], images[1])


def test_a_story_that_does_not_decode_is_a_user_error(tmp_path):
    run = make_run(tmp_path, "alpha", [5.0])
    run.story.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(UserError, match=r"alpha/story.png cannot be shown"):
        draw_leaderboard(leaderboard_rows([run]), [run], tmp_path / "lb.png")


def test_rows_without_their_run_are_a_user_error(sweep, tmp_path):
    with pytest.raises(UserError, match="no run results"):
        draw_leaderboard(leaderboard_rows(sweep), sweep[:2], tmp_path / "lb.png")


def test_resolved_config_with_its_comment_header_loads(tmp_path):
    run = make_run(tmp_path, "alpha", [5.0])
    assert (tmp_path / "alpha" / "config.yaml").read_text(encoding="utf-8").startswith("# Resolved")
    assert run.config == {**BASE_CONFIG, "run": "alpha"}
    assert yaml.safe_load((tmp_path / "alpha" / "config.yaml").read_text(encoding="utf-8"))["story"]["title"] == "古风少女的桃花梦"


# ------------------------------------------------------------------------------- the rule script

COMPARE_SNAKEFILE = """
VARIANTS = ["alpha", "beta"]

rule compare_runs:
    input:
        scores=[f"{v}/scores.json" for v in VARIANTS],
        stories=[f"{v}/story.png" for v in VARIANTS],
        configs=[f"{v}/config.yaml" for v in VARIANTS],
    output:
        csv="leaderboard.csv",
        png="leaderboard.png",
    params:
        variants=VARIANTS,
    log:
        "compare_runs.log",
    script:
        "{script}"
"""


def test_compare_runs_script_under_snakemake(tmp_path):
    """scripts/compare_runs.py as the rule runs it: both outputs, and the best variant in the log."""
    make_run(tmp_path, "alpha", [5.0, 5.5], overrides={"train.rank": 8})
    make_run(tmp_path, "beta", [6.5, 6.7])
    script = Path(__file__).resolve().parents[2] / "scripts" / "compare_runs.py"
    (tmp_path / "Snakefile").write_text(COMPARE_SNAKEFILE.replace("{script}", str(script)), encoding="utf-8")
    snakemake = str(Path(sys.executable).with_name("snakemake"))
    proc = subprocess.run([snakemake, "--cores", "1", "--quiet"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    with (tmp_path / "leaderboard.csv").open(encoding="utf-8", newline="") as handle:
        assert [r["variant"] for r in csv.DictReader(handle)] == ["beta", "alpha"]
    assert Image.open(tmp_path / "leaderboard.png").height >= 2 * THUMB_HEIGHT
    assert "best of 2 variants: beta, mean aesthetic score 6.6000" in (tmp_path / "compare_runs.log").read_text()
