"""Rows from a local folder or a ModelScope dataset, and the rows file format."""

from __future__ import annotations

import codecs
import io
import json
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import ExifTags, Image

from kolors_story.data.rows import SourceReport, read_rows, write_rows
from kolors_story.data.local_folder import collect_local, collect_local_rows, copy_into_run, scan_local_folder
from kolors_story.data.text_files import decode_text
from kolors_story.data.modelscope_dataset import download_modelscope_dataset, rows_from_records
from kolors_story.data.demo_data import build_demo_dataset
from kolors_story.errors import UserError
from kolors_story.data.images import WHITE, parse_background


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


def test_metadata_entries_without_a_file_are_dropped_and_counted(tmp_path):
    """Missing, listed twice, outside the folder, differing in case: each dropped with its line
    and reason; the other rows stay, and the first entry of a name is the one used."""
    _image(tmp_path / "here.jpg")
    _image(tmp_path / "Case.jpg")
    _image(tmp_path / "other.jpg")
    (tmp_path / "metadata.csv").write_text(
        "file_name,text\nhere.jpg,present\ngone.jpg,absent\nhere.jpg,again\n../up.jpg,escape\ncase.jpg,lower\n",
        encoding="utf-8",
    )
    rows, report = scan_local_folder(tmp_path)
    assert [(r["id"], r["text"]) for r in rows] == [("Case", ""), ("here", "present"), ("other", "")]
    dropped = {d["where"]: d["reason"] for d in report.dropped}
    assert dropped == {
        "metadata.csv line 3": "gone.jpg is not in the folder",
        "metadata.csv line 4": "here.jpg is listed again (first at metadata.csv line 2)",
        "metadata.csv line 5": "../up.jpg is outside dataset.path",
        "metadata.csv line 6": "case.jpg is not in the folder (Case.jpg differs only in case)",
    }
    assert report.as_dict(len(rows))["counts"]["dropped"] == 4


def test_duplicate_names_in_metadata_jsonl_keep_the_first(tmp_path):
    _image(tmp_path / "a.png")
    lines = [{"file_name": "a.png", "text": "first"}, {"file_name": "./a.png", "text": "second"}]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(x) for x in lines), encoding="utf-8")
    rows, report = scan_local_folder(tmp_path)
    assert [r["text"] for r in rows] == ["first"]
    assert report.dropped == [{"file": "a.png", "where": "metadata.jsonl line 2", "reason": "a.png is listed again (first at metadata.jsonl line 1)"}]


def test_only_metadata_entries_for_missing_files_is_a_clear_error(tmp_path):
    (tmp_path / "metadata.csv").write_text("file_name,text\ngone.jpg,x\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"dataset.path.*holds no images.*metadata.csv line 2: gone.jpg is not in the folder"):
        scan_local_folder(tmp_path)


def test_ids_are_unique_and_non_images_ignored(tmp_path):
    _image(tmp_path / "a.jpg")
    _image(tmp_path / "a.png")
    _image(tmp_path / "b.WEBP")
    (tmp_path / "notes.md").write_text("not an image")
    (tmp_path / "sub").mkdir()
    _image(tmp_path / "sub" / "deep.jpg")
    _image(tmp_path / "sub" / "a.jpg")
    rows = collect_local_rows(tmp_path, default_caption="x")
    assert [r["id"] for r in rows] == ["a", "a_2", "b", "a_3", "deep"]  # subfolders too, in path order
    assert [r["source"] for r in rows][-2:] == ["sub/a.jpg", "sub/deep.jpg"]


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
    broken = {"img_030_corrupt", "img_031_truncated", "ghost"}
    for before, after in zip(rows, copied):
        if before["id"] in broken:  # not stored: left at the original path for the filter to report
            assert after == before
            continue
        assert Path(after["image"]).parent == (tmp_path / "run" / "images").resolve()
        assert Path(after["image"]).read_bytes() == Path(before["image"]).read_bytes()
        assert after["text"] == before["text"]
    assert sorted(p.stem for p in (tmp_path / "run" / "images").iterdir()) == sorted(r["id"] for r in rows if r["id"] not in broken)


def test_files_the_filter_drops_as_broken_leave_no_copy_in_the_run(demo_dir, tmp_path, monkeypatch):
    """Huge (over Pillow's pixel limit, lowered here instead of writing 2 GB), truncated and
    undecodable files are not copied into the download's images/: the filter drops them all
    from their original path with the reason, and images/ holds only what it can keep."""
    from kolors_story.data.filtering import filter_rows

    folder = tmp_path / "src"
    folder.mkdir()
    for name in ("img_000.jpg", "img_030_corrupt.jpg", "img_031_truncated.jpg"):
        (folder / name).write_bytes((demo_dir / name).read_bytes())
    _save(Image.new("RGB", (200, 200), (1, 2, 3)), folder / "huge.jpg")
    _save(Image.new("RGB", (200, 200), (1, 2, 3)), folder / "huge.png")
    with Image.open(folder / "img_000.jpg") as img:
        assert img.width * img.height < 30_000
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 30_000)  # 200 x 200 is between 1x and 2x: a warning only
    rows, report = collect_local(folder, tmp_path / "images", "{caption}", "x", None)
    assert [p.name for p in (tmp_path / "images").iterdir()] == ["img_000.jpg"]
    assert _entry(report, "huge.jpg")["stored"].startswith("not stored: too large")
    assert _entry(report, "img_031_truncated.jpg")["stored"].startswith("not stored: cannot decode")
    result = filter_rows(rows, [], tmp_path / "work")
    assert [r["id"] for r in result.kept] == ["img_000"]
    assert {d["source"] for d in result.stats["dropped"]} == {"huge.jpg", "huge.png", "img_030_corrupt.jpg", "img_031_truncated.jpg"}


def test_rows_file_round_trip_keeps_chinese_readable(tmp_path):
    rows = [{"id": "1", "image": "/x/1.jpg", "text": "水墨画，山水"}, {"id": "2", "image": "/x/2.jpg", "text": 'a "quoted"\nline'}]
    path = write_rows(rows, tmp_path / "sub" / "rows.jsonl")
    assert "水墨画" in path.read_text(encoding="utf-8")
    assert len(path.read_text(encoding="utf-8").splitlines()) == 2
    assert read_rows(path) == rows


def test_rows_files_store_relative_paths_that_survive_a_move(tmp_path, monkeypatch):
    """data/rows.jsonl names images relative to itself: a moved or shared results/ stays valid."""
    data = tmp_path / "results" / "run" / "data"
    (data / "images").mkdir(parents=True)
    _image(data / "images" / "a.png")
    monkeypatch.chdir(tmp_path)  # as Snakemake passes them: paths relative to the working directory
    write_rows([{"id": "a", "image": "results/run/data/images/a.png", "text": "x"}], Path("results/run/data/rows.jsonl"))
    stored = json.loads((data / "rows.jsonl").read_text(encoding="utf-8"))
    assert stored["image"] == "images/a.png"
    (tmp_path / "results").rename(tmp_path / "moved")
    (row,) = read_rows(tmp_path / "moved" / "run" / "data" / "rows.jsonl")
    assert Path(row["image"]).is_absolute() and Path(row["image"]).is_file()
    old = tmp_path / "old.jsonl"  # rows files of earlier versions hold absolute paths: still read
    old.write_text(json.dumps({"id": "a", "image": row["image"], "text": "x"}) + "\n", encoding="utf-8")
    assert read_rows(old)[0]["image"] == row["image"]


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

# closed_endpoint: tests/conftest.py


def _download(tmp_path, dataset_id="AI-ModelScope/lowres_anime"):
    return download_modelscope_dataset(
        dataset_id, "default", "train", tmp_path / "images", None, "{caption}", "二次元", 2, tmp_path / "cache"
    )


def _assert_names_id_and_fix(message: str, dataset_id="AI-ModelScope/lowres_anime"):
    assert repr(dataset_id) in message
    assert "dataset.source: local" in message and "dataset.path" in message


def test_preflight_uses_the_endpoint_the_download_uses(closed_endpoint, tmp_path):
    """MODELSCOPE_ENDPOINT moves MsDataset.load, so it moves the connection check too."""
    from kolors_story.data.modelscope_dataset import _hub_endpoint

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
    import kolors_story.data.modelscope_dataset as dataset_module

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
    import kolors_story.data.modelscope_dataset as dataset_module

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
    import kolors_story.data.modelscope_dataset as dataset_module

    calls = []

    def fake_load(dataset_id, subset, split, cache_dir):
        calls.append((dataset_id, subset, split, cache_dir))
        return [{"image": Image.new("RGB", (4, 4))}]

    monkeypatch.setattr(dataset_module, "_offline_reason", lambda: None)
    monkeypatch.setattr(dataset_module, "_msdataset_load", fake_load)
    rows = _download(tmp_path)
    assert calls == [("AI-ModelScope/lowres_anime", "default", "train", tmp_path / "cache")]
    assert [r["text"] for r in rows] == ["二次元"]


# ---------------------------------------------------------------- datasets as people have them

CAPTION = "水墨画，山水，ink style"

ENCODED = {  # bytes as editors on Windows, macOS and Linux save them -> the encoding reported
    "utf-8": (CAPTION.encode("utf-8"), "utf-8"),
    "utf-8-sig": (codecs.BOM_UTF8 + CAPTION.encode("utf-8"), "utf-8 (BOM)"),
    "gbk": (CAPTION.encode("gbk"), "gb18030"),
    "gb18030": ((CAPTION + "，𠀀").encode("gb18030"), "gb18030"),  # a four-byte GB18030 character
    "utf-16-le-bom": (codecs.BOM_UTF16_LE + CAPTION.encode("utf-16-le"), "utf-16-le (BOM)"),
    "utf-16-be-bom": (codecs.BOM_UTF16_BE + CAPTION.encode("utf-16-be"), "utf-16-be (BOM)"),
    "utf-16-le": (CAPTION.encode("utf-16-le"), "utf-16-le (no BOM)"),  # holds ASCII, so its NULs tell
}


@pytest.mark.parametrize("kind", sorted(ENCODED))
def test_sidecar_captions_in_every_common_encoding(tmp_path, kind):
    data, encoding = ENCODED[kind]
    _image(tmp_path / "a.jpg")
    newline = "\r\n".encode({"utf-16-le-bom": "utf-16-le", "utf-16-be-bom": "utf-16-be", "utf-16-le": "utf-16-le"}.get(kind, "ascii"))
    (tmp_path / "a.txt").write_bytes(data + newline)
    rows, report = scan_local_folder(tmp_path)
    expected = CAPTION + ("，𠀀" if kind == "gb18030" else "")
    assert rows[0]["text"] == expected
    assert _entry(report, "a.txt") == {"file": "a.txt", "use": "caption", "encoding": encoding}
    assert _entry(report, "a.jpg")["caption"] == "a.txt"


@pytest.mark.parametrize("kind", ["utf-8-sig", "gbk", "utf-16-le-bom"])
def test_metadata_csv_and_jsonl_in_other_encodings(tmp_path, kind):
    data, encoding = ENCODED[kind]
    codec = {"utf-8-sig": "utf-8", "gbk": "gbk", "utf-16-le-bom": "utf-16-le"}[kind]
    bom = data[: len(data) - len(CAPTION.encode(codec))]
    _image(tmp_path / "a.jpg")
    csv_text = f'file_name,text\r\na.jpg,"{CAPTION}"\r\n'
    (tmp_path / "metadata.csv").write_bytes(bom + csv_text.encode(codec))
    rows, report = scan_local_folder(tmp_path)
    assert rows[0]["text"] == CAPTION
    assert _entry(report, "metadata.csv") == {"file": "metadata.csv", "use": "metadata", "encoding": encoding, "entries": 1}
    jsonl = json.dumps({"file_name": "a.jpg", "text": CAPTION}, ensure_ascii=False) + "\n"
    (tmp_path / "metadata.jsonl").write_bytes(bom + jsonl.encode(codec))
    rows, report = scan_local_folder(tmp_path)
    assert rows[0]["text"] == CAPTION and _entry(report, "metadata.jsonl")["encoding"] == encoding
    assert _entry(report, "metadata.csv")["use"] == "skipped"  # only one metadata file is read


@pytest.mark.parametrize(
    "data, why",
    [
        ("café au lait".encode("cp1252"), "neither UTF-8 nor GB18030"),  # a Western legacy encoding
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "NUL bytes"),  # binary saved as .txt
        (codecs.BOM_UTF8 + b"\xff\xfe bad", "not valid utf-8 (BOM)"),  # a BOM that lies
        (b"caption\x07 with a bell", "control characters"),
        ("\ue000\ue001".encode("gb18030"), "unassigned characters"),  # GBK user-defined area: no text
    ],
    ids=["cp1252", "binary", "bad-bom", "control", "private-use"],
)
def test_undecodable_captions_name_the_file_and_the_fix(tmp_path, data, why):
    _image(tmp_path / "a.jpg")
    (tmp_path / "a.txt").write_bytes(data)
    with pytest.raises(UserError) as info:
        scan_local_folder(tmp_path)
    message = str(info.value)
    assert str(tmp_path / "a.txt") in message and why in message
    assert "Re-save the file as UTF-8" in message


def test_decode_prefers_utf8_then_gb18030():
    """Bytes valid as both: UTF-8 wins (it is tried first, and valid UTF-8 is rarely anything else)."""
    both = "水墨画，山水".encode("utf-8")
    assert both.decode("gb18030") == "姘村ⅷ鐢伙紝灞辨按"  # what GB18030 would make of it: mojibake
    assert decode_text(both, Path("x.txt")) == ("水墨画，山水", "utf-8")


def _entry(report: SourceReport, name: str) -> dict:
    (entry,) = [e for e in report.files if e["file"] == name]
    return entry


def _save(img: Image.Image, path: Path, **kwargs) -> Path:
    img.save(path, **kwargs)
    return path


@pytest.fixture
def mixed_folder(tmp_path) -> Path:
    """One file of every kind a real folder brings."""
    folder = tmp_path / "mixed"
    folder.mkdir()
    _save(Image.new("RGB", (16, 12), (10, 200, 30)), folder / "tiff.tif")
    _save(Image.new("RGB", (16, 12), (10, 200, 30)), folder / "bitmap.bmp")
    _save(Image.new("RGB", (16, 12), (10, 200, 30)), folder / "web.webp", lossless=True)
    frames = [Image.new("P", (8, 8), 1), Image.new("P", (8, 8), 2)]
    frames[0].putpalette([0, 0, 0, 255, 0, 0, 0, 0, 255] + [0] * 759)
    frames[1].putpalette([0, 0, 0, 255, 0, 0, 0, 0, 255] + [0] * 759)
    frames[0].save(folder / "anim.gif", save_all=True, append_images=frames[1:])
    sixteen = np.array([[0, 32768, 65535, 257]], dtype=np.uint16).repeat(4, axis=0)
    _save(Image.fromarray(sixteen), folder / "deep.png")
    palette = Image.new("P", (4, 4), 0)
    palette.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    palette.putpixel((0, 0), 1)
    _save(palette, folder / "pal.png", transparency=0)  # index 0 (black) is transparent
    _save(Image.new("CMYK", (8, 8), (0, 200, 200, 0)), folder / "cmyk.jpg")
    _save(Image.new("LA", (8, 8), (90, 0)), folder / "la.png")
    _save(Image.new("RGB", (8, 8), (1, 2, 3)), folder / "noext", format="PNG")  # Pillow knows it anyway
    (folder / "notes.md").write_text("not an image", encoding="utf-8")
    (folder / "orphan.txt").write_text("no image is called orphan", encoding="utf-8")
    (folder / "tiff.txt").write_text("一张 tiff 图", encoding="gbk")
    (folder / "sub").mkdir()
    return folder


def test_every_file_is_accounted_for(mixed_folder, tmp_path):
    rows, report = collect_local(mixed_folder, tmp_path / "images", "{caption}", "dflt", None)
    uses = {e["file"]: e["use"] for e in report.files}
    assert uses == {
        "anim.gif": "image", "bitmap.bmp": "image", "cmyk.jpg": "image", "deep.png": "image", "la.png": "image",
        "noext": "image", "pal.png": "image", "tiff.tif": "image", "web.webp": "image",
        "tiff.txt": "caption", "notes.md": "skipped", "orphan.txt": "skipped", "sub/": "skipped",
    }
    assert sorted(p.name for p in mixed_folder.iterdir()) == sorted(n.rstrip("/") for n in uses)
    assert "not an image" in _entry(report, "notes.md")["reason"] and "a folder" in _entry(report, "sub/")["reason"]
    assert _entry(report, "tiff.txt")["encoding"] == "gb18030"
    assert {r["id"]: r["text"] for r in rows}["tiff"] == "一张 tiff 图"
    assert _entry(report, "tiff.tif")["stored"] == "converted from TIFF RGB to RGB PNG"
    assert _entry(report, "anim.gif")["stored"] == "converted from GIF P, frame 1 of 2 to RGB PNG"
    summary = report.as_dict(len(rows))
    assert summary["counts"] == {"image": 9, "caption": 1, "metadata": 0, "skipped": 3, "dropped": 0}
    json.dumps(summary)  # what download_stats.json holds
    assert str(tmp_path) not in json.dumps(summary)  # no absolute path
    for row in rows:
        with Image.open(row["image"]) as img:
            assert img.mode == "RGB" and img.format == "PNG", row["id"]
    pixels = {r["id"]: np.asarray(Image.open(r["image"])) for r in rows}
    assert pixels["deep"][0, :, 0].tolist() == [0, 128, 255, 1]  # 16-bit scaled, not clipped to 255
    assert pixels["pal"][0, 0].tolist() == [10, 20, 30] and pixels["pal"][1, 1].tolist() == [255, 255, 255]
    assert pixels["la"][0, 0].tolist() == [255, 255, 255]  # fully transparent gray -> the background
    assert pixels["anim"][0, 0].tolist() == [255, 0, 0]  # the first frame
    r, g, b = pixels["cmyk"][2, 2]
    assert r > 150 and g < 120 and b < 120


def test_transparency_is_composited_on_the_configured_background(tmp_path):
    rgba = Image.new("RGBA", (4, 4), (0, 0, 0, 0))  # black under fully transparent pixels
    rgba.putpixel((0, 0), (0, 0, 255, 255))
    rgba.putpixel((1, 0), (0, 0, 0, 128))
    (tmp_path / "src").mkdir()
    _save(rgba, tmp_path / "src" / "t.png")
    for background, expected in [(WHITE, [255, 255, 255]), (parse_background("#ff0000"), [255, 0, 0])]:
        rows, _ = collect_local(tmp_path / "src", tmp_path / f"out{expected[1]}", "{caption}", "x", None, background)
        pixels = np.asarray(Image.open(rows[0]["image"]))
        assert pixels[3, 3].tolist() == expected
        assert pixels[0, 0].tolist() == [0, 0, 255]
        assert pixels[0, 1].tolist() == [round(v * 127 / 255) for v in expected]  # half black over the background


def test_background_names_the_key():
    assert parse_background("white") == (255, 255, 255) and parse_background("#102030") == (16, 32, 48)
    with pytest.raises(UserError, match="dataset.background 'whte'"):
        parse_background("whte")


def _jpeg_with_orientation(path: Path, orientation: int) -> Path:
    img = Image.new("RGB", (20, 10), (200, 10, 10))
    img.paste((10, 10, 200), (0, 0, 5, 10))  # a blue left edge shows which way is up
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = orientation
    img.save(path, exif=exif.tobytes())
    return path


def test_exif_orientation_is_applied_and_plain_jpegs_are_copied(tmp_path):
    folder = tmp_path / "src"
    folder.mkdir()
    _jpeg_with_orientation(folder / "turned.jpg", 6)  # shown rotated 90 degrees clockwise
    _jpeg_with_orientation(folder / "upright.jpg", 1)
    rows, report = collect_local(folder, tmp_path / "images", "{caption}", "x", None)
    by_id = {r["id"]: r for r in rows}
    with Image.open(by_id["turned"]["image"]) as img:
        assert img.size == (10, 20) and img.format == "PNG"
        top = np.asarray(img.convert("RGB"))[1, 5]
        assert top[2] > 150 and top[0] < 80  # the left edge is now at the top
    assert Path(by_id["upright"]["image"]).read_bytes() == (folder / "upright.jpg").read_bytes()
    assert _entry(report, "upright.jpg")["stored"] == "copied"


@pytest.mark.parametrize("limit_factor", [0.75, 0.4], ids=["over-the-limit-warning", "over-twice-the-limit-error"])
def test_huge_images_are_dropped_with_the_reason_and_take_no_other_row(tmp_path, monkeypatch, limit_factor):
    """Pillow's decompression-bomb limit, lowered here instead of writing a huge file."""
    from kolors_story.data.filtering import filter_rows

    folder = tmp_path / "src"
    folder.mkdir()
    _save(Image.new("RGB", (100, 100), (1, 2, 3)), folder / "huge.png")
    _save(Image.new("RGB", (100, 100), (1, 2, 3)), folder / "huge.jpg")
    _save(Image.new("RGB", (20, 20), (1, 2, 3)), folder / "small.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", int(100 * 100 * limit_factor))
    rows, report = collect_local(folder, tmp_path / "images", "{caption}", "x", None)
    assert [r["id"] for r in rows] == ["huge", "huge_2", "small"]  # stored; the filter decides
    assert _entry(report, "huge.png")["stored"].startswith("not stored: too large")
    result = filter_rows(rows, [], tmp_path / "work")
    assert [r["id"] for r in result.kept] == ["small"]
    reasons = {d["id"]: d["reason"] for d in result.stats["dropped"]}
    assert set(reasons) == {"huge", "huge_2"}
    assert all(r.startswith("too large") and "MAX_IMAGE_PIXELS" in r for r in reasons.values())


def test_max_images_is_accounted_for(tmp_path):
    for stem in "abc":
        _image(tmp_path / f"{stem}.png")
    rows, report = scan_local_folder(tmp_path, max_images=2)
    assert [r["id"] for r in rows] == ["a", "b"]
    assert _entry(report, "c.png") == {"file": "c.png", "use": "skipped", "reason": "over dataset.max_images (2)"}


def test_download_stats_hold_no_absolute_paths_even_for_broken_files(tmp_path):
    folder = tmp_path / "src"
    folder.mkdir()
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    _image(folder / "ok.png")
    rows, report = collect_local(folder, tmp_path / "images", "{caption}", "x", None)
    text = json.dumps(report.as_dict(len(rows)))
    assert "broken.png" in text and str(tmp_path) not in text


def test_records_that_do_not_decode_are_dropped_and_counted(tmp_path):
    rgba = io.BytesIO()
    Image.new("RGBA", (6, 6), (0, 0, 0, 0)).save(rgba, format="PNG")
    records = [
        {"image": {"bytes": b"not an image", "path": None}},
        {"image": {"bytes": rgba.getvalue(), "path": None}},
        {"image": str(tmp_path / "gone.png")},
        {"image": Image.new("RGB", (4, 4))},
    ]
    report = SourceReport("modelscope")
    rows = rows_from_records(records, tmp_path / "out", "image", None, "{caption}", "x", None, report=report)
    assert [r["id"] for r in rows] == ["1", "3"]
    assert [d["record"] for d in report.dropped] == [0, 2]
    assert all(d["reason"].startswith("cannot decode image") for d in report.dropped)
    assert "0x" not in json.dumps(report.dropped) and str(tmp_path) not in json.dumps(report.dropped)
    assert np.asarray(Image.open(rows[0]["image"]))[0, 0].tolist() == [255, 255, 255]  # on the background


# ---------------------------------------------------------------- the user's own caption on every row


def test_local_rows_carry_the_users_caption_and_where_it_came_from(tmp_path):
    for stem in ("a", "b", "c"):
        _image(tmp_path / f"{stem}.png")
    (tmp_path / "metadata.csv").write_text("file_name,text\na.png,  甲 山水 \n", encoding="utf-8")
    (tmp_path / "b.txt").write_text("\n 乙 \n", encoding="utf-8")
    rows = collect_local_rows(tmp_path, caption_template="ink, {caption}", default_caption="水墨画")
    fields = [(r["caption"], r["caption_from"], r["text"]) for r in rows]
    assert fields == [
        ("甲 山水", "metadata.csv line 2", "ink, 甲 山水"),
        ("乙", "b.txt", "ink, 乙"),
        ("", "dataset.default_caption", "ink, 水墨画"),  # the default is never the user's caption
    ]


def test_modelscope_rows_carry_the_users_caption_and_the_column(tmp_path):
    records = [{"image": Image.new("RGB", (4, 4)), "prompt": " 一 "}, {"image": Image.new("RGB", (4, 4)), "prompt": None}]
    rows = rows_from_records(records, tmp_path / "out", "image", "prompt", "{caption}, anime", "二次元", None)
    assert [(r["caption"], r["caption_from"], r["text"]) for r in rows] == [
        ("一", "prompt", "一, anime"), ("", "dataset.default_caption", "二次元, anime")]
    no_column = rows_from_records(records[:1], tmp_path / "out2", "image", None, "{caption}", "二次元", None)
    assert (no_column[0]["caption"], no_column[0]["caption_from"]) == ("", "dataset.default_caption")


# ---------------------------------------------------------------- folders as trainers lay them out


@pytest.fixture
def kohya_folder(tmp_path) -> Path:
    """kohya sd-scripts' layout: <repeats>_<name>/ folders with .txt / .caption sidecars, plus the
    clutter real folders bring (hidden files and folders, a plain subfolder, a 0-repeats folder)."""
    root = tmp_path / "img"
    for rel in ("10_mystyle/a.png", "10_mystyle/b.png", "10_mystyle/c.png", "10_mystyle/deeper/d.png",
                "1_reg/a.png", "0_off/x.png", "plain/e.png", "top.png", ".git/objects/f.png", "10_mystyle/.g.png"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        _image(root / rel)
    (root / "10_mystyle" / "a.txt").write_text("甲", encoding="utf-8")
    (root / "10_mystyle" / "b.caption").write_text(" 乙 \n", encoding="utf-8")
    (root / "10_mystyle" / "c.txt").write_text("丙 txt", encoding="utf-8")
    (root / "10_mystyle" / "c.caption").write_text("丙 caption", encoding="utf-8")
    (root / "plain" / "e.txt").write_text("戊", encoding="utf-8")
    (root / "plain" / "metadata.csv").write_text("file_name,text\ne.png,never read\n", encoding="utf-8")
    (root / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (root / "empty").mkdir()
    return root


def _every_file_under(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def test_kohya_folders_rows_repeats_and_sidecars(kohya_folder):
    rows, report = scan_local_folder(kohya_folder, caption_template="ink, {caption}", default_caption="水墨画")
    got = [(r["id"], r["source"], r.get("repeats"), r["caption"], r["caption_from"]) for r in rows]
    assert got == [
        ("a", "10_mystyle/a.png", 10, "甲", "10_mystyle/a.txt"),
        ("b", "10_mystyle/b.png", 10, "乙", "10_mystyle/b.caption"),
        ("c", "10_mystyle/c.png", 10, "丙 txt", "10_mystyle/c.txt"),  # .txt wins over .caption
        ("d", "10_mystyle/deeper/d.png", 10, "", "dataset.default_caption"),  # inherits its folder's repeats
        ("a_2", "1_reg/a.png", 1, "", "dataset.default_caption"),
        ("e", "plain/e.png", None, "戊", "plain/e.txt"),  # a plain folder: no repeats field
        ("top", "top.png", None, "", "dataset.default_caption"),
    ]
    assert [r["text"] for r in rows][:2] == ["ink, 甲", "ink, 乙"] and rows[3]["text"] == "ink, 水墨画"
    uses = {e["file"]: e for e in report.files}
    assert uses["10_mystyle/c.caption"]["reason"] == "10_mystyle/c.txt is read instead (a .txt sidecar wins over .caption)"
    assert uses["10_mystyle/b.caption"] == {"file": "10_mystyle/b.caption", "use": "caption", "encoding": "utf-8"}
    assert uses["0_off/"]["use"] == "skipped" and "0 repeats" in uses["0_off/"]["reason"]
    assert uses[".git/"]["reason"].startswith("hidden") and uses["10_mystyle/.g.png"]["reason"].startswith("hidden")
    assert uses[".DS_Store"]["reason"].startswith("hidden") and uses["empty/"]["reason"] == "a folder with no files"
    assert "only the one in dataset.path is read" in uses["plain/metadata.csv"]["reason"]
    assert uses["10_mystyle/"] == {"file": "10_mystyle/", "use": "folder", "repeats": 10, "images": 3, "examples_per_epoch": 30}
    assert uses["10_mystyle/deeper/"]["examples_per_epoch"] == 10 and uses["plain/"]["repeats"] == 1
    assert uses["10_mystyle/a.png"]["repeats"] == 10 and "repeats" not in uses["top.png"]
    # Every file is accounted for: by its own entry or by the skipped folder it is in.
    skipped_folders = tuple(n for n, e in uses.items() if n.endswith("/") and e["use"] == "skipped")
    accounted = {n for n in _every_file_under(kohya_folder) if n in uses or n.startswith(skipped_folders)}
    assert accounted == _every_file_under(kohya_folder)


def test_metadata_lists_files_in_subfolders_with_their_repeats(kohya_folder):
    (kohya_folder / "metadata.csv").write_text(
        "file_name,text\n10_mystyle/b.png,from metadata\n0_off/x.png,off\n", encoding="utf-8")
    rows, report = scan_local_folder(kohya_folder)
    by_source = {r["source"]: r for r in rows}
    assert by_source["10_mystyle/b.png"]["caption_from"] == "metadata.csv line 2"
    assert by_source["10_mystyle/b.png"]["repeats"] == 10
    assert "0_off/x.png" not in by_source
    assert report.dropped == [{"file": "0_off/x.png", "where": "metadata.csv line 3",
                               "reason": "0_off/x.png is in a 0-repeats folder (kohya's <repeats>_<name> form): not used"}]
    assert {e["file"]: e for e in report.files}["10_mystyle/b.caption"]["use"] == "skipped"  # metadata gave the caption


def test_nested_images_are_stored_in_the_run_by_their_unique_ids(kohya_folder, tmp_path):
    rows, report = collect_local(kohya_folder, tmp_path / "run", "{caption}", "x", None)
    stored = sorted(Path(r["image"]).name for r in rows)
    assert stored == ["a.png", "a_2.png", "b.png", "c.png", "d.png", "e.png", "top.png"]
    assert all(e.get("stored") for e in report.files if e["use"] == "image")
    json.dumps(report.as_dict(len(rows)))


def test_a_link_back_into_the_dataset_is_not_searched_twice(tmp_path):
    _image(tmp_path / "a.png")
    (tmp_path / "sub").mkdir()
    _image(tmp_path / "sub" / "b.png")
    (tmp_path / "sub" / "loop").symlink_to(tmp_path, target_is_directory=True)
    rows, report = scan_local_folder(tmp_path)
    assert [r["source"] for r in rows] == ["a.png", "sub/b.png"]
    assert {e["file"]: e.get("reason") for e in report.files}["sub/loop/"] == "a link to a folder already searched"


def test_an_unreadable_subfolder_is_reported_not_fatal(tmp_path, monkeypatch):
    """A folder without read permission (faked: the tests may run as root, who reads anything)."""
    _image(tmp_path / "a.png")
    (tmp_path / "locked").mkdir()
    _image(tmp_path / "locked" / "b.png")
    iterdir = Path.iterdir

    def no_permission(self):
        if self.name == "locked":
            raise PermissionError(13, "Permission denied", str(self))
        return iterdir(self)

    monkeypatch.setattr(Path, "iterdir", no_permission)
    rows, report = scan_local_folder(tmp_path)
    assert [r["source"] for r in rows] == ["a.png"]
    assert {e["file"]: e.get("reason") for e in report.files}["locked/"] == "cannot be listed (Permission denied)"


@pytest.mark.parametrize("blank", [b"", b"  \t ", b"\r\n\r\n", "\u3000 \u3000\r\n".encode("utf-8")])
def test_a_blank_caption_file_is_warned_about_and_reported_as_unused(tmp_path, caplog, blank):
    """A sidecar of whitespace only (spaces, tabs, CRLF, the ideographic space U+3000) gives the
    default caption, as before, but says so: a warning naming the file, and the report's entries
    say what the image used and why the file was not."""
    _image(tmp_path / "a.jpg")
    (tmp_path / "a.txt").write_bytes(blank)
    with caplog.at_level("WARNING"):
        rows, report = scan_local_folder(tmp_path, default_caption="水墨画")
    assert (rows[0]["text"], rows[0]["caption"], rows[0]["caption_from"]) == ("水墨画", "", "dataset.default_caption")
    assert "caption file a.txt is blank" in caplog.text and "a.jpg trains on dataset.default_caption" in caplog.text
    assert _entry(report, "a.jpg")["caption"] == "dataset.default_caption (blank caption file a.txt)"
    entry = _entry(report, "a.txt")
    assert entry["use"] == "skipped" and entry["reason"].startswith("blank caption file")
    assert report.as_dict(1)["counts"]["caption"] == 0


@pytest.mark.parametrize("odd", [" edge.jpg", "edge\u3000.png", "edge .jpg"])
def test_file_names_that_meet_once_made_safe_are_refused_naming_both_and_the_rename(tmp_path, odd):
    """Where ids are made (the download stage), not in build_metadata after the filter: the message
    names both files and renames the odd one to a name no other file takes."""
    for name in (odd, "edge.jpg", "edge_2.jpg"):
        _image(tmp_path / name)
    with pytest.raises(UserError) as info:
        scan_local_folder(tmp_path)
    first, second = sorted([odd, "edge.jpg"])
    assert str(info.value) == (
        f"{first!r} and {second!r} would both train as 'edge.jpg' (a training file name keeps no leading or "
        f"trailing spaces, path separators or control characters); rename {odd!r} in dataset.path, e.g. to "
        f"'edge_3{Path(odd).suffix}', and rerun.")


def test_equal_stems_still_get_numbered_ids(tmp_path):
    for name in ("a.jpg", "a.png", "sub/a.jpg"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        _image(tmp_path / name)
    assert [r["id"] for r in collect_local_rows(tmp_path)] == ["a", "a_2", "a_3"]


def test_offline_the_dataset_job_names_every_download_the_run_still_needs(closed_endpoint, tmp_path):
    from kolors_story.modelscope_endpoint import HubDownload, StillNeeded

    needed = StillNeeded([HubDownload("dataset", "AI-ModelScope/lowres_anime", "resources/datasets/AI-ModelScope/lowres_anime", "dataset.path"),
                          HubDownload("model", "Kwai-Kolors/Kolors-diffusers", "resources/modelscope/Kwai-Kolors/Kolors-diffusers", "models.kolors")])
    with pytest.raises(UserError) as info:
        download_modelscope_dataset("AI-ModelScope/lowres_anime", "default", "train", tmp_path / "images", None,
                                    "{caption}", "二次元", 2, tmp_path / "cache", needed=needed)
    message = str(info.value)
    _assert_names_id_and_fix(message)
    assert message.endswith(needed.text()) and "models.kolors" in message
