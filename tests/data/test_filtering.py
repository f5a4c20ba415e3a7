"""The filter stage on the demo dataset, with Data-Juicer's real ops (one full run per module)."""

from __future__ import annotations

from collections import Counter
from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from kolors_story.data.local_folder import collect_local, collect_local_rows
from kolors_story.data.demo_data import build_demo_dataset
from kolors_story.errors import UserError
from kolors_story.data.filtering import FilterResult, _no_runtime_installs, filter_rows, image_problem

DEMO_OPS = [
    {"image_shape_filter": {"min_width": 64, "min_height": 64}},
    {"image_aspect_ratio_filter": {"min_ratio": 0.5, "max_ratio": 2.0}},
    {"image_deduplicator": {"method": "phash"}},
]


@pytest.fixture(scope="module")
def demo_rows(tmp_path_factory) -> list[dict]:
    folder = tmp_path_factory.mktemp("demo") / "images"
    build_demo_dataset(folder)
    rows = collect_local_rows(folder, default_caption="水墨画")
    ghost = {"id": "ghost", "image": str(folder / "ghost.jpg"), "text": "listed but missing"}
    return rows[:5] + [ghost] + rows[5:]  # a missing file in the middle


@pytest.fixture(scope="module")
def result(demo_rows, tmp_path_factory) -> FilterResult:
    return filter_rows(demo_rows, DEMO_OPS, tmp_path_factory.mktemp("dj_work"))


def _dropped_by(result: FilterResult, op: str) -> dict[str, str]:
    return {d["id"]: d["reason"] for d in result.stats["dropped"] if d["op"] == op}


def test_all_good_rows_survive_in_order(result, demo_rows):
    good = [r for r in demo_rows if r["id"][4:7].isdigit() and (len(r["id"]) == 7 or r["id"].endswith("nocap"))]
    assert len(good) == 24
    assert result.kept == good  # same dicts, same order
    assert result.stats["rows_in"] == len(demo_rows) and result.stats["rows_out"] == 24


def test_broken_files_dropped_one_by_one_by_the_integrity_check(result):
    dropped = _dropped_by(result, "integrity_check")
    assert set(dropped) == {"ghost", "img_030_corrupt", "img_031_truncated"}
    assert dropped["ghost"] == "file not found"
    assert "truncated" in dropped["img_031_truncated"]
    assert "cannot" in dropped["img_030_corrupt"]


def test_size_and_aspect_drops_carry_their_stats(result):
    shape = _dropped_by(result, "image_shape_filter")
    assert set(shape) == {"img_024_small", "img_025_small"}
    assert all("image_width=40" in r and "image_height=40" in r and "min_width=64" in r for r in shape.values())
    aspect = _dropped_by(result, "image_aspect_ratio_filter")
    assert set(aspect) == {"img_026_wide", "img_027_wide"}
    assert all("aspect_ratios=2.5" in r and "max_ratio=2.0" in r for r in aspect.values())


def test_both_duplicates_caught_and_name_the_kept_image(result):
    dups = _dropped_by(result, "image_deduplicator")
    assert set(dups) == {"img_028_dup_exact", "img_029_dup_resized"}
    assert dups["img_028_dup_exact"].startswith("duplicate of img_000 (imagehash=")
    twin = dups["img_029_dup_resized"].split()[2]
    assert twin in {r["id"] for r in result.kept} and twin != "img_000"


def test_per_op_counts_add_up(result):
    ops = result.stats["ops"]
    assert [o["op"] for o in ops] == ["integrity_check", "image_shape_filter", "image_aspect_ratio_filter", "image_deduplicator"]
    assert ops[0]["rows_in"] == result.stats["rows_in"] and ops[-1]["rows_out"] == result.stats["rows_out"]
    for before, after in pairwise(ops):
        assert before["rows_out"] == after["rows_in"]
    per_op = Counter(d["op"] for d in result.stats["dropped"])
    for op in ops:
        assert op["rows_in"] - op["rows_out"] == per_op[op["op"]]
    assert {d["id"] for d in result.stats["dropped"]}.isdisjoint(r["id"] for r in result.kept)


def test_integrity_check_stays_strict_after_data_juicer_import(result, demo_rows):
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # what `import data_juicer` did to the process
    truncated = next(r["image"] for r in demo_rows if r["id"] == "img_031_truncated")
    assert "truncated" in image_problem(truncated)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # and the check put it back


def test_no_ops_means_integrity_check_only(demo_rows, tmp_path):
    result = filter_rows(demo_rows, [], tmp_path)
    assert [o["op"] for o in result.stats["ops"]] == ["integrity_check"]
    assert result.stats["rows_out"] == len(demo_rows) - 3


def test_everything_filtered_names_the_op(demo_rows, tmp_path):
    ops = [{"image_aspect_ratio_filter": {"min_ratio": 0.1, "max_ratio": 10}}, {"image_shape_filter": {"min_width": 4096}}]
    with pytest.raises(UserError, match=r"image_shape_filter removed the last 30 rows.*filter\.ops"):
        filter_rows(demo_rows, ops, tmp_path)


def test_everything_filtered_names_the_op_that_removed_the_most(demo_rows, tmp_path):
    """The last op is not always the one to loosen: the message names the op that removed the most."""
    subset = [r for r in demo_rows if r["id"] in {"img_026_wide", "img_027_wide", "img_000"}]
    ops = [{"image_aspect_ratio_filter": {"min_ratio": 0.5, "max_ratio": 2.0}}, {"image_shape_filter": {"min_width": 4096}}]
    with pytest.raises(UserError) as info:
        filter_rows(subset, ops, tmp_path)
    message = str(info.value)
    assert "of 3 images, image_aspect_ratio_filter removed the most (2; e.g. img_026_wide: aspect_ratios=2.5" in message
    assert "image_shape_filter removed the last 1 rows" in message
    assert "Removed per op: integrity_check 0, image_aspect_ratio_filter 2, image_shape_filter 1" in message
    assert message.endswith("To fix, loosen image_aspect_ratio_filter in filter.ops (config.yaml) or remove it.")


def test_all_files_broken_names_the_integrity_check(demo_rows, tmp_path):
    broken = [r for r in demo_rows if r["id"] in {"ghost", "img_030_corrupt"}]
    with pytest.raises(UserError, match="integrity_check removed the last 2 rows"):
        filter_rows(broken, DEMO_OPS, tmp_path)


@pytest.mark.parametrize(
    "ops, message",
    [
        ([{"image_shape_filtre": {}}], r"Unknown operator 'image_shape_filtre'.*did you mean: image_shape_filter"),
        ([{"image_shape_filter": {"min_widht": 64}}], r"image_shape_filter.*Unknown parameter 'min_widht'.*min_width"),
        ([{"image_shape_filter": {"min_width": "big"}}], r"min_width.*expects type 'int'"),
        ([{"image_blur_mapper": {}}], r"image_blur_mapper is a Data-Juicer Mapper"),
        (["image_shape_filter"], r"filter\.ops\[0\]"),
        ([{"image_shape_filter": [64]}], r"filter\.ops\[0\] \(image_shape_filter\)"),
    ],
)
def test_bad_ops_are_user_errors(demo_rows, tmp_path, ops, message):
    with pytest.raises(UserError, match=message) as info:
        filter_rows(demo_rows, ops, tmp_path)
    assert "filter.ops" in str(info.value)


def test_runtime_installs_are_refused():
    """DJ would pip/uv-install a missing module on first use; inside the filter that is an error."""
    from data_juicer.utils.lazy_loader import LazyLoader

    original = LazyLoader.__dict__["_install_package"]
    missing = LazyLoader("kolors_story_no_such_module", package_name="kolors-story-no-such-package")
    with _no_runtime_installs(), pytest.raises(UserError, match="kolors-story-no-such-package"):
        _ = missing.anything
    assert LazyLoader.__dict__["_install_package"] is original


def test_dropped_rows_name_their_source_file_and_no_absolute_path(result, demo_rows):
    dropped = {d["id"]: d for d in result.stats["dropped"]}
    assert dropped["img_030_corrupt"]["source"] == "img_030_corrupt.jpg"
    assert "ghost" in dropped and "source" not in dropped["ghost"]  # a row from elsewhere has none
    folder = str(Path(demo_rows[0]["image"]).parent)
    assert all(folder not in d["reason"] for d in result.stats["dropped"])  # Pillow's messages name the file


def test_converted_and_huge_images_in_a_real_op_run(demo_rows, tmp_path):
    """Stored TIFF/16-bit/transparent images pass Data-Juicer's ops; an image over Pillow's pixel
    limit (lowered here, instead of writing a huge file) is dropped alone by the integrity check."""
    folder = tmp_path / "src"
    folder.mkdir()
    rng = np.random.default_rng(0)  # textures, so phash dedup sees different images
    Image.fromarray(rng.integers(0, 65536, (80, 80), dtype=np.uint16)).save(folder / "deep.tif")
    clear = rng.integers(0, 256, (80, 80, 4), dtype=np.uint8)
    clear[..., 3] = np.where(np.arange(80)[:, None] < 40, 0, 255)  # top half transparent
    Image.fromarray(clear, "RGBA").save(folder / "clear.png")
    Image.new("RGB", (200, 200), (9, 9, 9)).save(folder / "huge.png")
    stored, _ = collect_local(folder, tmp_path / "images", "{caption}", "x", None)
    rows = demo_rows[:4] + stored
    limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = 30_000  # 200x200 is over it (a warning, which the check treats as an error)
    try:
        result = filter_rows(rows, DEMO_OPS, tmp_path / "work")
    finally:
        Image.MAX_IMAGE_PIXELS = limit
    assert [r["id"] for r in result.kept] == [r["id"] for r in demo_rows[:4]] + ["clear", "deep"]
    (huge,) = result.stats["dropped"]
    assert huge["id"] == "huge" and huge["op"] == "integrity_check" and huge["reason"].startswith("too large")


def test_rows_keep_the_fields_the_filter_does_not_know(result, tmp_path):
    """Data-Juicer sees only text and image: caption, caption_from (and any later field) reach
    filtered.jsonl as the download stage wrote them."""
    from kolors_story.data.rows import read_rows, write_rows

    assert all({"caption", "caption_from", "source"} <= set(row) for row in result.kept)
    extra = [{**row, "repeats": 3, "anything": [1, "二"]} for row in result.kept[:2]]
    assert read_rows(write_rows(extra, tmp_path / "filtered.jsonl")) == extra


def _textured(path: Path, seed: int) -> None:
    rng = np.random.default_rng(seed)  # a texture: phash tells it from the others
    Image.fromarray(rng.integers(0, 256, (96, 96, 3), dtype=np.uint8)).save(path, quality=95)


def test_dedup_keeps_the_captioned_copy_then_the_richer_caption(tmp_path):
    """Identical bytes under four names: a.jpg (no caption) sorts first, yet the copy with the
    longest caption is kept; a pair without captions keeps the first by name. Real Data-Juicer."""
    folder = tmp_path / "style"
    folder.mkdir()
    _textured(folder / "a.jpg", 1)
    for name in ("b.jpg", "c.jpg", "d.jpg"):
        (folder / name).write_bytes((folder / "a.jpg").read_bytes())
    (folder / "b.txt").write_text("ink", encoding="utf-8")
    (folder / "c.txt").write_text("ink wash mountains", encoding="utf-8")
    (folder / "d.txt").write_text("ink", encoding="utf-8")
    _textured(folder / "e.jpg", 2)
    (folder / "f.jpg").write_bytes((folder / "e.jpg").read_bytes())
    _textured(folder / "g.jpg", 3)
    rows = collect_local_rows(folder, default_caption="水墨画")
    result = filter_rows(rows, [{"image_deduplicator": {"method": "phash"}}], tmp_path / "work")
    assert [r["id"] for r in result.kept] == ["c", "e", "g"]  # input order kept
    dups = _dropped_by(result, "image_deduplicator")
    assert set(dups) == {"a", "b", "d", "f"}
    assert dups["a"].startswith("duplicate of c (imagehash=")
    assert dups["a"].endswith("kept c.jpg because it has a caption (c.txt) and this copy has none")
    assert dups["b"].endswith("kept c.jpg because its caption (c.txt) is longer (18 vs 3 characters)")
    assert dups["f"].endswith("kept e.jpg because it comes first by name (neither has a caption)")


def test_dedup_of_equal_captions_keeps_the_first_name(tmp_path):
    folder = tmp_path / "style"
    folder.mkdir()
    _textured(folder / "x.jpg", 4)
    (folder / "y.jpg").write_bytes((folder / "x.jpg").read_bytes())
    _textured(folder / "z.jpg", 5)
    for stem in "xy":
        (folder / f"{stem}.txt").write_text("山水", encoding="utf-8")
    result = filter_rows(collect_local_rows(folder), [{"image_deduplicator": {}}], tmp_path / "work")
    assert [r["id"] for r in result.kept] == ["x", "z"]
    assert _dropped_by(result, "image_deduplicator")["y"].endswith(
        "kept x.jpg because it comes first by name (captions equally long)")
