"""Where training images come from: a local folder or a ModelScope dataset, as rows.

A row is {"id": str, "image": str (path), "text": str (caption)}, plus "source" (the file's
name in dataset.path) for local rows; rows files are JSON Lines whose image paths are relative
to the rows file, so a moved or shared results/ folder stays valid. Every file of a local folder
is accounted for in a SourceReport (data/download_stats.json): images, captions with their
encoding, metadata, and what was skipped or dropped and why. Images are stored in the run as
they will be trained on (upright RGB; see images.py); broken files reach the filter stage,
which drops and counts them one by one.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import os
import posixpath
import re
import shutil
import socket
import string
import time
import urllib.request
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from PIL import Image
from tqdm import tqdm

from kolors_story.errors import UserError
from kolors_story.data.images import (
    RGB,
    WHITE,
    BadImage,
    bad_image,
    image_suffixes,
    is_plain_jpeg_file,
    load_rgb,
    looks_like_image,
    strict_decoding,
    upright_rgb,
)

PREFLIGHT_TIMEOUT_S = 10.0
JPEG_QUALITY = 95


# ---------------------------------------------------------------- captions and templates


def check_caption_template(template: str) -> None:
    """Fail early unless `template` uses `{caption}` and no other placeholder."""
    key = "dataset.caption_template"
    try:
        fields = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as exc:  # unbalanced braces
        raise UserError(f"{key} {template!r} is not a valid template ({exc}); write e.g. '{{caption}}, ink wash'.") from exc
    if fields != {"caption"}:
        others = sorted(fields - {"caption"})
        what = f"uses unknown placeholder(s) {others}" if others else "has no {caption} placeholder"
        raise UserError(
            f"{key} {template!r} {what}; the only placeholder is {{caption}} (e.g. '{{caption}}, ink wash'). "
            "Write a literal brace as {{ or }}."
        )


def apply_template(template: str, caption: str) -> str:
    return template.format(caption=caption).strip()


# ---------------------------------------------------------------- caption text in the encodings people save

_BOMS = (
    (codecs.BOM_UTF8, "utf-8", "utf-8 (BOM)"),
    (codecs.BOM_UTF16_LE, "utf-16-le", "utf-16-le (BOM)"),
    (codecs.BOM_UTF16_BE, "utf-16-be", "utf-16-be (BOM)"),
)
_CONTROLS = re.compile(r"[\x00-\x08\x0b\x0e-\x1f\x7f-\x9f]")  # no text has these; tab, newlines, form feed allowed
# GB18030 decodes most byte strings; byte pairs that are no character land in the private use area
# (its user-defined ranges), and U+FFFD marks an earlier broken conversion. Either means "not GBK text".
_NOT_GB_TEXT = re.compile("[\ue000-\uf8ff\ufffd]")
ENCODINGS_TRIED = "UTF-8 (with or without BOM), UTF-16 (with a BOM, or without one when it holds ASCII), GB18030/GBK"


def _undecodable(path: Path, why: str) -> UserError:
    return UserError(
        f"{path}: cannot read it as text ({why}; tried {ENCODINGS_TRIED}). "
        "Re-save the file as UTF-8 (in most editors: Save as > Encoding: UTF-8) and rerun."
    )


def _utf16_order(data: bytes) -> str | None:
    """UTF-16 byte order of BOM-less data, judged by where its NUL bytes fall (the high bytes of
    ASCII characters): at odd offsets little-endian, at even ones big-endian; None if unclear."""
    if len(data) % 2:
        return None
    even, odd = data[0::2].count(0), data[1::2].count(0)
    if odd >= 4 * even and odd:
        return "utf-16-le"
    if even >= 4 * odd and even:
        return "utf-16-be"
    return None


def _strict(data: bytes, codec: str, label: str, path: Path) -> str:
    try:
        text = data.decode(codec)
    except UnicodeDecodeError as exc:
        raise _undecodable(path, f"not valid {label} at byte {exc.start}") from None
    if _CONTROLS.search(text):
        raise _undecodable(path, f"as {label} it holds control characters, so it is not text")
    return text


def decode_text(data: bytes, path: Path) -> tuple[str, str]:
    """Text of a caption or metadata file, and the encoding found (e.g. 'utf-8', 'gb18030').

    Order: a BOM decides (UTF-8, UTF-16 LE/BE); NUL bytes mean BOM-less UTF-16 if their offsets
    say which byte order (ASCII characters in it), else binary; then UTF-8; then GB18030 (a
    superset of GBK and GB2312). Undecodable: invalid bytes in the chosen encoding, control
    characters, or a GB18030 reading with private-use or U+FFFD characters. A UTF-16 file
    without BOM that holds no ASCII at all cannot be told from GB18030; save it with a BOM.
    """
    for bom, codec, label in _BOMS:
        if data.startswith(bom):
            return _strict(data[len(bom):], codec, label, path), label
    if b"\x00" in data:
        codec = _utf16_order(data)
        if codec is None:
            raise _undecodable(path, "it holds NUL bytes: binary data, or UTF-16/UTF-32 without a byte-order mark")
        return _strict(data, codec, f"{codec} (no BOM)", path), f"{codec} (no BOM)"
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        pass  # not UTF-8: the legacy Chinese encoding is next
    else:
        return _strict(data, "utf-8", "utf-8", path), "utf-8"
    try:
        text = data.decode("gb18030")
    except UnicodeDecodeError as exc:
        raise _undecodable(path, f"neither UTF-8 nor GB18030 at byte {exc.start}") from None
    if _CONTROLS.search(text) or _NOT_GB_TEXT.search(text):
        raise _undecodable(path, "neither UTF-8 nor GB18030 text (as GB18030 it gives control or unassigned characters)")
    return text, "gb18030"


def read_text_file(path: Path) -> tuple[str, str]:
    """`decode_text` of the file at `path`; a newline-normalised text and its encoding."""
    text, encoding = decode_text(Path(path).read_bytes(), Path(path))
    return text.replace("\r\n", "\n").replace("\r", "\n"), encoding


# ---------------------------------------------------------------- metadata.jsonl / metadata.csv

METADATA_FILES = ("metadata.jsonl", "metadata.csv")  # the first one present is read


@dataclass
class MetaEntry:
    name: str  # file_name as written
    caption: str
    where: str  # e.g. "metadata.csv line 3", for the reasons in the report


def json_lines(lines: Iterable[str], path: Path, fix: str) -> Iterator[tuple[int, Any]]:
    """(line number, parsed value) of each non-blank line of a JSON Lines file; UserError naming the
    line and `fix` for one that is not JSON."""
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path} line {lineno} is not valid JSON ({exc.msg}); {fix}.") from exc


def _parse_jsonl(text: str, path: Path) -> list[MetaEntry]:
    entries = []
    # not splitlines(): JSON strings may hold U+2028
    for lineno, record in json_lines(text.split("\n"), path, "fix or remove that line"):
        if not isinstance(record, dict) or "file_name" not in record:
            raise UserError(f"{path} line {lineno} has no 'file_name' key; each line needs file_name and text.")
        entries.append(MetaEntry(str(record["file_name"]), str(record.get("text") or ""), f"{path.name} line {lineno}"))
    return entries


def _parse_csv(text: str, path: Path) -> list[MetaEntry]:
    reader = csv.DictReader(io.StringIO(text, newline=""))
    fields = [f.strip() for f in reader.fieldnames or []]
    if "file_name" not in fields:
        raise UserError(f"{path} has no 'file_name' column (found {reader.fieldnames}); the header must be file_name,text.")
    reader.fieldnames = fields
    return [
        MetaEntry(row["file_name"] or "", row.get("text") or "", f"{path.name} line {reader.line_num}")
        for row in reader
    ]


def _read_metadata(folder: Path, report: SourceReport) -> list[MetaEntry]:
    """Entries of metadata.jsonl, else metadata.csv; both files are accounted for in `report`."""
    present = [name for name in METADATA_FILES if (folder / name).is_file()]
    if not present:
        return []
    used, *ignored = present
    for name in ignored:
        report.file(name, "skipped", reason=f"{used} is read instead (only one metadata file is used)")
    text, encoding = read_text_file(folder / used)
    parse = _parse_jsonl if used.endswith(".jsonl") else _parse_csv
    entries = parse(text, folder / used)
    report.file(used, "metadata", encoding=encoding, entries=len(entries))
    return entries


def _listed_files(folder: Path, entries: list[MetaEntry], report: SourceReport) -> dict[str, MetaEntry]:
    """Metadata entries that name a file in the folder, by normalised name; the rest dropped with why."""
    on_disk = {p.name.lower(): p.name for p in folder.iterdir()}
    listed: dict[str, MetaEntry] = {}
    first: dict[str, str] = {}
    for entry in entries:
        name = posixpath.normpath(entry.name.strip().replace("\\", "/")) if entry.name.strip() else ""
        if not name:
            reason = "no file_name"
        elif name in first:
            reason = f"{name} is listed again (first at {first[name]})"
        elif posixpath.isabs(name) or name.split("/")[0] == "..":
            reason = f"{name} is outside dataset.path"
        elif not (folder / name).is_file():
            twin = on_disk.get(name.lower())
            reason = f"{name} is not in the folder" + (f" ({twin} differs only in case)" if twin else "")
        else:
            reason = None
        first.setdefault(name, entry.where)
        if reason:
            report.dropped.append({"file": name or entry.name, "where": entry.where, "reason": reason})
        else:
            listed[name] = entry
    return listed


# ---------------------------------------------------------------- local folder


@dataclass
class SourceReport:
    """What the download stage made of its input, written to data/download_stats.json.

    `files`: one entry per file or folder in dataset.path (local), with its use: image (-> row),
    caption (+ encoding), metadata (+ encoding), skipped (+ reason). `dropped`: metadata entries
    or dataset records that give no row, with the reason. No absolute paths: names are relative
    to dataset.path.
    """

    source: str
    files: list[dict] = field(default_factory=list)
    dropped: list[dict] = field(default_factory=list)

    def file(self, name: str, use: str, **details: Any) -> dict:
        entry = {"file": name, "use": use, **details}
        self.files.append(entry)
        return entry

    def as_dict(self, rows: int) -> dict:
        counts = Counter(e["use"] for e in self.files)
        return {
            "source": self.source,
            "rows": rows,
            "counts": {**{k: counts[k] for k in ("image", "caption", "metadata", "skipped")}, "dropped": len(self.dropped)},
            "files": sorted(self.files, key=lambda e: e["file"]),
            "dropped": self.dropped,
        }


def _folder_images(folder: Path, listed: dict[str, MetaEntry], report: SourceReport) -> list[str]:
    """Names of the images to use (sorted); every other file or folder is accounted for in `report`."""
    images = set(listed)
    for path in sorted(folder.iterdir()):
        name = path.name
        if path.is_dir():
            report.file(f"{name}/", "skipped", reason="a folder: not searched (metadata can list files in it)")
        elif name in METADATA_FILES or name in images:
            continue  # metadata is accounted for by _read_metadata
        elif path.suffix.lower() == ".txt":
            continue  # a caption or not: decided once the images are known
        elif path.suffix.lower() in image_suffixes() or looks_like_image(path):
            images.add(name)
        else:
            report.file(name, "skipped", reason="not an image (Pillow does not recognise it)")
    return sorted(images)


def _sidecar_caption(folder: Path, name: str, sidecars: dict[str, tuple[str, str]]) -> tuple[str, str] | None:
    """(caption, sidecar name) from `<stem>.txt` beside the image, read once per sidecar."""
    sidecar = posixpath.splitext(name)[0] + ".txt"
    if sidecar not in sidecars:
        if not (folder / sidecar).is_file():
            return None
        sidecars[sidecar] = read_text_file(folder / sidecar)
    text = sidecars[sidecar][0].strip()
    return (text, sidecar) if text else None


def _account_txt_files(folder: Path, images: list[str], sidecars: dict[str, tuple[str, str]], report: SourceReport) -> None:
    stems = {posixpath.splitext(n)[0] for n in images}
    txt_files = {p.name for p in folder.glob("*.txt") if p.is_file()} - set(images)  # a listed .txt "image" has its entry
    for name in sorted(txt_files | set(sidecars)):
        if name in sidecars:
            report.file(name, "caption", encoding=sidecars[name][1])
        elif posixpath.splitext(name)[0] in stems:
            report.file(name, "skipped", reason="caption file, not needed (metadata gives the caption, or the image is not used)")
        else:
            report.file(name, "skipped", reason="not an image (a .txt file with no image of the same name)")


def scan_local_folder(
    folder: Path, caption_template: str = "{caption}", default_caption: str = "", max_images: int | None = None
) -> tuple[list[dict], SourceReport]:
    """Rows for the images in `folder` (sorted by name) and the report on every file there.

    Caption priority per image: its metadata.jsonl / metadata.csv entry (file_name,text), then a
    `<stem>.txt` sidecar, then `default_caption`. Metadata entries naming a missing file, a file
    outside the folder or a file already listed are dropped and reported, not rows. Rows point at
    the original files (`image`, absolute) and name them (`source`, relative to the folder).
    """
    check_caption_template(caption_template)
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"dataset.path {str(folder)!r} is not a folder; point dataset.path at a folder of images.")
    report = SourceReport("local")
    listed = _listed_files(folder, _read_metadata(folder, report), report)
    names = _folder_images(folder, listed, report)
    rows, taken, sidecars = [], set(), {}
    for name in names:
        if max_images is not None and len(rows) >= max_images:
            report.file(name, "skipped", reason=f"over dataset.max_images ({max_images})")
            continue
        entry = listed.get(name)
        found = (entry.caption.strip(), entry.where) if entry and entry.caption.strip() else _sidecar_caption(folder, name, sidecars)
        caption, where = found or (default_caption, "dataset.default_caption")
        row_id = _unique_id(Path(name).stem, taken)
        report.file(name, "image", row=row_id, caption=where)
        rows.append({"id": row_id, "image": os.path.abspath(folder / name), "text": apply_template(caption_template, caption), "source": name})
    _account_txt_files(folder, names, sidecars, report)
    if not rows:
        examples = "; ".join(f"{d['where']}: {d['reason']}" for d in report.dropped[:3])
        raise UserError(
            f"dataset.path {str(folder)!r} holds no images (no file Pillow can open{'; ' + examples if examples else ''}); "
            "put the style images there or set dataset.path to another folder."
        )
    return rows, report


def collect_local_rows(folder: Path, caption_template: str = "{caption}", default_caption: str = "") -> list[dict]:
    """The rows of `scan_local_folder`, without its report."""
    return scan_local_folder(folder, caption_template, default_caption)[0]


def _unique_id(stem: str, taken: set[str]) -> str:
    candidate, n = stem, 1
    while candidate in taken:
        n += 1
        candidate = f"{stem}_{n}"
    taken.add(candidate)
    return candidate


def _store_image(source: Path, images_dir: Path, row_id: str, background: RGB) -> tuple[Path, str]:
    """Put one image into the run; returns where, and how (for the report).

    An RGB JPEG shown as stored is copied byte for byte (no second lossy encode, nothing decoded);
    anything else is decoded, turned upright and RGB, and saved as PNG (lossless). A file that
    does not decode is copied as it is: the filter's integrity check drops it with the reason.
    """
    if not is_plain_jpeg_file(source):
        try:
            rgb, what = load_rgb(source, background)
        except BadImage as exc:
            target = images_dir / f"{row_id}{source.suffix.lower()}"
            shutil.copyfile(source, target)
            return target, f"copied as is, for the filter step to drop ({exc})"
        target = images_dir / f"{row_id}.png"
        rgb.save(target, format="PNG")
        return target, f"converted from {what} to RGB PNG"
    target = images_dir / f"{row_id}{source.suffix.lower()}"
    shutil.copyfile(source, target)
    return target, "copied"


def copy_into_run(rows: list[dict], images_dir: Path, background: RGB = WHITE, report: SourceReport | None = None) -> list[dict]:
    """Store each row's image in `images_dir/<id>.<ext>` (see `_store_image`); rows then point there.

    A run's results stay valid when the source folder changes later. A missing file stays a row
    with its original path, for the filter to report. With `report`, each image's entry says how
    it was stored.
    """
    images_dir = Path(images_dir)
    images_dir.mkdir(parents=True, exist_ok=True)
    entries = {e["file"]: e for e in report.files if e["use"] == "image"} if report else {}
    copied = []
    for row in tqdm(rows, desc="storing images", unit="img", mininterval=5):
        source = Path(row["image"])
        if not source.is_file():
            copied.append(dict(row))
            continue
        target, how = _store_image(source, images_dir, row["id"], background)
        if row.get("source") in entries:
            entries[row["source"]]["stored"] = how
        copied.append({**row, "image": os.path.abspath(target)})
    return copied


def collect_local(
    folder: Path, images_dir: Path, caption_template: str, default_caption: str, max_images: int | None, background: RGB = WHITE
) -> tuple[list[dict], SourceReport]:
    """The download stage for `dataset.source: local`: scan the folder, store its images in the run."""
    rows, report = scan_local_folder(folder, caption_template, default_caption, max_images)
    return copy_into_run(rows, images_dir, background, report), report


# ---------------------------------------------------------------- ModelScope


def _hub_endpoint() -> str:
    """The endpoint MsDataset.load talks to: HubApi's (it honours MODELSCOPE_ENDPOINT).

    Not `modelscope.hub.utils.utils.get_endpoint()`, which ignores MODELSCOPE_ENDPOINT.
    """
    from modelscope.hub.api import HubApi

    return HubApi().endpoint


def _offline_reason() -> str | None:
    """Why the ModelScope hub cannot be reached, or None if a TCP connection opens.

    The hub client retries for a while before it gives up; a plain connect bounded by
    PREFLIGHT_TIMEOUT_S answers in seconds. Behind a proxy a direct connect proves nothing,
    so the check is skipped there and the client's own error is reported instead.
    """
    endpoint = _hub_endpoint()
    if urllib.request.getproxies().get(urlparse(endpoint).scheme or "https"):
        return None
    parsed = urlparse(endpoint)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        socket.create_connection((parsed.hostname, port), timeout=PREFLIGHT_TIMEOUT_S).close()
    except OSError as exc:
        return f"cannot connect to {endpoint} ({exc})"
    return None


def _hub_error(dataset_id: str, reason: str) -> UserError:
    return UserError(
        f"Could not load ModelScope dataset {dataset_id!r} (dataset.id): {reason}. "
        "Check dataset.id, dataset.subset and dataset.split; without network access, set "
        "`dataset.source: local` and `dataset.path` to a folder of images "
        "(captions from metadata.csv/metadata.jsonl or <name>.txt sidecars)."
    )


def _msdataset_load(dataset_id: str, subset: str | None, split: str, cache_dir: Path) -> Any:
    """The one call that downloads a ModelScope dataset (split out so tests can replace it)."""
    from modelscope.msdatasets import MsDataset

    return MsDataset.load(dataset_id, subset_name=subset, split=split, cache_dir=str(cache_dir))


def _load_modelscope_dataset(dataset_id: str, subset: str | None, split: str, cache_dir: Path) -> Any:
    """MsDataset.load, with every failure turned into the UserError that names the id and the fix.

    Not only modelscope's own errors: the download goes through datasets, huggingface_hub,
    fsspec/aiohttp, requests and oss2, each with its own exception types, and modelscope itself
    sometimes raises a plain string (a TypeError).
    """
    started = time.monotonic()
    try:
        reason = _offline_reason()
        if reason:
            raise _hub_error(dataset_id, reason)
        return _msdataset_load(dataset_id, subset, split, cache_dir)
    except UserError:
        raise
    except ImportError as exc:  # a lazily imported package (oss2 for legacy-format datasets) is missing
        raise _hub_error(
            dataset_id,
            f"{type(exc).__name__}: {exc}; this environment lacks a package MsDataset.load imports "
            "(reinstall it with `make env`, i.e. pip install -r requirements.txt -c constraints.txt)",
        ) from exc
    except Exception as exc:
        raise _hub_error(dataset_id, f"{type(exc).__name__}: {exc} (after {time.monotonic() - started:.0f} s)") from exc


def _cell_image(value: Any, column: str, index: int, background: RGB) -> Image.Image:
    """The image in one dataset cell as upright RGB: a PIL image, a file path, or an HF-style
    {bytes, path} dict. BadImage if it does not decode; UserError if the cell holds no image."""
    if isinstance(value, Image.Image):
        try:
            with strict_decoding():
                value.load()
                return upright_rgb(value, background)
        except Exception as exc:  # a damaged cell costs its own row only
            raise bad_image(exc, getattr(value, "filename", None) or None) from exc
    if isinstance(value, dict) and (value.get("bytes") or value.get("path")):
        return load_rgb(io.BytesIO(value["bytes"]) if value.get("bytes") else value["path"], background)[0]
    if isinstance(value, (str, os.PathLike)):
        return load_rgb(value, background)[0]
    raise UserError(f"row {index}: column {column!r} holds {type(value).__name__}, not an image; set dataset.image_column.")


def _check_columns(record: dict, image_column: str, caption_column: str | None) -> None:
    if image_column not in record:
        raise UserError(f"dataset has no column {image_column!r} (columns: {sorted(record)}); set dataset.image_column.")
    if caption_column is not None and caption_column not in record:
        raise UserError(f"dataset has no column {caption_column!r} (columns: {sorted(record)}); fix dataset.caption_column.")


def rows_from_records(
    records: Iterable[dict],
    out_images_dir: Path,
    image_column: str,
    caption_column: str | None,
    caption_template: str,
    default_caption: str,
    max_images: int | None,
    total: int | None = None,
    background: RGB = WHITE,
    report: SourceReport | None = None,
) -> list[dict]:
    """Save each record's image as RGB JPEG `<index>.jpg` and build its row (split out for tests).

    A record whose image does not decode (or is over Pillow's pixel limit) is dropped and, with
    `report`, listed with the reason; the others keep their index as id. At most `max_images` rows.
    """
    check_caption_template(caption_template)
    out_images_dir = Path(out_images_dir)
    out_images_dir.mkdir(parents=True, exist_ok=True)
    if max_images is not None:
        total = min(total, max_images) if total is not None else max_images
    rows: list[dict] = []
    for index, record in enumerate(tqdm(records, total=total, desc="saving images", unit="img")):
        if max_images is not None and len(rows) >= max_images:
            break
        _check_columns(record, image_column, caption_column)
        try:
            image = _cell_image(record[image_column], image_column, index, background)
        except BadImage as exc:
            if report is not None:
                report.dropped.append({"record": index, "reason": str(exc)})
            continue
        path = out_images_dir / f"{index}.jpg"
        image.save(path, format="JPEG", quality=JPEG_QUALITY)
        caption = str(record[caption_column] or "").strip() if caption_column else ""
        rows.append({"id": str(index), "image": os.path.abspath(path), "text": apply_template(caption_template, caption or default_caption)})
    if not rows and report is not None and report.dropped:
        examples = "; ".join(f"record {d['record']}: {d['reason']}" for d in report.dropped[:3])
        raise UserError(f"No usable image in the dataset (dataset.id): every record was dropped ({examples}); check dataset.image_column.")
    return rows


def download_modelscope_dataset(
    dataset_id: str,
    subset: str | None,
    split: str,
    out_images_dir: Path,
    caption_column: str | None,
    caption_template: str,
    default_caption: str,
    max_images: int | None,
    cache_dir: Path,
    image_column: str = "image",
    background: RGB = WHITE,
    report: SourceReport | None = None,
) -> list[dict]:
    """Load a ModelScope dataset and save its images as `out_images_dir/<index>.jpg` rows.

    Captions come from `caption_column`, else `default_caption` (the challenge baseline gave
    every image "二次元"). Any failure of the download is a UserError that names the id and
    `dataset.source: local`; without network it comes within seconds. Records whose image does
    not decode are dropped into `report`.
    """
    check_caption_template(caption_template)
    dataset = _load_modelscope_dataset(dataset_id, subset, split, cache_dir)
    try:
        total = len(dataset)
    except TypeError:  # streaming datasets have no length
        total = None
    return rows_from_records(
        _iter_records(dataset), out_images_dir, image_column, caption_column, caption_template, default_caption, max_images, total,
        background, report,
    )


def _iter_records(dataset: Iterable) -> Iterator[dict]:
    for record in dataset:
        yield dict(record)


# ---------------------------------------------------------------- rows files


def relative_path(path: str | os.PathLike, base_dir: str | os.PathLike) -> str:
    """`path` relative to `base_dir`, with / separators: what results files store, so that they
    stay valid when results/ is moved or shared. Lexical (no symlinks resolved)."""
    try:
        return Path(os.path.relpath(os.path.abspath(path), os.path.abspath(base_dir))).as_posix()
    except ValueError:  # another drive (Windows): no relative form exists
        return Path(path).as_posix()


def write_rows(rows: Iterable[dict], path: Path) -> Path:
    """Write rows as UTF-8 JSON Lines (non-ASCII captions kept readable), image paths relative
    to the rows file's folder (`read_rows` resolves them)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as fh:
        for row in rows:
            stored = {**row, "image": relative_path(row["image"], path.parent)}
            fh.write(json.dumps(stored, ensure_ascii=False) + "\n")
    return path


def read_rows(path: Path) -> list[dict]:
    """Read a rows file written by `write_rows`; every row must have id, image and text.

    Image paths come back absolute, resolved against the rows file's folder (an absolute path
    in an older rows file is kept as it is).
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"rows file {str(path)!r} does not exist; run the step that writes it (download_dataset/filter_dataset).")
    rows = []
    with path.open(encoding="utf-8") as fh:
        for lineno, row in json_lines(fh, path, "delete the file and rerun"):
            missing = {"id", "image", "text"} - set(row)
            if missing:
                raise UserError(f"{path} line {lineno} lacks {sorted(missing)}; delete the file and rerun.")
            rows.append({**row, "image": os.path.abspath(os.path.join(path.parent, row["image"]))})
    return rows

