"""Where training images come from: a local folder or a ModelScope dataset, as rows.

A row is {"id": str, "image": str (path), "text": str (caption)}; rows files are JSON Lines.
Local rows point at the original files and decode nothing, so broken files reach the filter
stage, which drops and counts them one by one.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import socket
import string
import time
import urllib.request
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from PIL import Image
from tqdm import tqdm

from kolors_story.errors import UserError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
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


def _read_metadata_jsonl(path: Path) -> dict[str, str]:
    captions: dict[str, str] = {}
    with path.open(encoding="utf-8-sig") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(f"{path} line {lineno} is not valid JSON ({exc.msg}); fix or remove that line.") from exc
            if not isinstance(record, dict) or "file_name" not in record:
                raise UserError(f"{path} line {lineno} has no 'file_name' key; each line needs file_name and text.")
            captions[str(record["file_name"])] = str(record.get("text") or "")
    return captions


def _read_metadata_csv(path: Path) -> dict[str, str]:
    with path.open(encoding="utf-8-sig", newline="") as fh:
        reader = csv.DictReader(fh)
        if not reader.fieldnames or "file_name" not in reader.fieldnames:
            raise UserError(f"{path} has no 'file_name' column (found {reader.fieldnames}); the header must be file_name,text.")
        return {row["file_name"]: (row.get("text") or "") for row in reader}


def _metadata_captions(folder: Path) -> dict[str, str]:
    """file_name -> caption from metadata.jsonl, else metadata.csv, else nothing."""
    if (folder / "metadata.jsonl").is_file():
        return _read_metadata_jsonl(folder / "metadata.jsonl")
    if (folder / "metadata.csv").is_file():
        return _read_metadata_csv(folder / "metadata.csv")
    return {}


def _sidecar_caption(image: Path) -> str:
    sidecar = image.with_suffix(".txt")
    return sidecar.read_text(encoding="utf-8-sig").strip() if sidecar.is_file() else ""


def _unique_id(stem: str, taken: set[str]) -> str:
    candidate, n = stem, 1
    while candidate in taken:
        n += 1
        candidate = f"{stem}_{n}"
    taken.add(candidate)
    return candidate


# ---------------------------------------------------------------- local folder


def collect_local_rows(folder: Path, caption_template: str = "{caption}", default_caption: str = "") -> list[dict]:
    """Rows for the images in `folder` (not recursive), sorted by file name.

    Caption priority per image: metadata.jsonl / metadata.csv entry (file_name,text), then a
    `<stem>.txt` sidecar, then `default_caption`. Files listed in metadata but missing on disk
    are still rows, so the filter reports them instead of them vanishing silently.
    """
    check_caption_template(caption_template)
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"dataset.path {str(folder)!r} is not a folder; point dataset.path at a folder of images.")
    captions = _metadata_captions(folder)
    on_disk = {p.name for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES}
    names = sorted(on_disk | set(captions))
    if not names:
        raise UserError(
            f"dataset.path {str(folder)!r} holds no images ({', '.join(IMAGE_SUFFIXES)}); "
            "put the style images there or set dataset.path to another folder."
        )
    rows, taken = [], set()
    for name in names:
        image = folder / name
        caption = captions.get(name, "").strip() or _sidecar_caption(image) or default_caption
        rows.append({"id": _unique_id(Path(name).stem, taken), "image": str(image.resolve()), "text": apply_template(caption_template, caption)})
    return rows


def copy_into_run(rows: list[dict], images_dir: Path) -> list[dict]:
    """Copy each row's file byte for byte to `images_dir/<id><suffix>`; rows then point there.

    A run's results stay valid when the source folder changes later. Nothing is decoded (a
    corrupt file is copied as it is, for the filter to report); a missing file stays a row with
    its original path, so the filter reports it as missing.
    """
    images_dir = Path(images_dir)
    images_dir.mkdir(parents=True, exist_ok=True)
    copied = []
    for row in rows:
        source = Path(row["image"])
        if not source.is_file():
            copied.append(dict(row))
            continue
        target = images_dir / f"{row['id']}{source.suffix.lower()}"
        shutil.copyfile(source, target)
        copied.append({**row, "image": str(target.resolve())})
    return copied


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


def _to_rgb(value: Any, column: str, index: int) -> Image.Image:
    """The image in one dataset cell: a PIL image, a file path, or an HF-style {bytes, path} dict."""
    if isinstance(value, Image.Image):
        return value.convert("RGB")
    if isinstance(value, dict) and (value.get("bytes") or value.get("path")):
        source = io.BytesIO(value["bytes"]) if value.get("bytes") else value["path"]
        with Image.open(source) as img:
            return img.convert("RGB")
    if isinstance(value, (str, os.PathLike)):
        with Image.open(value) as img:
            return img.convert("RGB")
    raise UserError(f"row {index}: column {column!r} holds {type(value).__name__}, not an image; set dataset.image_column.")


def rows_from_records(
    records: Iterable[dict],
    out_images_dir: Path,
    image_column: str,
    caption_column: str | None,
    caption_template: str,
    default_caption: str,
    max_images: int | None,
    total: int | None = None,
) -> list[dict]:
    """Save each record's image as RGB JPEG `<index>.jpg` and build its row (split out for tests)."""
    check_caption_template(caption_template)
    out_images_dir = Path(out_images_dir)
    out_images_dir.mkdir(parents=True, exist_ok=True)
    if max_images is not None:
        total = min(total, max_images) if total is not None else max_images
    rows = []
    for index, record in enumerate(tqdm(records, total=total, desc="saving images", unit="img")):
        if max_images is not None and index >= max_images:
            break
        if image_column not in record:
            raise UserError(f"dataset has no column {image_column!r} (columns: {sorted(record)}); set dataset.image_column.")
        if caption_column is not None and caption_column not in record:
            raise UserError(f"dataset has no column {caption_column!r} (columns: {sorted(record)}); fix dataset.caption_column.")
        path = out_images_dir / f"{index}.jpg"
        _to_rgb(record[image_column], image_column, index).save(path, format="JPEG", quality=JPEG_QUALITY)
        caption = str(record[caption_column] or "").strip() if caption_column else ""
        rows.append({"id": str(index), "image": str(path.resolve()), "text": apply_template(caption_template, caption or default_caption)})
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
) -> list[dict]:
    """Load a ModelScope dataset and save its images as `out_images_dir/<index>.jpg` rows.

    Captions come from `caption_column`, else `default_caption` (the challenge baseline gave
    every image "二次元"). Any failure of the download is a UserError that names the id and
    `dataset.source: local`; without network it comes within seconds.
    """
    check_caption_template(caption_template)
    dataset = _load_modelscope_dataset(dataset_id, subset, split, cache_dir)
    try:
        total = len(dataset)
    except TypeError:  # streaming datasets have no length
        total = None
    return rows_from_records(
        _iter_records(dataset), out_images_dir, image_column, caption_column, caption_template, default_caption, max_images, total
    )


def _iter_records(dataset: Iterable) -> Iterator[dict]:
    for record in dataset:
        yield dict(record)


# ---------------------------------------------------------------- rows files


def write_rows(rows: Iterable[dict], path: Path) -> Path:
    """Write rows as UTF-8 JSON Lines (non-ASCII captions kept readable)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def read_rows(path: Path) -> list[dict]:
    """Read a rows file written by `write_rows`; every row must have id, image and text."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"rows file {str(path)!r} does not exist; run the step that writes it (download_dataset/filter_dataset).")
    rows = []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(f"{path} line {lineno} is not valid JSON ({exc.msg}); delete the file and rerun.") from exc
            missing = {"id", "image", "text"} - set(row)
            if missing:
                raise UserError(f"{path} line {lineno} lacks {sorted(missing)}; delete the file and rerun.")
            rows.append(row)
    return rows
