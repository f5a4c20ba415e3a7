"""The training folder: `train/metadata.csv` (file_name,text) beside RGB JPEGs named by row id;
a `repeats` column is added only when some image repeats (kohya `<repeats>_<name>/` folders): our
trainer reads it; a reader of file_name,text only (DiffSynth-Studio's) shows each image once.

This is the layout DiffSynth-Studio 1.1.x's Kolors LoRA trainer reads with
`--dataset_path out_dir` (diffsynth/data/simple_text_image.py: pandas.read_csv of
`<dataset_path>/train/metadata.csv`, images at `<dataset_path>/train/<file_name>`).
"""

from __future__ import annotations

import csv
import logging
import shutil
from collections.abc import Sequence
from pathlib import Path

from kolors_story.chatglm_tokens import MAX_TOKENS, count_tokens, dropped_text
from kolors_story.errors import UserError
from kolors_story.data.images import BadImage, is_plain_jpeg_file, load_rgb
from kolors_story.data.rows import file_stem, stem_clash

JPEG_QUALITY = 95
log = logging.getLogger(__name__)


def _write_rgb_jpeg(source: Path, target: Path) -> None:
    """Copy an upright RGB JPEG as is (no second lossy encode); convert anything else (the
    download stage already made every image upright RGB; see images.load_rgb)."""
    if is_plain_jpeg_file(source):
        shutil.copyfile(source, target)
        return
    load_rgb(source)[0].save(target, format="JPEG", quality=JPEG_QUALITY)


def check_caption_lengths(rows: list[dict], truncate: bool) -> None:
    """Captions over ChatGLM's 256 tokens: refused, naming each image and its count, or (with
    dataset.truncate_long_captions) logged once each with the words the cut drops."""
    long = [(row, n) for row in rows if (n := count_tokens(str(row.get("text") or ""))) > MAX_TOKENS]
    if long and not truncate:
        listed = "; ".join(f"{row['id']} ({row['image']}): {n} tokens" for row, n in long[:10])
        more = f" and {len(long) - 10} more" if len(long) > 10 else ""
        raise UserError(f"{len(long)} caption(s) over ChatGLM's {MAX_TOKENS} tokens (after "
                        f"dataset.caption_template): {listed}{more}. Shorten them, or set "
                        "dataset.truncate_long_captions: true to train on the cut captions.")
    for row, n in long:
        log.warning("caption of %s cut at %d tokens (%d tokens), losing %r", row["id"], MAX_TOKENS, n,
                    dropped_text(str(row["text"])))


def cut_captions(dataset: Path) -> list[dict[str, str]]:
    """The captions of a training folder (`dataset/train/metadata.csv`) that ChatGLM cuts (only
    with dataset.truncate_long_captions), each with its image and the words it loses."""
    with open(Path(dataset) / "train" / "metadata.csv", newline="", encoding="utf-8") as handle:
        return [{"image": row["file_name"], "dropped": dropped} for row in csv.DictReader(handle)
                if (dropped := dropped_text(row["text"]))]


def too_small_for_a_step(images: int, per_epoch: int, step: dict, where: str) -> UserError | None:
    """The refusal of a dataset smaller than one optimizer step (`step`: {batch_size,
    gradient_accumulation, processes}), None when it is large enough; `where` starts the message.
    The trainer (training.data.check_dataset_size) and encode_texts (check_step_fits) say it alike."""
    per_step = step["batch_size"] * step["gradient_accumulation"] * step["processes"]
    if per_epoch >= per_step:
        return None
    with_repeats = f" ({per_epoch} examples per epoch with their repeats)" if per_epoch != images else ""
    return UserError(
        f"{where} holds {images} image(s){with_repeats} after filtering, fewer than one optimizer step takes: "
        f"train.batch_size {step['batch_size']} x train.gradient_accumulation {step['gradient_accumulation']} "
        f"x train.processes {step['processes']} = {per_step}. Lower those settings so that their product "
        f"is at most {per_epoch}, or add images (or loosen filter.ops)."
    )


def build_training_folder(rows: list[dict], out_dir: Path, truncate_long_captions: bool = False) -> Path:
    """Write `out_dir/train/<id>.jpg` and `out_dir/train/metadata.csv`; return the csv path.

    The folder is rebuilt from scratch so no image of an earlier run lingers. An empty caption
    is refused: pandas reads it back as NaN, which the trainer cannot tokenise. A dataset smaller
    than one optimizer step is refused by encode_texts (training.data.check_step_fits), before
    ChatGLM loads: a param here would rebuild the folder, and rerun every training that shares it,
    whenever the strictest batch size changes.
    """
    if not rows:
        raise UserError("No rows to train on; the filter kept no images (see its stats and filter.ops).")
    check_caption_lengths(rows, truncate_long_captions)
    train = Path(out_dir) / "train"
    if train.exists():
        shutil.rmtree(train)
    train.mkdir(parents=True)
    records, taken = [], {}
    for row in rows:
        text = str(row.get("text") or "").strip()
        if not text:
            raise UserError(
                f"row {row['id']!r} ({row['image']}) has an empty caption; give it one or set dataset.default_caption."
            )
        stem = file_stem(str(row["id"]))
        if stem in taken:  # the download stage refuses such files; rows from elsewhere may not
            raise stem_clash(_file_of(taken[stem]), _file_of(row), stem, set(taken))
        taken[stem] = row
        name = f"{stem}.jpg"
        try:
            _write_rgb_jpeg(Path(row["image"]), train / name)
        except (OSError, BadImage) as exc:
            raise UserError(f"row {row['id']!r}: cannot read image {row['image']} ({exc}); rerun the filter_dataset step.") from exc
        records.append((name, text, row_repeats(row)))
    return write_metadata(train / "metadata.csv", records)


def _file_of(row: dict) -> str:
    """The file a row came from, as the user names it: its `source` (local folders), else its image."""
    return str(row.get("source") or row["image"])


def row_repeats(row: dict) -> int:
    """How many times a row's image is shown per epoch: its `repeats` (a kohya `<repeats>_<name>/`
    folder), else 1."""
    repeats = row.get("repeats", 1)
    if not isinstance(repeats, int) or isinstance(repeats, bool) or repeats < 1:
        raise UserError(f"row {row['id']!r} has repeats {repeats!r}; it must be a whole number >= 1 (rebuild the rows file).")
    return repeats


def write_metadata(csv_path: Path, records: Sequence[tuple[str, str, int]]) -> Path:
    """metadata.csv from (file_name, text, repeats) records: file_name,text; a third column
    `repeats` only when some image repeats, so a dataset without repeats keeps the file
    DiffSynth-Studio reads, byte for byte. The one writer of the file (the GPU check's dataset and
    the tests' folders too)."""
    repeats = any(n != 1 for _, _, n in records)
    with Path(csv_path).open("w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["file_name", "text", "repeats"] if repeats else ["file_name", "text"])
        writer.writerows(records if repeats else [(name, text) for name, text, _ in records])
    return Path(csv_path)
