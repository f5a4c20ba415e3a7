"""The procedural ink-wash demo dataset: deterministic, one look, and every planted defect real."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from kolors_story.data.text_files import read_text_file
from kolors_story.data.local_folder import scan_local_folder
from kolors_story.data.demo_data import _phash, build_demo_dataset


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> tuple[Path, dict[str, int]]:
    out = tmp_path_factory.mktemp("demo") / "images"
    return out, build_demo_dataset(out)


def _one(folder: Path, kind: str) -> list[Path]:
    return sorted(folder.glob(f"img_*_{kind}.jpg"))


def test_counts_match_the_files(demo):
    folder, counts = demo
    assert counts == {"good": 23, "no_caption": 1, "undersized": 2, "wrong_aspect": 2, "duplicate": 2, "corrupt": 1, "truncated": 1}
    assert len(list(folder.glob("*.jpg"))) == sum(counts.values())
    # Every image but the uncaptioned one has a sidecar.
    assert len(list(folder.glob("*.txt"))) == sum(counts.values()) - 1
    assert not (folder / "img_023_nocap.txt").exists()


def test_same_seed_same_bytes_other_seed_differs(demo, tmp_path):
    folder, _ = demo
    build_demo_dataset(tmp_path / "again")
    build_demo_dataset(tmp_path / "other", seed=1)
    for path in sorted(folder.iterdir()):
        assert (tmp_path / "again" / path.name).read_bytes() == path.read_bytes(), path.name
    assert (tmp_path / "other" / "img_000.jpg").read_bytes() != (folder / "img_000.jpg").read_bytes()


def test_good_images_have_the_ink_wash_look(demo):
    folder, _ = demo
    for path in sorted(folder.glob("img_0[0-2][0-9].jpg")):
        with Image.open(path) as img:
            assert img.format == "JPEG" and img.mode == "RGB" and img.size == (96, 96)
            pixels = np.asarray(img, dtype=np.float32)
        gray = pixels.mean(axis=2)
        assert gray[:10].mean() > 170, "sky should be pale paper"
        assert gray.min() < 110, "there should be dark ink"
        r, g, b = pixels[-8, -8]  # inside the seal, bottom right
        assert r > 130 and g < 90 and b < 90, f"{path.name}: no red seal ({r}, {g}, {b})"
        caption, _ = read_text_file(path.with_suffix(".txt"))
        assert caption.startswith("水墨画，山水") and "红色印章" in caption


def test_sidecars_come_in_the_encodings_people_save(demo):
    """UTF-8, GB18030, UTF-16 with BOM, UTF-8 with BOM, by image number; the library reads them all."""
    folder, _ = demo
    found = {}
    for path in sorted(folder.glob("img_*.txt")):
        text, encoding = read_text_file(path)
        found.setdefault(encoding, path.name)
        assert text.startswith("水墨画") and text.endswith("\n")
    assert found == {"utf-8": "img_000.txt", "gb18030": "img_001.txt", "utf-16-le (BOM)": "img_002.txt", "utf-8 (BOM)": "img_003.txt"}
    assert (folder / "img_001.txt").read_bytes().decode("gb18030") == read_text_file(folder / "img_001.txt")[0]


def test_a_non_image_file_sits_among_the_images(demo):
    folder, _ = demo
    rows, report = scan_local_folder(folder, default_caption="x")
    assert "README.md" not in {r["source"] for r in rows}
    (readme,) = [e for e in report.files if e["file"] == "README.md"]
    assert readme["use"] == "skipped" and "not an image" in readme["reason"]


def test_size_defects(demo):
    folder, _ = demo
    for path in _one(folder, "small"):
        assert Image.open(path).size == (40, 40)
    for path in _one(folder, "wide"):
        width, height = Image.open(path).size
        assert height >= 64 and width / height > 2.0, "wide images must pass the size filter and fail the aspect one"


def test_duplicates_are_phash_duplicates(demo):
    folder, _ = demo
    exact, resized = _one(folder, "dup_exact")[0], _one(folder, "dup_resized")[0]
    assert exact.read_bytes() == (folder / "img_000.jpg").read_bytes()
    assert Image.open(resized).size != (96, 96)
    twins = [p for p in sorted(folder.glob("img_0[0-2][0-9].jpg")) if _phash(p.read_bytes()) == _phash(resized.read_bytes())]
    assert len(twins) == 1 and twins[0].name != "img_000.jpg"


def test_broken_files_are_broken(demo):
    folder, _ = demo
    with pytest.raises(OSError):
        Image.open(_one(folder, "corrupt")[0])
    truncated = _one(folder, "truncated")[0]
    with Image.open(truncated) as img:  # the header is intact ...
        assert img.size == (96, 96)
        previous, ImageFile.LOAD_TRUNCATED_IMAGES = ImageFile.LOAD_TRUNCATED_IMAGES, False
        try:
            with pytest.raises(OSError, match="truncated"):  # ... the scan is not
                img.load()
        finally:
            ImageFile.LOAD_TRUNCATED_IMAGES = previous


def test_phash_is_the_one_the_demo_was_made_with(demo):
    """imagededup's PHash gives the hash its copy in demo_data gave when the demo was made."""
    folder, _ = demo
    assert _phash((folder / "img_000.jpg").read_bytes()).hex() == "c3a6e419e6a39957"


def test_rejects_sizes_the_demo_filter_would_drop(tmp_path):
    with pytest.raises(ValueError, match="size"):
        build_demo_dataset(tmp_path / "x", size=32)
