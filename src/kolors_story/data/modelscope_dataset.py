"""A ModelScope dataset (MsDataset.load) as rows: images stored as RGB JPEGs, captions from a column;
no network is a clear error naming the key, found before the download is tried."""

from __future__ import annotations

import io
import os
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from PIL import Image
from tqdm import tqdm

from kolors_story import modelscope_endpoint
from kolors_story.errors import UserError
from kolors_story.modelscope_endpoint import StillNeeded
from kolors_story.data.rows import DEFAULT_CAPTION_KEY, JPEG_QUALITY, SourceReport
from kolors_story.data.text_files import apply_template, check_caption_template
from kolors_story.data.images import RGB, WHITE, BadImage, bad_image, load_rgb, strict_decoding, upright_rgb


# module names the tests replace
_hub_endpoint, _offline_reason = modelscope_endpoint.endpoint, modelscope_endpoint.offline_reason


def _hub_error(dataset_id: str, reason: str, needed: StillNeeded | None = None) -> UserError:
    """The download's failure; offline, with every hub download the run still needs (`needed`)."""
    return UserError(
        f"Could not load ModelScope dataset {dataset_id!r} (dataset.id): {reason}. "
        "Check dataset.id, dataset.subset and dataset.split; without network access, set "
        "`dataset.source: local` and `dataset.path` to a folder of images "
        "(captions from metadata.csv/metadata.jsonl or <name>.txt sidecars)."
        + (f"\n{needed.text()}" if needed else "")
    )


def _msdataset_load(dataset_id: str, subset: str | None, split: str, cache_dir: Path) -> Any:
    """The one call that downloads a ModelScope dataset (split out so tests can replace it)."""
    from modelscope.msdatasets import MsDataset

    return MsDataset.load(dataset_id, subset_name=subset, split=split, cache_dir=str(cache_dir))


def _load_modelscope_dataset(dataset_id: str, subset: str | None, split: str, cache_dir: Path,
                             needed: StillNeeded | None = None) -> Any:
    """MsDataset.load, with every failure turned into the UserError that names the id and the fix.

    Not only modelscope's own errors: the download goes through datasets, huggingface_hub,
    fsspec/aiohttp, requests and oss2, each with its own exception types, and modelscope itself
    sometimes raises a plain string (a TypeError).
    """
    started = time.monotonic()
    try:
        reason = _offline_reason()
        if reason:
            raise _hub_error(dataset_id, reason, needed)
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
        rows.append({"id": str(index), "image": os.path.abspath(path), "text": apply_template(caption_template, caption or default_caption),
                     "caption": caption, "caption_from": caption_column if caption else DEFAULT_CAPTION_KEY})
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
    needed: StillNeeded | None = None,
) -> list[dict]:
    """Load a ModelScope dataset and save its images as `out_images_dir/<index>.jpg` rows.

    Captions come from `caption_column`, else `default_caption` (the challenge baseline gave
    every image "二次元"). Any failure of the download is a UserError that names the id and
    `dataset.source: local`; without network it comes within seconds and names every hub download
    of the run in `needed` too. Records whose image does not decode are dropped into `report`.
    """
    check_caption_template(caption_template)
    dataset = _load_modelscope_dataset(dataset_id, subset, split, cache_dir, needed)
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
