"""A local folder as rows: images (in subfolders too, kohya's `<repeats>_<name>/` folders repeating
theirs), captions from metadata.jsonl / metadata.csv or sidecar .txt / .caption files, every file
accounted for in a SourceReport (data/download_stats.json); images stored in the run as
they will be trained on (upright RGB; see images.py)."""

from __future__ import annotations

import csv
import io
import logging
import os
import posixpath
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from kolors_story.errors import UserError
from kolors_story.data.rows import DEFAULT_CAPTION_KEY, SourceReport, file_stem, images_per_folder, json_lines, stem_clash
from kolors_story.data.text_files import apply_template, check_caption_template, read_text_file
from kolors_story.data.images import (
    RGB,
    WHITE,
    BadImage,
    image_suffixes,
    is_plain_jpeg_file,
    load_rgb,
    looks_like_image,
)

log = logging.getLogger(__name__)
METADATA_FILES = ("metadata.jsonl", "metadata.csv")  # the first one present is read


@dataclass
class MetaEntry:
    name: str  # file_name as written
    caption: str
    where: str  # e.g. "metadata.csv line 3", for the reasons in the report


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
        elif folder_repeats(name) == 0:
            reason = f"{name} is in a 0-repeats folder (kohya's <repeats>_<name> form): not used"
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




BLANK = "blank caption file"  # a sidecar of whitespace only: the image gets the default caption
CAPTION_SUFFIXES = (".txt", ".caption")  # sidecar extensions; with both beside an image, .txt wins
REPEATS_FOLDER = re.compile(r"(\d+)_(.*)", re.DOTALL)  # kohya's <repeats>_<name>/
MANY_REPEATS = 100  # a folder named like a year ("2024_trip") is likely no repeats count: warned


def dir_repeats(folder: str) -> int | None:
    """Repeats of the images in the relative folder `folder` ("" for dataset.path itself): from the
    innermost `<repeats>_<name>` folder on its path (kohya's convention), None when there is none."""
    for part in reversed(folder.split("/")):
        match = REPEATS_FOLDER.fullmatch(part)
        if match:
            return int(match.group(1))
    return None


def folder_repeats(name: str) -> int | None:
    """Repeats of the image at relative path `name` (dir_repeats of its folder)."""
    return dir_repeats(posixpath.dirname(name))


def _skip_folder(path: Path, name: str, seen: set[Path]) -> str | None:
    """Why the folder `name` (relative) is not searched, or None."""
    if path.name.startswith("."):
        return "hidden (its name starts with '.'): not searched"
    if path.resolve() in seen:
        return "a link to a folder already searched"
    if dir_repeats(name) == 0:
        return "0 repeats (kohya's <repeats>_<name> folder form): not used, as kohya does"
    try:
        if not any(path.iterdir()):
            return "a folder with no files"
    except OSError as exc:  # no permission, a link to nowhere
        return f"cannot be listed ({exc.strerror or exc})"
    return None


def _walk(folder: Path, report: SourceReport) -> list[str]:
    """Relative names (/-separated) of every file under `folder` in searched folders; hidden
    files and folders, 0-repeat folders and links back into searched folders are reported."""
    files, seen, pending = [], {folder.resolve()}, [folder]
    while pending:
        directory = pending.pop()
        for path in sorted(directory.iterdir()):
            name = path.relative_to(folder).as_posix()
            if path.is_dir():
                why = _skip_folder(path, name, seen)
                if why:
                    report.file(f"{name}/", "skipped", reason=why)
                    continue
                seen.add(path.resolve())
                pending.append(path)
                repeats = dir_repeats(name)
                if repeats is not None and repeats > MANY_REPEATS:
                    log.warning("folder %s/ repeats its images %d times per epoch (kohya's <repeats>_<name> form); "
                                "rename it if that is not meant", name, repeats)
            elif path.name.startswith("."):
                report.file(name, "skipped", reason="hidden (its name starts with '.')")
            else:
                files.append(name)
    return files


def _folder_images(folder: Path, listed: dict[str, MetaEntry], report: SourceReport) -> tuple[list[str], list[str]]:
    """Names of the images to use (sorted) and of the caption-like files (.txt, .caption) to decide
    on later; every other file or folder under `folder` is accounted for in `report`."""
    images, texts = set(listed), []
    for name in _walk(folder, report):
        path = folder / name
        if name in METADATA_FILES or name in images:
            continue  # metadata is accounted for by _read_metadata
        if path.suffix.lower() in CAPTION_SUFFIXES:
            texts.append(name)  # a caption or not: decided once the images are known
        elif path.suffix.lower() in image_suffixes() or looks_like_image(path):
            images.add(name)
        elif path.name in METADATA_FILES:
            report.file(name, "skipped", reason="a metadata file in a subfolder: only the one in dataset.path is read")
        else:
            report.file(name, "skipped", reason="not an image (Pillow does not recognise it)")
    return sorted(images), texts


def _sidecar_caption(folder: Path, name: str, sidecars: dict[str, tuple[str, str]]) -> tuple[str, str] | None:
    """(caption, sidecar name) from `<stem>.txt`, else `<stem>.caption`, beside the image (in its
    own folder), read once per sidecar. A blank sidecar gives "" (the caller says so)."""
    for suffix in CAPTION_SUFFIXES:
        sidecar = posixpath.splitext(name)[0] + suffix
        if sidecar not in sidecars:
            if not (folder / sidecar).is_file():
                continue
            sidecars[sidecar] = read_text_file(folder / sidecar)
        return sidecars[sidecar][0].strip(), sidecar  # str.strip(): U+3000 and CRLF are blank too
    return None


def _image_caption(folder: Path, name: str, entry: MetaEntry | None, sidecars: dict[str, tuple[str, str]]) -> tuple[str, str, str]:
    """(caption, caption_from, what the report says was used) for one image: its metadata
    entry, else its sidecar, else dataset.default_caption; a blank sidecar is warned about."""
    if entry and entry.caption.strip():
        return entry.caption.strip(), entry.where, entry.where
    found = _sidecar_caption(folder, name, sidecars)
    if not found:
        return "", DEFAULT_CAPTION_KEY, DEFAULT_CAPTION_KEY
    caption, sidecar = found
    if caption:
        return caption, sidecar, sidecar
    log.warning("caption file %s is blank (only spaces or line breaks): %s trains on %s", sidecar, name, DEFAULT_CAPTION_KEY)
    return "", DEFAULT_CAPTION_KEY, f"{DEFAULT_CAPTION_KEY} ({BLANK} {sidecar})"


def _account_caption_files(texts: list[str], images: list[str], sidecars: dict[str, tuple[str, str]], report: SourceReport) -> None:
    """Report every .txt / .caption file: a caption read, or skipped with the reason."""
    stems = {posixpath.splitext(n)[0] for n in images}
    for name in sorted(set(texts) | set(sidecars)):
        stem, suffix = posixpath.splitext(name)
        txt = stem + ".txt"
        if name in sidecars and not sidecars[name][0].strip():
            report.file(name, "skipped", reason=f"{BLANK} (only spaces or line breaks): its image trains on {DEFAULT_CAPTION_KEY}",
                        encoding=sidecars[name][1])
        elif name in sidecars:
            report.file(name, "caption", encoding=sidecars[name][1])
        elif suffix.lower() == ".caption" and txt in sidecars:
            report.file(name, "skipped", reason=f"{txt} is read instead (a .txt sidecar wins over .caption)")
        elif stem in stems and suffix not in CAPTION_SUFFIXES:
            report.file(name, "skipped", reason=f"sidecars are read with a lower-case extension ({stem}.txt or {stem}.caption)")
        elif stem in stems:
            report.file(name, "skipped", reason="caption file, not needed (metadata gives the caption, or the image is not used)")
        else:
            report.file(name, "skipped", reason=f"not an image (a {suffix} file with no image of the same name)")


def _image_row(folder: Path, name: str, caption: str, where: str, row_id: str, text: str) -> dict:
    row = {"id": row_id, "image": os.path.abspath(folder / name), "text": text, "source": name,
           "caption": caption, "caption_from": where}
    repeats = folder_repeats(name)
    return row if repeats is None else {**row, "repeats": repeats}


def _account_folders(rows: list[dict], report: SourceReport) -> None:
    """One `folder` entry per subfolder that gave rows: its repeats, images and examples per epoch."""
    for sub, counts in images_per_folder(rows).items():
        if sub:
            report.file(f"{sub}/", "folder", **counts)


def scan_local_folder(
    folder: Path, caption_template: str = "{caption}", default_caption: str = "", max_images: int | None = None
) -> tuple[list[dict], SourceReport]:
    """Rows for the images in `folder` and its subfolders (sorted by path) and the report on every
    file there.

    Caption priority per image: its metadata.jsonl / metadata.csv entry (file_name,text), then a
    `<stem>.txt` sidecar, then `<stem>.caption` (beside the image), then `default_caption`.
    Metadata entries naming a missing file, a file outside the folder or a file already listed are
    dropped and reported, not rows. Rows point at the original files (`image`, absolute) and name
    them (`source`, relative to the folder); see rows.py for `caption`, `caption_from` and
    `repeats` (an image in a kohya `<repeats>_<name>/` folder). Ids are file stems, made unique
    with _2, _3... in path order.
    """
    check_caption_template(caption_template)
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"dataset.path {str(folder)!r} is not a folder; point dataset.path at a folder of images.")
    report = SourceReport("local")
    listed = _listed_files(folder, _read_metadata(folder, report), report)
    names, texts = _folder_images(folder, listed, report)
    rows, ids, sidecars = [], _RowIds(names), {}
    for name in names:
        if max_images is not None and len(rows) >= max_images:
            report.file(name, "skipped", reason=f"over dataset.max_images ({max_images})")
            continue
        caption, where, used = _image_caption(folder, name, listed.get(name), sidecars)
        row = _image_row(folder, name, caption, where, ids.make(name),
                         apply_template(caption_template, caption or default_caption))
        report.file(name, "image", row=row["id"], caption=used, **({"repeats": row["repeats"]} if "repeats" in row else {}))
        rows.append(row)
    _account_caption_files(texts, names, sidecars, report)
    _account_folders(rows, report)
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


@dataclass
class _RowIds:
    """Row ids from file stems, with _2, _3... where an earlier file has that stem (a.jpg, a.png).
    Two stems that only meet as training file stems (rows.file_stem: ' edge' and 'edge') are
    refused, naming both files and a rename to a stem no file in the folder has."""

    names: list[str]  # every image file, to suggest a free name
    files: dict[str, str] = field(default_factory=dict)  # id -> file
    stems: dict[str, str] = field(default_factory=dict)  # file_stem(id) -> file

    def make(self, name: str) -> str:
        stem = Path(name).stem
        candidate, n = stem, 1
        while candidate in self.files:
            n += 1
            candidate = f"{stem}_{n}"
        safe = file_stem(candidate)
        if safe in self.stems:
            taken = set(self.stems) | {file_stem(Path(other).stem) for other in self.names}
            raise stem_clash(self.stems[safe], name, safe, taken)
        self.files[candidate], self.stems[safe] = name, name
        return candidate


JPEG_END = b"\xff\xd9"  # EOI: a JPEG cut short (a stopped copy or download) lacks it


def _ends_whole(source: Path) -> bool:
    """Whether a JPEG ends with its EOI marker (trailing zero padding allowed): a cheap sign that
    it is whole, so only the others are decoded before being copied."""
    with source.open("rb") as fh:
        fh.seek(max(0, source.stat().st_size - 4096))
        return fh.read().rstrip(b"\0").endswith(JPEG_END)


def _store_image(source: Path, images_dir: Path, row_id: str, background: RGB) -> tuple[Path | None, str]:
    """Put one image into the run; returns where (None: not stored), and how (for the report).

    An RGB JPEG shown as stored is copied byte for byte (no second lossy encode, decoded only when
    it does not end whole); anything else is decoded, turned upright and RGB, and saved as PNG
    (lossless). A file that cannot become a training image (undecodable, truncated, over the
    pixel limit) is not stored: no dead copy, possibly gigabytes, stays in the run; its row keeps
    the original path and the filter's integrity check drops it with the reason.
    """
    plain = is_plain_jpeg_file(source)
    if not plain or not _ends_whole(source):
        try:
            rgb, what = load_rgb(source, background)
        except BadImage as exc:
            return None, f"not stored: {exc} (the filter step drops it)"
        if not plain:
            target = images_dir / f"{row_id}.png"
            rgb.save(target, format="PNG")
            return target, f"converted from {what} to RGB PNG"
    target = images_dir / f"{row_id}{source.suffix.lower()}"
    shutil.copyfile(source, target)
    return target, "copied"


def copy_into_run(rows: list[dict], images_dir: Path, background: RGB = WHITE, report: SourceReport | None = None) -> list[dict]:
    """Store each row's image in `images_dir/<id>.<ext>` (see `_store_image`); rows then point there.

    A run's results stay valid when the source folder changes later. A missing file, or one that
    cannot become a training image, stays a row with its original path, for the filter to report.
    With `report`, each image's entry says how it was stored.
    """
    images_dir = Path(images_dir)
    images_dir.mkdir(parents=True, exist_ok=True)
    entries = {e["file"]: e for e in report.files if e["use"] == "image"} if report else {}
    copied = []
    for row in tqdm(rows, desc="storing images", unit="img", mininterval=5):
        source = Path(row["image"])
        target, how = _store_image(source, images_dir, row["id"], background) if source.is_file() else (None, "")
        if row.get("source") in entries and how:
            entries[row["source"]]["stored"] = how
        copied.append({**row, "image": os.path.abspath(target)} if target else dict(row))
    return copied


def collect_local(
    folder: Path, images_dir: Path, caption_template: str, default_caption: str, max_images: int | None, background: RGB = WHITE
) -> tuple[list[dict], SourceReport]:
    """The download stage for `dataset.source: local`: scan the folder, store its images in the run."""
    rows, report = scan_local_folder(folder, caption_template, default_caption, max_images)
    return copy_into_run(rows, images_dir, background, report), report
