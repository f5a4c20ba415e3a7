"""Rows ({"id", "image", "text"}), the account of every file a source saw (SourceReport), and rows
files: JSON Lines whose image paths are relative to the file, so a moved or shared results/ folder
stays valid.

Every row the download stage writes (local folder and ModelScope alike) also carries:
- `caption`: the user's own caption for the image, stripped and untemplated; "" when they gave none;
- `caption_from`: where it came from: "metadata.csv line 3", a sidecar ("sub/a.txt"), the dataset
  column's name, or DEFAULT_CAPTION_KEY when `text` was made from dataset.default_caption (then
  `caption` is "").
`text` is what training reads: dataset.caption_template applied to the caption or the default.
Local-folder rows also have `source` (the file, relative to dataset.path) and, in a kohya
`<repeats>_<name>/` folder, `repeats`. Later stages keep fields they do not know.
"""

from __future__ import annotations

import json
import os
import posixpath
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kolors_story.errors import UserError

DEFAULT_CAPTION_KEY = "dataset.default_caption"  # caption_from of a row with no caption of its own


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


JPEG_QUALITY = 95


def file_stem(row_id: str) -> str:
    """The file stem a row id trains under: path separators and control characters replaced,
    leading and trailing whitespace dropped (U+3000 too)."""
    return re.sub(r"[\\/\x00-\x1f]", "_", row_id).strip() or "_"


def _changed_by_file_stem(name: str) -> bool:
    stem = posixpath.splitext(posixpath.basename(name))[0]
    return file_stem(stem) != stem


def stem_clash(first: str, second: str, stem: str, taken: set[str]) -> UserError:
    """Two files whose ids both train as `<stem>.jpg`: the error names both, and the rename that
    fixes it (of the one that file_stem changes; to a stem not in `taken`)."""
    renamed = first if _changed_by_file_stem(first) and not _changed_by_file_stem(second) else second
    n = 2
    while f"{stem}_{n}" in taken:
        n += 1
    new = posixpath.join(posixpath.dirname(renamed), f"{stem}_{n}{posixpath.splitext(renamed)[1]}")
    return UserError(
        f"{first!r} and {second!r} would both train as {stem + '.jpg'!r} (a training file name keeps no "
        f"leading or trailing spaces, path separators or control characters); rename {renamed!r} in "
        f"dataset.path, e.g. to {new!r}, and rerun."
    )


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


def images_per_folder(rows: list[dict]) -> dict[str, dict[str, int]]:
    """Per folder of the rows' `source` ("" for dataset.path itself), sorted: its `repeats` (kohya's
    `<repeats>_<name>/`, else 1), its `images` and its `examples_per_epoch` (images x repeats)."""
    folders: dict[str, dict[str, int]] = {}
    for row in rows:
        entry = folders.setdefault(posixpath.dirname(str(row.get("source", ""))),
                                   {"repeats": row.get("repeats", 1), "images": 0})
        entry["images"] += 1
    for entry in folders.values():
        entry["examples_per_epoch"] = entry["images"] * entry["repeats"]
    return dict(sorted(folders.items()))
