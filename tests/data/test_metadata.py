"""The training folder in the layout DiffSynth-Studio 1.1.9's Kolors trainer reads."""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from kolors_story.data.local_folder import collect_local_rows
from kolors_story.data.demo_data import build_demo_dataset
from kolors_story.errors import UserError
from kolors_story.data.training_folder import build_training_folder


@pytest.fixture(scope="module")
def rows(tmp_path_factory) -> list[dict]:
    """Demo images plus the modes a real dataset brings: RGBA PNG, grayscale and CMYK JPEG."""
    folder = tmp_path_factory.mktemp("demo") / "images"
    build_demo_dataset(folder, n_images=4)
    good = [r for r in collect_local_rows(folder, default_caption="水墨画") if "_" not in r["id"][4:]]
    extra = folder.parent / "extra"
    extra.mkdir()
    Image.new("RGBA", (70, 80), (200, 30, 30, 100)).save(extra / "rgba.png")
    Image.new("L", (64, 64), 90).save(extra / "gray.jpg")
    Image.new("CMYK", (64, 64), (0, 200, 200, 0)).save(extra / "cmyk.jpg")
    captions = {"rgba": 'comma, "quote"', "gray": "多行\n说明", "cmyk": "普通"}
    return good + [{"id": k, "image": str(extra / f"{k}{'.png' if k == 'rgba' else '.jpg'}"), "text": v} for k, v in captions.items()]


@pytest.fixture(scope="module")
def built(rows, tmp_path_factory) -> Path:
    return build_training_folder(rows, tmp_path_factory.mktemp("train_root"))


def test_csv_lists_every_row_with_its_caption(rows, built):
    assert built.name == "metadata.csv" and built.parent.name == "train"
    with built.open(encoding="utf-8", newline="") as fh:
        records = list(csv.DictReader(fh))
    assert [(r["file_name"], r["text"]) for r in records] == [(f"{r['id']}.jpg", r["text"]) for r in rows]
    frame = pd.read_csv(built)  # what DiffSynth does
    assert list(frame.columns) == ["file_name", "text"]
    assert frame["text"].tolist() == [r["text"] for r in rows]


def test_images_are_rgb_jpeg_and_jpegs_copied_unchanged(rows, built):
    for row in rows:
        target = built.parent / f"{row['id']}.jpg"
        with Image.open(target) as img:
            assert img.format == "JPEG" and img.mode == "RGB"
            assert img.size == Image.open(row["image"]).size
    assert (built.parent / "img_000.jpg").read_bytes() == Path(rows[0]["image"]).read_bytes()
    r, g, b = Image.open(built.parent / "cmyk.jpg").getpixel((5, 5))
    assert r > 150 and g < 120 and b < 120  # CMYK converted, not reinterpreted


def test_diffsynth_text_image_dataset_reads_it(rows, built):
    """Load DiffSynth 1.1.9's own dataset class (by file, skipping its heavy package import)."""
    spec = importlib.util.find_spec("diffsynth")
    source = Path(spec.submodule_search_locations[0]) / "data" / "simple_text_image.py"
    module_spec = importlib.util.spec_from_file_location("diffsynth_simple_text_image", source)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    dataset = module.TextImageDataset(str(built.parent.parent), steps_per_epoch=len(rows), height=64, width=64)
    assert dataset.text == [r["text"] for r in rows]
    assert all(Path(p).is_file() for p in dataset.path)
    item = dataset[0]
    assert tuple(item["image"].shape) == (3, 64, 64) and isinstance(item["text"], str)


def test_rebuild_removes_stale_images(rows, tmp_path):
    build_training_folder(rows, tmp_path)
    build_training_folder(rows[:2], tmp_path)
    assert sorted(p.name for p in (tmp_path / "train").iterdir()) == ["img_000.jpg", "img_001.jpg", "metadata.csv"]


def test_refuses_what_the_trainer_would_choke_on(rows, tmp_path):
    with pytest.raises(UserError, match="empty caption.*dataset.default_caption"):
        build_training_folder([{**rows[0], "text": " "}], tmp_path)
    with pytest.raises(UserError, match="would both train as 'img_000.jpg'"):
        build_training_folder([rows[0], rows[0]], tmp_path)
    with pytest.raises(UserError, match="cannot read image"):
        build_training_folder([{**rows[0], "image": str(tmp_path / "gone.jpg")}], tmp_path)
    with pytest.raises(UserError, match="No rows"):
        build_training_folder([], tmp_path)


def test_a_caption_over_256_tokens_is_refused_naming_the_image_or_cut_with_a_warning(rows, tmp_path, caplog):
    from kolors_story.chatglm_tokens import count_tokens

    long = "水墨画，山水，" * 60 + "结尾"
    given = [rows[0], {**rows[1], "text": long}]
    with pytest.raises(UserError) as err:
        build_training_folder(given, tmp_path)
    assert f"{rows[1]['id']} ({rows[1]['image']}): {count_tokens(long)} tokens" in str(err.value)
    assert "dataset.truncate_long_captions: true" in str(err.value)
    with caplog.at_level("WARNING"):
        csv_path = build_training_folder(given, tmp_path, truncate_long_captions=True)
    assert f"caption of {rows[1]['id']} cut at 256 tokens" in caplog.text and "结尾'" in caplog.text
    assert long in csv_path.read_text(encoding="utf-8")  # the text is kept whole; ChatGLM cuts it
    # the run's manifest lists the cut (cut_captions reads the folder the trainer reads)
    from kolors_story.data.training_folder import cut_captions

    cuts = cut_captions(tmp_path)
    assert [c["image"] for c in cuts] == [f"{rows[1]['id']}.jpg"] and cuts[0]["dropped"].endswith("结尾")


def test_rows_from_elsewhere_are_made_upright_rgb_too(tmp_path, monkeypatch):
    """The download stage stores upright RGB images; rows built another way get the same treatment."""
    from PIL import ExifTags

    src = tmp_path / "src"
    src.mkdir()
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 8
    Image.new("RGB", (30, 10), (0, 0, 200)).save(src / "turned.jpg", exif=exif.tobytes())
    Image.fromarray(np.full((8, 8), 32768, dtype=np.uint16)).save(src / "deep.png")
    Image.new("RGBA", (8, 8), (0, 0, 0, 0)).save(src / "clear.png")
    rows = [{"id": p.stem, "image": str(p), "text": "x"} for p in sorted(src.iterdir())]
    train = build_training_folder(rows, tmp_path / "out").parent
    assert Image.open(train / "turned.jpg").size == (10, 30)
    assert abs(int(np.asarray(Image.open(train / "deep.jpg")).mean()) - 128) <= 2  # half of 16 bits: scaled, not clipped to 255
    assert np.asarray(Image.open(train / "clear.jpg")).min() > 250  # white background, not black
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 20)
    with pytest.raises(UserError, match="cannot read image.*too large"):
        build_training_folder(rows[:1], tmp_path / "again")


def test_rows_whose_ids_meet_as_file_names_name_both_files_and_the_rename(rows, tmp_path):
    """Rows from elsewhere (the download stage refuses such files itself): ' edge' and 'edge'
    both train as edge.jpg; the message names both files and the rename, not "rebuild the rows file"."""
    spaced = {**rows[0], "id": " edge", "source": "sub/ edge.jpg"}
    plain = {**rows[1], "id": "edge", "source": "sub/edge.jpg"}
    with pytest.raises(UserError) as info:
        build_training_folder([spaced, plain], tmp_path)
    assert str(info.value) == (
        "'sub/ edge.jpg' and 'sub/edge.jpg' would both train as 'edge.jpg' (a training file name keeps no "
        "leading or trailing spaces, path separators or control characters); rename 'sub/ edge.jpg' in "
        "dataset.path, e.g. to 'sub/edge_2.jpg', and rerun.")


def test_a_dataset_smaller_than_one_step_is_refused_naming_count_keys_and_fix(rows, tmp_path):
    """encode_texts' check (before ChatGLM loads) on the folder build_metadata wrote."""
    from kolors_story.training.data import check_step_fits

    def folder(picked: list[dict]) -> Path:
        return build_training_folder(picked, tmp_path / str(len(list(tmp_path.iterdir())))).parents[1]

    step = {"batch_size": 4, "gradient_accumulation": 1, "processes": 1}
    one = folder(rows[:1])
    with pytest.raises(UserError) as info:
        check_step_fits(one, step)
    message = str(info.value)
    assert message.startswith(f"The dataset {one} holds 1 image(s) after filtering, fewer than one optimizer step "
                              "takes: train.batch_size 4 x train.gradient_accumulation 1 x train.processes 1 = 4.")
    assert "so that their product is at most 1" in message and "add images" in message
    two_gpus = {"batch_size": 1, "gradient_accumulation": 2, "processes": 2}
    with pytest.raises(UserError, match=r"train.processes 2 = 4\..*at most 3"):
        check_step_fits(folder(rows[:3]), two_gpus)
    # kohya repeats count as the trainer counts them: 2 images x 2 repeats fill a step of 4
    check_step_fits(folder([{**r, "repeats": 2} for r in rows[:2]]), step)
    with pytest.raises(UserError, match=r"1 image\(s\) \(3 examples per epoch with their repeats\)"):
        check_step_fits(folder([{**rows[0], "repeats": 3}]), step)
