"""Rows from a local folder or a ModelScope dataset, and the rows file format."""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import pytest
from PIL import Image

from kolors_story.dataset import (
    collect_local_rows,
    copy_into_run,
    download_modelscope_dataset,
    read_rows,
    rows_from_records,
    write_rows,
)
from kolors_story.demo_data import build_demo_dataset
from kolors_story.errors import UserError


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("demo") / "images"
    build_demo_dataset(folder)
    return folder


def _image(path: Path, size=(8, 8), mode="RGB") -> Path:
    Image.new(mode, size).save(path)
    return path


def test_demo_folder_rows(demo_dir):
    rows = collect_local_rows(demo_dir, caption_template="{caption}，极简", default_caption="水墨画")
    names = sorted(p.name for p in demo_dir.glob("*.jpg"))
    assert [Path(r["image"]).name for r in rows] == names  # every file, broken ones too, sorted
    assert [r["id"] for r in rows] == [Path(n).stem for n in names]
    assert all(Path(r["image"]).is_absolute() for r in rows)
    by_id = {r["id"]: r for r in rows}
    sidecar = (demo_dir / "img_000.txt").read_text(encoding="utf-8").strip()
    assert by_id["img_000"]["text"] == f"{sidecar}，极简"
    assert by_id["img_023_nocap"]["text"] == "水墨画，极简"  # default caption for a missing sidecar


def test_caption_priority_jsonl_then_csv_then_sidecar(tmp_path):
    for stem in ("a", "b", "c"):
        _image(tmp_path / f"{stem}.png")
        (tmp_path / f"{stem}.txt").write_text(f"sidecar {stem}", encoding="utf-8")
    (tmp_path / "metadata.csv").write_text("file_name,text\na.png,csv a\nb.png,csv b\n", encoding="utf-8")
    rows = collect_local_rows(tmp_path)
    assert [r["text"] for r in rows] == ["csv a", "csv b", "sidecar c"]

    lines = [{"file_name": "a.png", "text": "jsonl 甲"}, {"file_name": "b.png", "text": ""}]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(x, ensure_ascii=False) for x in lines), encoding="utf-8")
    rows = collect_local_rows(tmp_path, default_caption="unused")
    # jsonl wins over csv; its empty text falls back to the sidecar.
    assert [r["text"] for r in rows] == ["jsonl 甲", "sidecar b", "sidecar c"]


def test_metadata_entry_without_file_is_still_a_row(tmp_path):
    _image(tmp_path / "here.jpg")
    (tmp_path / "metadata.csv").write_text("file_name,text\nhere.jpg,present\ngone.jpg,absent\n", encoding="utf-8")
    rows = collect_local_rows(tmp_path)
    assert [(r["id"], r["text"]) for r in rows] == [("gone", "absent"), ("here", "present")]
    assert not Path(rows[0]["image"]).exists()  # the filter drops and counts it


def test_ids_are_unique_and_non_images_ignored(tmp_path):
    _image(tmp_path / "a.jpg")
    _image(tmp_path / "a.png")
    _image(tmp_path / "b.WEBP")
    (tmp_path / "notes.md").write_text("not an image")
    (tmp_path / "sub").mkdir()
    _image(tmp_path / "sub" / "deep.jpg")
    rows = collect_local_rows(tmp_path, default_caption="x")
    assert [r["id"] for r in rows] == ["a", "a_2", "b"]


@pytest.mark.parametrize("template", ["no placeholder", "{}", "{caption} {style}", "{caption", "{0}"])
def test_bad_caption_template_names_the_key(tmp_path, template):
    _image(tmp_path / "a.jpg")
    with pytest.raises(UserError, match="dataset.caption_template"):
        collect_local_rows(tmp_path, caption_template=template)


def test_literal_braces_in_template(tmp_path):
    _image(tmp_path / "a.jpg")
    assert collect_local_rows(tmp_path, "{{ink}} {caption}", "山")[0]["text"] == "{ink} 山"


def test_missing_or_empty_folder_names_dataset_path(tmp_path):
    with pytest.raises(UserError, match="dataset.path"):
        collect_local_rows(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no images")
    with pytest.raises(UserError, match="dataset.path"):
        collect_local_rows(tmp_path / "empty")


def test_bad_metadata_files_are_named(tmp_path):
    _image(tmp_path / "a.jpg")
    (tmp_path / "metadata.csv").write_text("name,caption\na.jpg,x\n", encoding="utf-8")
    with pytest.raises(UserError, match="metadata.csv.*file_name"):
        collect_local_rows(tmp_path)
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "a.jpg"}\nnot json\n', encoding="utf-8")
    with pytest.raises(UserError, match="metadata.jsonl line 2"):
        collect_local_rows(tmp_path)


def test_copy_into_run_copies_bytes_and_keeps_missing_rows(demo_dir, tmp_path):
    rows = collect_local_rows(demo_dir, default_caption="x")
    rows.append({"id": "ghost", "image": str(tmp_path / "ghost.jpg"), "text": "gone"})
    copied = copy_into_run(rows, tmp_path / "run" / "images")
    assert [r["id"] for r in copied] == [r["id"] for r in rows]
    for before, after in zip(rows[:-1], copied[:-1]):
        assert Path(after["image"]).parent == (tmp_path / "run" / "images").resolve()
        assert Path(after["image"]).read_bytes() == Path(before["image"]).read_bytes()  # corrupt ones too
        assert after["text"] == before["text"]
    assert copied[-1] == rows[-1]  # missing: left for the filter to report


def test_rows_file_round_trip_keeps_chinese_readable(tmp_path):
    rows = [{"id": "1", "image": "/x/1.jpg", "text": "水墨画，山水"}, {"id": "2", "image": "/x/2.jpg", "text": 'a "quoted"\nline'}]
    path = write_rows(rows, tmp_path / "sub" / "rows.jsonl")
    assert "水墨画" in path.read_text(encoding="utf-8")
    assert len(path.read_text(encoding="utf-8").splitlines()) == 2
    assert read_rows(path) == rows


def test_read_rows_errors_name_the_file(tmp_path):
    with pytest.raises(UserError, match="missing.jsonl"):
        read_rows(tmp_path / "missing.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "1", "image": "x"}\n', encoding="utf-8")
    with pytest.raises(UserError, match=r"bad.jsonl line 1 lacks \['text'\]"):
        read_rows(bad)


def test_records_become_rgb_jpeg_rows(tmp_path):
    """The saving half of the ModelScope download, on the cell types datasets hand out."""
    png = io.BytesIO()
    Image.new("RGBA", (20, 10), (255, 0, 0, 128)).save(png, format="PNG")
    path_cell = _image(tmp_path / "gray.png", size=(12, 12), mode="L")
    records = [
        {"image": Image.new("P", (16, 16)), "caption": "一"},
        {"image": {"bytes": png.getvalue(), "path": None}, "caption": None},
        {"image": str(path_cell), "caption": "三"},
        {"image": Image.new("RGB", (4, 4)), "caption": "never saved"},
    ]
    rows = rows_from_records(records, tmp_path / "out", "image", "caption", "{caption}, anime", "二次元", max_images=3)
    assert [r["id"] for r in rows] == ["0", "1", "2"]
    assert [r["text"] for r in rows] == ["一, anime", "二次元, anime", "三, anime"]
    for row in rows:
        with Image.open(row["image"]) as img:
            assert img.format == "JPEG" and img.mode == "RGB"
    assert Image.open(rows[1]["image"]).size == (20, 10)
    assert not (tmp_path / "out" / "3.jpg").exists()


def test_records_without_the_image_column(tmp_path):
    with pytest.raises(UserError, match="'picture'"):
        rows_from_records([{"image": Image.new("RGB", (4, 4))}], tmp_path, "picture", None, "{caption}", "x", None)


def test_modelscope_offline_fails_fast_with_a_fix(tmp_path):
    """No hub here: a clear UserError well within 60 s, not a retry loop."""
    started = time.monotonic()
    with pytest.raises(UserError) as info:
        download_modelscope_dataset(
            "kolors-story-tests/no-such-dataset", None, "train", tmp_path / "images", None, "{caption}", "二次元", 2, tmp_path / "cache"
        )
    elapsed = time.monotonic() - started
    message = str(info.value)
    assert "kolors-story-tests/no-such-dataset" in message
    assert "dataset.source: local" in message and "dataset.path" in message
    assert elapsed < 60, f"took {elapsed:.0f} s"
    assert not (tmp_path / "images").exists() or not any((tmp_path / "images").iterdir())


# ---------------------------------------------------------------- every download failure is a UserError

CLOSED_ENDPOINT = "http://127.0.0.1:9"  # discard port: nothing listens, connections are refused at once


@pytest.fixture
def closed_endpoint(monkeypatch):
    """MODELSCOPE_ENDPOINT at a closed local port, read afresh: the hub client caches its config
    per process, so that cache is cleared here and restored by monkeypatch afterwards."""
    import modelscope_hub.config

    monkeypatch.setenv("MODELSCOPE_ENDPOINT", CLOSED_ENDPOINT)
    monkeypatch.setattr(modelscope_hub.config, "_default_config", None)
    return CLOSED_ENDPOINT


def _download(tmp_path, dataset_id="AI-ModelScope/lowres_anime"):
    return download_modelscope_dataset(
        dataset_id, "default", "train", tmp_path / "images", None, "{caption}", "二次元", 2, tmp_path / "cache"
    )


def _assert_names_id_and_fix(message: str, dataset_id="AI-ModelScope/lowres_anime"):
    assert repr(dataset_id) in message
    assert "dataset.source: local" in message and "dataset.path" in message


def test_preflight_uses_the_endpoint_the_download_uses(closed_endpoint, tmp_path):
    """MODELSCOPE_ENDPOINT moves MsDataset.load, so it moves the connection check too."""
    from kolors_story.dataset import _hub_endpoint

    assert _hub_endpoint() == closed_endpoint
    started = time.monotonic()
    with pytest.raises(UserError) as info:
        _download(tmp_path)
    assert time.monotonic() - started < 10
    message = str(info.value)
    _assert_names_id_and_fix(message)
    assert f"cannot connect to {closed_endpoint}" in message


def test_real_msdataset_load_failure_becomes_user_error(closed_endpoint, tmp_path, monkeypatch):
    """Without the preflight the real MsDataset.load runs against the closed port (~15 s of retries)."""
    import kolors_story.dataset as dataset_module

    monkeypatch.setattr(dataset_module, "_offline_reason", lambda: None)
    started = time.monotonic()
    with pytest.raises(UserError) as info:
        _download(tmp_path)
    assert time.monotonic() - started < 60
    _assert_names_id_and_fix(str(info.value))
    assert isinstance(info.value.__cause__, OSError)  # modelscope_hub's NetworkError
    assert "127.0.0.1" in str(info.value)


@pytest.mark.parametrize(
    "error",
    [
        ValueError("Unknown split 'train'. Should be one of ['validation']."),
        KeyError("Data"),
        TypeError("exceptions must derive from BaseException"),  # modelscope raises plain strings
        RuntimeError("fsspec: unexpected end of stream"),
        FileNotFoundError("dataset_infos.json"),
        ModuleNotFoundError("No module named 'oss2'", name="oss2"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_any_download_exception_becomes_user_error(tmp_path, monkeypatch, error):
    import kolors_story.dataset as dataset_module

    def broken_load(*args, **kwargs):
        raise error

    monkeypatch.setattr(dataset_module, "_offline_reason", lambda: None)
    monkeypatch.setattr(dataset_module, "_msdataset_load", broken_load)
    with pytest.raises(UserError) as info:
        _download(tmp_path, "owner/some-dataset")
    message = str(info.value)
    _assert_names_id_and_fix(message, "owner/some-dataset")
    assert type(error).__name__ in message and info.value.__cause__ is error
    if isinstance(error, ImportError):
        assert "make env" in message


def test_download_arguments_reach_msdataset_load(tmp_path, monkeypatch):
    import kolors_story.dataset as dataset_module

    calls = []

    def fake_load(dataset_id, subset, split, cache_dir):
        calls.append((dataset_id, subset, split, cache_dir))
        return [{"image": Image.new("RGB", (4, 4))}]

    monkeypatch.setattr(dataset_module, "_offline_reason", lambda: None)
    monkeypatch.setattr(dataset_module, "_msdataset_load", fake_load)
    rows = _download(tmp_path)
    assert calls == [("AI-ModelScope/lowres_anime", "default", "train", tmp_path / "cache")]
    assert [r["text"] for r in rows] == ["二次元"]
