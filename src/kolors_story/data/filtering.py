"""Filter training rows: a strict integrity check, then Data-Juicer ops one at a time.

Each op runs on its own (DJ's op API on a NestedDataset) so the rows in and out of every op
are known and every dropped image is recorded with the op and the reason. Why not DJ's
executor: its batched image filters drop a whole batch when one file fails to open, and it
only reports totals.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from kolors_story.errors import UserError
from kolors_story.data.rows import images_per_folder
from kolors_story.data.images import (
    image_problem,  # the integrity check: missing, undecodable, truncated, too large
)

log = logging.getLogger(__name__)

OPS_KEY = "filter.ops"
INTEGRITY = "integrity_check"
ROW_COL = "kolors_row"  # index into the input rows: how DJ's output maps back to our rows
# Our defaults for every op; values from the config override them.
OP_DEFAULTS = {"auto_op_parallelism": False, "skip_op_error": False}


@dataclass
class FilterResult:
    """Kept rows (input order) and what happened: counts per op and every dropped row."""

    kept: list[dict]
    stats: dict = field(default_factory=dict)


# ---------------------------------------------------------------- integrity check


def _integrity_check(rows: list[dict]) -> tuple[list[int], list[dict]]:
    kept, dropped = [], []
    for index, row in enumerate(tqdm(rows, desc=INTEGRITY, unit="img", mininterval=5)):
        problem = image_problem(row["image"])
        if problem:
            dropped.append(_dropped(row, INTEGRITY, problem))
        else:
            kept.append(index)
    return kept, dropped


def _dropped(row: dict, op: str, reason: str) -> dict:
    """A dropped row: its id, image (in the run), the file it came from (local folders), op, reason."""
    source = {"source": row["source"]} if row.get("source") else {}
    return {"id": row["id"], "image": row["image"], **source, "op": op, "reason": reason}


# ---------------------------------------------------------------- op configuration


def parse_ops(ops: list[dict] | None) -> list[tuple[str, dict]]:
    """Config entries (one-key mappings `{op_name: {arg: value}}`) as (name, args) pairs."""
    parsed = []
    for i, entry in enumerate(ops or []):
        if not isinstance(entry, dict) or len(entry) != 1:
            raise UserError(f"{OPS_KEY}[{i}] is {entry!r}; each entry must be one mapping like `- image_shape_filter: {{min_width: 1024}}`.")
        name, args = next(iter(entry.items()))
        if args is None:
            args = {}
        if not isinstance(args, dict):
            raise UserError(f"{OPS_KEY}[{i}] ({name}) has arguments {args!r}; they must be a mapping of argument: value.")
        parsed.append((str(name), dict(args)))
    return parsed


@contextlib.contextmanager
def _no_runtime_installs() -> Iterator[None]:
    """Turn Data-Juicer's install-on-import (uv/pip at run time) into a clear error.

    DJ has no setting for this; a workflow step must never change its own environment.
    """
    from data_juicer.utils.lazy_loader import LazyLoader

    original = LazyLoader.__dict__["_install_package"]

    def refuse(cls: type, package_spec: str, pip_args: Any = None) -> bool:
        raise UserError(
            f"Data-Juicer wants to install {package_spec!r} while filtering (an op in {OPS_KEY} needs it). "
            f"Install it into the environment first (pip install {package_spec}) or remove that op from {OPS_KEY}."
        )

    LazyLoader._install_package = classmethod(refuse)
    try:
        yield
    finally:
        LazyLoader._install_package = original


def _check_ops(parsed: list[tuple[str, dict]]) -> None:
    """Unknown op names, argument names and types, via DJ's own preflight (with suggestions)."""
    from data_juicer.core.preflight import PipelineConfigError, pre_instantiation_check
    from data_juicer.ops.base_op import OPERATORS, Deduplicator, Filter

    try:
        pre_instantiation_check([{name: args} for name, args in parsed])
    except PipelineConfigError as exc:
        problems = "; ".join(str(e) for e in exc.errors)
        raise UserError(f"{OPS_KEY}: {problems}. Fix the op name or argument in {OPS_KEY}.") from None
    for name, _ in parsed:
        cls = OPERATORS.modules[name]
        if not issubclass(cls, (Filter, Deduplicator)):
            raise UserError(
                f"{OPS_KEY}: {name} is a Data-Juicer {cls.__mro__[1].__name__}, not a Filter or Deduplicator; "
                f"only ops that keep or drop images belong in {OPS_KEY}."
            )


def _build_op(name: str, args: dict, work_dir: Path, num_proc: int) -> Any:
    from data_juicer.ops.base_op import OPERATORS

    kwargs = {**OP_DEFAULTS, "num_proc": num_proc, "work_dir": str(work_dir), **args}
    try:
        return OPERATORS.modules[name](**kwargs)
    except (TypeError, ValueError) as exc:
        raise UserError(f"{OPS_KEY}: cannot set up {name} with {args}: {exc}. Fix its arguments in {OPS_KEY}.") from exc


# ---------------------------------------------------------------- running one op


def _plain(value: Any) -> Any:
    """A stat value as short readable text: single-image lists unwrapped, floats to 4 digits."""
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        if len(value) == 1:
            return _plain(value[0])
        return "[" + ", ".join(str(_plain(v)) for v in value) + "]"
    if isinstance(value, (float, np.floating)):
        return f"{float(value):.4g}"
    return value


def _filter_reason(stats: dict, args: dict) -> str:
    shown = ", ".join(f"{k}={_plain(v)}" for k, v in stats.items()) or "no stats"
    limits = ", ".join(f"{k}={v}" for k, v in args.items())
    return f"{shown}" + (f" (settings: {limits})" if limits else "")


def _run_filter(op: Any, dataset: Any, args: dict) -> tuple[Any, dict[int, str]]:
    """Stats for every row, then DJ's keep decision; reasons for the rows it drops."""
    from data_juicer.utils.constant import Fields

    with_stats = op.run(dataset, reduce=False)
    kept = with_stats.filter(op.process, num_proc=op.runtime_np(), batch_size=op.batch_size, desc=op._name + "_process")
    kept_rows = set(kept[ROW_COL])
    reasons = {
        sample[ROW_COL]: _filter_reason(sample.get(Fields.stats) or {}, args)
        for sample in with_stats
        if sample[ROW_COL] not in kept_rows
    }
    return kept, reasons


def _own_caption(row: dict) -> str:
    """The user's own caption of a row (blank and missing alike: "")."""
    return str(row.get("caption") or "").strip()


def _preference(row: dict, index: int) -> tuple[bool, int, int]:
    """Sort key of the copy a deduplicator keeps: one with a caption, then the longer caption,
    then the first by name (rows come in path order)."""
    caption = _own_caption(row)
    return (not caption, -len(caption), index)


def _why_kept(kept: dict, dropped: dict) -> str:
    """Why `kept` won over `dropped` (_preference in words)."""
    mine, theirs = _own_caption(kept), _own_caption(dropped)
    where = f" ({kept['caption_from']})" if kept.get("caption_from") and mine else ""
    if mine and not theirs:
        return f"it has a caption{where} and this copy has none"
    if len(mine) > len(theirs):
        return f"its caption{where} is longer ({len(mine)} vs {len(theirs)} characters)"
    return "it comes first by name (" + ("captions equally long" if mine else "neither has a caption") + ")"


def _run_deduplicator(op: Any, dataset: Any, rows: list[dict]) -> tuple[Any, dict[int, str]]:
    """Hashes for every row, then DJ's dedup; a dropped row names the kept row with its hash.

    DJ keeps the first of equal hashes in dataset order (image_deduplicator's process), so the
    rows go in by preference (_preference) and come back in input order."""
    indices = dataset[ROW_COL]
    order = sorted(range(len(indices)), key=lambda i: _preference(rows[indices[i]], indices[i]))
    with_hash = op.run(dataset.select(order), reduce=False)
    kept, _ = op.process(with_hash)
    hash_cols = [c for c in with_hash.column_names if c not in dataset.column_names]
    kept_rows = set(kept[ROW_COL])
    first_kept: dict[tuple, int] = {}
    reasons = {}
    for sample in with_hash:
        key = tuple(str(sample[c]) for c in hash_cols)
        if sample[ROW_COL] in kept_rows:
            first_kept.setdefault(key, sample[ROW_COL])
            continue
        shown = ", ".join(f"{c.replace('__dj__', '')}={sample[c]}" for c in hash_cols if len(str(sample[c])) <= 64)
        reasons[sample[ROW_COL]] = _duplicate_reason(rows, first_kept.get(key), sample[ROW_COL], shown)
    kept_indices = kept[ROW_COL]
    return kept.select(sorted(range(len(kept_indices)), key=kept_indices.__getitem__)), reasons


def _duplicate_reason(rows: list[dict], twin: int | None, index: int, hashes: str) -> str:
    """Which kept copy a dropped duplicate gave way to, and why that copy was kept."""
    shown = f" ({hashes})" if hashes else ""
    if twin is None:  # near-duplicate ops (minhash...) match without one equal hash
        return f"duplicate{shown}"
    kept = rows[twin]
    return f"duplicate of {kept['id']}{shown}: kept {kept.get('source') or kept['id']} because {_why_kept(kept, rows[index])}"


def _plain_columns(dataset: Any) -> Any:
    """Drop stats/hash columns so the next op computes and reports only its own values."""
    extra = [c for c in dataset.column_names if c not in ("text", "images", ROW_COL)]
    return dataset.remove_columns(extra) if extra else dataset


@contextlib.contextmanager
def _quiet_datasets() -> Iterator[None]:
    """HF datasets draws three progress bars per op; one log line per op says more."""
    import datasets

    was_disabled = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            datasets.enable_progress_bars()


def _zero_rows_error(stats: dict) -> UserError:
    """No image survived: name the op that removed the most (the one to loosen) and the last one."""
    removed = [(o["op"], o["rows_in"] - o["rows_out"]) for o in stats["ops"]]
    most, count = max(removed, key=lambda r: r[1])  # the first of equals, in op order
    last, last_count = removed[-1]
    shown = "; ".join([f"{d['id']}: {d['reason']}" for d in stats["dropped"] if d["op"] == most][:3])
    per_op = ", ".join(f"{op} {n}" for op, n in removed)
    where = ("check the images in dataset.path (or the download): they do not open" if most == INTEGRITY
             else f"loosen {most} in {OPS_KEY} (config.yaml) or remove it")
    return UserError(
        f"No images left after filtering: of {stats['rows_in']} images, {most} removed the most ({count}; e.g. {shown}), "
        f"and {last} removed the last {last_count} rows. Removed per op: {per_op}. To fix, {where}."
    )


def repeats_summary(rows: list[dict]) -> dict | None:
    """Per folder with repeats (kohya `<repeats>_<name>/`): repeats, images kept and examples per
    epoch, and the epoch's total; None when no row has repeats (stats stay as they were)."""
    if not any("repeats" in row for row in rows):
        return None
    folders = sorted(({"folder": (name or ".") + "/", **counts} for name, counts in images_per_folder(rows).items()),
                     key=lambda e: e["folder"])
    return {"images": len(rows), "examples_per_epoch": sum(e["examples_per_epoch"] for e in folders),
            "folders": folders}


# ---------------------------------------------------------------- the stage


def filter_rows(rows: list[dict], ops: list[dict], work_dir: Path, num_proc: int = 1) -> FilterResult:
    """Integrity check, then the configured Data-Juicer ops in order; kept rows keep their order.

    `ops` is the `filter.ops` config list, e.g. `[{"image_shape_filter": {"min_width": 1024}}]`.
    Raises UserError for an unknown op or argument, and when no row survives (naming the op
    that removed the most). With kohya repeats, `stats['repeats']` sums them up (repeats_summary).
    """
    parsed = parse_ops(ops)
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    stats: dict = {"rows_in": len(rows), "rows_out": 0, "ops": [], "dropped": []}
    if parsed:
        with _no_runtime_installs():
            _check_ops(parsed)  # a config typo should fail before minutes of decoding

    alive, dropped = _integrity_check(rows)
    stats["ops"].append({"op": INTEGRITY, "rows_in": len(rows), "rows_out": len(alive)})
    stats["dropped"].extend(dropped)
    log.info("%s: %d -> %d rows", INTEGRITY, len(rows), len(alive))
    if not alive:
        raise _zero_rows_error(stats)

    if parsed:
        with _no_runtime_installs(), _quiet_datasets():
            alive = _run_ops(rows, alive, parsed, work_dir, num_proc, stats)

    stats["rows_out"] = len(alive)
    kept = [rows[i] for i in alive]
    repeats = repeats_summary(kept)
    if repeats:
        stats["repeats"] = repeats
    return FilterResult(kept=kept, stats=stats)


def _run_ops(rows: list[dict], alive: list[int], parsed: list[tuple[str, dict]], work_dir: Path, num_proc: int, stats: dict) -> list[int]:
    """Run each op on the surviving rows; returns the indices of the rows that survive all."""
    from data_juicer.core.data import NestedDataset
    from data_juicer.ops.base_op import Filter
    from data_juicer.utils.mm_utils import SpecialTokens

    dataset = NestedDataset.from_list(
        [{"text": f"{SpecialTokens.image} {rows[i]['text']} {SpecialTokens.eoc}", "images": [rows[i]["image"]], ROW_COL: i} for i in alive]
    )
    for name, args in parsed:
        started = time.monotonic()
        op = _build_op(name, args, work_dir, num_proc)
        rows_in = len(dataset)
        if isinstance(op, Filter):
            dataset, reasons = _run_filter(op, dataset, args)
        else:
            dataset, reasons = _run_deduplicator(op, dataset, rows)
        dataset = _plain_columns(dataset)
        dropped = [_dropped(rows[i], name, reason) for i, reason in sorted(reasons.items())]
        stats["ops"].append({"op": name, "rows_in": rows_in, "rows_out": len(dataset)})
        stats["dropped"].extend(dropped)
        log.info("%s: %d -> %d rows (%.1f s)", name, rows_in, len(dataset), time.monotonic() - started)
        if len(dataset) == 0:
            raise _zero_rows_error(stats)
    return sorted(dataset[ROW_COL])


def read_filter_stats(path: Path) -> dict:
    """filter_stats.json as the filter job wrote it."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"Filter statistics {path} cannot be read ({exc}); rerun rule filter_dataset.") from exc


def relocate_dropped(stats: dict, from_dir: Path, to_dir: Path) -> dict:
    """`stats` with each dropped image's path, relative to `from_dir` (or absolute), made relative
    to `to_dir`: results files hold relative paths, so results/ can move."""
    from kolors_story.data.rows import relative_path

    return {**stats, "dropped": [{**d, "image": relative_path(Path(from_dir) / d["image"], to_dir)}
                                 for d in stats["dropped"]]}
