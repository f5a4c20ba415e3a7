"""Report figures: the sheet of dropped images from a real filter run on the demo dataset (its
corrupt and truncated files get placeholder tiles), and the timings chart from benchmark files
that Snakemake itself wrote."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kolors_story.data.local_folder import collect_local
from kolors_story.data.rows import relative_path
from kolors_story.files import write_json
from kolors_story.data.demo_data import build_demo_dataset
from kolors_story.data.filtering import filter_rows
from kolors_story.data.images import load_rgb
from kolors_story.outputs.manifest import read_benchmarks
from kolors_story.outputs.report_figures import (
    COLUMNS,
    GAP,
    PLACEHOLDER,
    TEXT_TILE,
    TILE,
    draw_dropped_sheet,
    draw_timings,
    timing_rows,
)

DEMO_OPS = [
    {"image_shape_filter": {"min_width": 64, "min_height": 64}},
    {"image_aspect_ratio_filter": {"min_ratio": 0.5, "max_ratio": 2.0}},
    {"image_deduplicator": {"method": "phash"}},
]
SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))
BAR_COLOUR = (0x44, 0x77, 0xAA)


@pytest.fixture(scope="module")
def filtered_run(tmp_path_factory) -> tuple[dict, Path]:
    """filter_stats.json of the demo dataset as the download + filter stages leave it, read back."""
    root = tmp_path_factory.mktemp("run")
    build_demo_dataset(root / "dataset")
    data_dir = root / "results" / "demo" / "data"
    rows, report = collect_local(root / "dataset", data_dir / "images", "ink style, {caption}", "水墨画", None)
    result = filter_rows(rows, DEMO_OPS, root / "dj_work")
    stats = {**result.stats, "download": report.as_dict(len(rows))}
    stats["dropped"] = [{**d, "image": relative_path(d["image"], data_dir)} for d in stats["dropped"]]
    path = write_json(stats, data_dir / "filter_stats.json")
    return json.loads(path.read_text(encoding="utf-8")), data_dir


def _find(sheet: np.ndarray, tile: np.ndarray) -> list[tuple[int, int]]:
    """Top-left corners where `tile` appears pixel for pixel in `sheet`."""
    h, w = tile.shape[:2]
    corners = np.argwhere(np.all(sheet == tile[0, 0], axis=2))
    return [(int(y), int(x)) for y, x in corners
            if y + h <= sheet.shape[0] and x + w <= sheet.shape[1] and np.array_equal(sheet[y:y + h, x:x + w], tile)]


def _pixels(image: np.ndarray, colour: tuple[int, int, int]) -> int:
    return int(np.all(image == colour, axis=2).sum())


def _thumb(path: Path) -> np.ndarray:
    image, _ = load_rgb(path)
    image.thumbnail((TILE, TILE), Image.Resampling.LANCZOS)
    return np.asarray(image)


# ------------------------------------------------------------------------------ dropped sheet


def test_every_drop_of_the_real_filter_run_gets_a_tile(filtered_run, tmp_path):
    stats, data_dir = filtered_run
    assert len(stats["dropped"]) == 8 and stats["download"]["dropped"] == []
    sheet = np.asarray(Image.open(draw_dropped_sheet(stats, data_dir, tmp_path / "dropped.png")))
    assert sheet.shape[1] == GAP + COLUMNS * (TILE + GAP)  # 8 tiles: a full row of COLUMNS, then two
    assert sheet.shape[0] > 2 * TILE
    decodable = [d for d in stats["dropped"] if d["op"] != "integrity_check"]
    for entry in decodable:  # each dropped image shows as the filter saw it (same decoder)
        assert _find(sheet, _thumb(data_dir / entry["image"])), entry["id"]


def test_undecodable_files_get_grey_placeholders_not_errors(filtered_run, tmp_path):
    stats, data_dir = filtered_run
    broken = [d for d in stats["dropped"] if d["op"] == "integrity_check"]
    assert {d["id"] for d in broken} == {"img_030_corrupt", "img_031_truncated"}
    sheet = np.asarray(Image.open(draw_dropped_sheet(stats, data_dir, tmp_path / "dropped.png")))
    grey = _pixels(sheet, PLACEHOLDER)
    assert 1.2 * TILE * TILE < grey <= 2 * TILE * TILE  # two tiles, less their text
    only_good = {**stats, "dropped": [d for d in stats["dropped"] if d["op"] != "integrity_check"]}
    assert _pixels(np.asarray(Image.open(draw_dropped_sheet(only_good, data_dir, tmp_path / "good.png"))), PLACEHOLDER) == 0


def test_images_resolve_against_the_given_folder(filtered_run, tmp_path):
    """`image` is relative to filter_stats.json's folder: another root finds no files."""
    stats, data_dir = filtered_run
    wrong = np.asarray(Image.open(draw_dropped_sheet(stats, data_dir.parent, tmp_path / "wrong.png")))
    assert _pixels(wrong, PLACEHOLDER) > 7 * TILE * TILE  # all 8: "file not found"


def test_the_sheet_is_the_same_bytes_each_time(filtered_run, tmp_path):
    stats, data_dir = filtered_run
    first = draw_dropped_sheet(stats, data_dir, tmp_path / "a.png").read_bytes()
    assert first == draw_dropped_sheet(stats, data_dir, tmp_path / "b.png").read_bytes()


def _synthetic(tmp_path: Path, n: int, reason: str = "image_width=40", size: int = 80) -> dict:
    folder = tmp_path / "data" / "images"
    folder.mkdir(parents=True, exist_ok=True)
    dropped = []
    for i in range(n):
        Image.new("RGB", (size, size), (10 * i, 100, 200)).save(folder / f"img_{i}.png")
        dropped.append({"id": f"img_{i}", "image": f"images/img_{i}.png", "op": "image_shape_filter", "reason": reason})
    return {"rows_in": n + 10, "rows_out": 10, "ops": [], "dropped": dropped}


def test_max_tiles_caps_the_sheet(tmp_path):
    stats = _synthetic(tmp_path, 5)
    sheet = Image.open(draw_dropped_sheet(stats, tmp_path / "data", tmp_path / "s.png", max_tiles=3))
    assert sheet.width == GAP + 3 * (TILE + GAP)
    shown = np.asarray(sheet.convert("RGB"))
    assert _find(shown, np.asarray(Image.open(tmp_path / "data/images/img_2.png").convert("RGB")))
    assert not _find(shown, np.asarray(Image.open(tmp_path / "data/images/img_3.png").convert("RGB")))


def test_nothing_dropped_is_a_small_picture_that_says_so(tmp_path):
    sheet = Image.open(draw_dropped_sheet({"rows_in": 24, "rows_out": 24, "dropped": [], "download": {"dropped": []}},
                                          tmp_path, tmp_path / "none.png"))
    assert sheet.height < 100 and sheet.width < 2 * TILE


def test_download_drops_are_text_tiles(tmp_path):
    stats = {"rows_in": 3, "rows_out": 3, "dropped": [], "download": {"dropped": [
        {"file": "ghost.png", "where": "metadata.jsonl line 2", "reason": "listed but not in the folder"},
        {"record": 7, "reason": "cannot decode image: broken data"}]}}
    sheet = np.asarray(Image.open(draw_dropped_sheet(stats, tmp_path, tmp_path / "dl.png")))
    assert sheet.shape[1] == GAP + 2 * (TILE + GAP)
    assert _pixels(sheet, TEXT_TILE) > 1.2 * TILE * TILE and _pixels(sheet, PLACEHOLDER) == 0


def test_an_image_over_the_pixel_limit_gets_a_placeholder(tmp_path, monkeypatch):
    stats = _synthetic(tmp_path, 1, size=400)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100_000)  # 400x400 is now over Pillow's limit
    path = draw_dropped_sheet(stats, tmp_path / "data", tmp_path / "big.png")
    monkeypatch.undo()
    sheet = np.asarray(Image.open(path))
    assert _pixels(sheet, PLACEHOLDER) > 0.6 * TILE * TILE


def test_chinese_reasons_draw_as_real_glyphs(tmp_path):
    a = draw_dropped_sheet(_synthetic(tmp_path / "a", 1, "水墨画：损坏的文件"), tmp_path / "a/data", tmp_path / "a.png")
    b = draw_dropped_sheet(_synthetic(tmp_path / "b", 1, "山水画：重复的图片"), tmp_path / "b/data", tmp_path / "b.png")
    first, second = np.asarray(Image.open(a)), np.asarray(Image.open(b))
    assert first.shape == second.shape and not np.array_equal(first, second)  # tofu boxes would match


def test_bad_max_tiles_is_a_user_error(tmp_path):
    from kolors_story.errors import UserError

    with pytest.raises(UserError, match="max_tiles"):
        draw_dropped_sheet(_synthetic(tmp_path, 1), tmp_path / "data", tmp_path / "x.png", max_tiles=0)


# ------------------------------------------------------------------------------------ timings

BENCH_SNAKEFILE = """
rule all:
    input: "quick.txt", "slow.txt"

rule quick:
    output: "quick.txt"
    benchmark: "benchmarks/quick.tsv"
    shell: "sleep 0.2; touch {output}"

rule slow:
    output: "slow.txt"
    benchmark: "benchmarks/generate_scene/slow.tsv"
    shell: "python3 -c 'import time; x = bytearray(200 * 2**20); time.sleep(1.5)'; touch {output}"
"""


@pytest.fixture(scope="module")
def benchmark_files(tmp_path_factory) -> dict[str, Path]:
    """Benchmark TSVs written by Snakemake's own `benchmark:` directive."""
    workdir = tmp_path_factory.mktemp("bench")
    (workdir / "Snakefile").write_text(BENCH_SNAKEFILE, encoding="utf-8")
    proc = subprocess.run([SNAKEMAKE, "--cores", "1", "--quiet"], cwd=workdir, capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {"quick": workdir / "benchmarks/quick.tsv", "generate_scene/slow": workdir / "benchmarks/generate_scene/slow.tsv"}


def _bars(image: np.ndarray) -> list[int]:
    """Length in px of each bar, top to bottom (a bar is a band of rows holding BAR_COLOUR)."""
    mask = np.all(np.abs(image[..., :3].astype(int) - BAR_COLOUR) <= 3, axis=2)
    lengths, bands, inside = mask.sum(axis=1), [], False
    for length in lengths:
        if length and not inside:
            bands.append(0)
        if length:
            bands[-1] = max(bands[-1], int(length))
        inside = bool(length)
    return bands


def test_timings_chart_from_real_benchmark_files(benchmark_files, tmp_path):
    rows = timing_rows(read_benchmarks(benchmark_files))
    assert [label for label, _, _ in rows] == ["quick", "generate_scene/slow"]
    assert rows[1][1] > rows[0][1] >= 0.2
    image = np.asarray(Image.open(draw_timings(rows, tmp_path / "timings.png")))
    assert image.shape[1] == 800 and image.shape[0] == round((1.2 + 0.35 * 2) * 100)
    quick, slow = _bars(image)  # first row on top
    assert slow > 3 * quick


def test_timings_png_is_the_same_bytes_each_time(benchmark_files, tmp_path):
    rows = timing_rows(read_benchmarks(benchmark_files))
    first = draw_timings(rows, tmp_path / "a.png").read_bytes()
    assert first == draw_timings(rows, tmp_path / "b.png").read_bytes()
    assert b"Matplotlib" not in first  # no version stamp in the metadata


def test_unmeasured_jobs_and_no_jobs_still_draw(tmp_path):
    rows = [("train_lora", 31.3, 920.8), ("generate_scene/s1", float("nan"), float("nan"))]
    image = np.asarray(Image.open(draw_timings(rows, tmp_path / "nan.png")))
    assert len(_bars(image)) == 1  # the unmeasured job has an empty bar (and a "not measured" label)
    empty = np.asarray(Image.open(draw_timings([], tmp_path / "empty.png")))
    assert _bars(empty) == []
    assert timing_rows({"x": {"s": 2.0}})[0][2] != timing_rows({"x": {"s": 2.0}})[0][2]  # NaN max_rss
