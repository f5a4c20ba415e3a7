"""Pictures for the run's report: what the data filter dropped, and how long the GPU jobs took.

The dropped sheet reads filter_stats.json as filter_dataset writes it: `dropped` entries (id,
image relative to the stats file's folder, op, reason) and, under `download`, what the download
stage made of each input (its `dropped` entries never became rows, so they have no image and
are listed as text tiles). Images are decoded by kolors_story.data.images, the data stages' one
decoder, so a tile shows exactly what the filter saw; a file it cannot decode (that is often
why it was dropped) gets a grey placeholder tile, never an exception.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image, ImageDraw

from kolors_story.errors import UserError
from kolors_story.data.images import BadImage, load_rgb
from kolors_story.outputs.story_page import (
    BORDER_COLOUR,
    PAGE_BACKGROUND,
    TEXT_COLOUR,
    TITLE_COLOUR,
    draw_lines,
    line_height,
    load_font,
    wrap_text,
)

if TYPE_CHECKING:
    from matplotlib.figure import Figure

TILE = 160  # thumbnail cell, px a side
COLUMNS = 6
TEXT_PX = 13
CAPTION_LINES = 6  # a caption longer than this is cut with "…" (the full reason is in the JSON)
GAP = 12
PLACEHOLDER = (180, 180, 186)  # grey, apart from the tiles' border grey
PLACEHOLDER_TEXT = (70, 70, 70)
TEXT_TILE = (235, 235, 245)


def _tile_image(entry: dict, images_root: Path, font) -> Image.Image:
    """The dropped image as a thumbnail, or a grey tile saying why it cannot be shown."""
    if "image" not in entry:  # a download-stage drop: never became a row, no image in the run
        where = entry.get("file") or entry.get("where") or f"record {entry.get('record', '?')}"
        return _text_tile(f"not downloaded:\n{where}", TEXT_TILE, font)
    path = images_root / entry["image"]
    if not path.is_file():
        return _text_tile("image not shown:\nfile not found", PLACEHOLDER, font)
    try:
        image, _ = load_rgb(path)
    except BadImage as exc:
        return _text_tile(f"image not shown:\n{exc}", PLACEHOLDER, font)
    image.thumbnail((TILE, TILE), Image.Resampling.LANCZOS)
    return image


def _text_tile(text: str, colour: tuple[int, int, int], font) -> Image.Image:
    tile = Image.new("RGB", (TILE, TILE), colour)
    lines = wrap_text(text, font, TILE - 8)[: TILE // line_height(font)]
    draw_lines(ImageDraw.Draw(tile), lines, font, 4, 4, TILE - 8, PLACEHOLDER_TEXT, centre=False)
    return tile


def _caption(entry: dict, font) -> list[str]:
    op = entry.get("op") or "download"
    name = entry.get("id") or entry.get("file") or entry.get("where") or f"record {entry.get('record', '?')}"
    lines = wrap_text(str(name), font, TILE) + wrap_text(f"{op}: {entry.get('reason', '')}", font, TILE)
    if len(lines) > CAPTION_LINES:
        lines = lines[: CAPTION_LINES - 1] + [lines[CAPTION_LINES - 1][:-1] + "…"]
    return lines


def _entries(filter_stats: dict) -> list[dict]:
    """The filter's drops (in the order the ops ran), then the download stage's."""
    download = filter_stats.get("download") or {}
    return list(filter_stats.get("dropped") or []) + list(download.get("dropped") or [])


def _title(filter_stats: dict, shown: int, total: int) -> str:
    rows_in, rows_out = filter_stats.get("rows_in"), filter_stats.get("rows_out")
    counts = f" ({rows_in} rows in, {rows_out} kept)" if rows_in is not None else ""
    more = f"; the first {shown} shown" if shown < total else ""
    return f"{total} dropped{counts}{more}"


def _nothing_dropped(filter_stats: dict, font) -> Image.Image:
    rows = filter_stats.get("rows_in")
    text = "nothing dropped" + (f": all {rows} rows kept" if rows is not None else "")
    image = Image.new("RGB", (round(font.getlength(text)) + 2 * GAP, line_height(font) + 2 * GAP), PAGE_BACKGROUND)
    ImageDraw.Draw(image).text((GAP, GAP), text, font=font, fill=TEXT_COLOUR)
    return image


def draw_dropped_sheet(filter_stats: dict, images_root: Path, path: Path, max_tiles: int = 48) -> Path:
    """A contact sheet of what the filter (and the download stage) dropped: one tile per entry,
    captioned with its id and "op: reason"; `images_root` is the folder the entries' `image`
    paths are relative to (filter_stats.json's own folder). At most `max_tiles` tiles."""
    if max_tiles < 1:
        raise UserError(f"max_tiles {max_tiles} must be at least 1.")
    font, title_font = load_font(TEXT_PX), load_font(round(TEXT_PX * 1.4), weight="Bold")
    entries = _entries(filter_stats)
    if not entries:
        return _save(_nothing_dropped(filter_stats, title_font), path)
    shown = entries[:max_tiles]
    captions = [_caption(e, font) for e in shown]
    cell_h = TILE + 4 + max(len(c) for c in captions) * line_height(font)
    columns = min(COLUMNS, len(shown))
    rows = math.ceil(len(shown) / columns)
    title = _title(filter_stats, len(shown), len(entries))
    title_h = line_height(title_font) + GAP
    sheet = Image.new("RGB", (GAP + columns * (TILE + GAP), GAP + title_h + rows * (cell_h + GAP)), PAGE_BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    draw.text((GAP, GAP), title, font=title_font, fill=TITLE_COLOUR)
    for index, (entry, caption) in enumerate(zip(shown, captions)):
        row, col = divmod(index, columns)
        x, y = GAP + col * (TILE + GAP), GAP + title_h + row * (cell_h + GAP)
        tile = _tile_image(entry, Path(images_root), font)
        ox, oy = x + (TILE - tile.width) // 2, y + (TILE - tile.height) // 2
        draw.rectangle((ox - 1, oy - 1, ox + tile.width, oy + tile.height), outline=BORDER_COLOUR)
        sheet.paste(tile, (ox, oy))
        draw_lines(draw, caption, font, x, y + TILE + 4, TILE, TEXT_COLOUR, centre=False)
    return _save(sheet, path)


def _save(image: Image.Image, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG")  # Pillow adds no time or text chunks: reruns give equal bytes
    return path


# ------------------------------------------------------------------------------------ timings


def timing_rows(benchmarks: dict[str, dict]) -> list[tuple[str, float, float]]:
    """`manifest.read_benchmarks`' result as draw_timings rows: (job, seconds, max_rss MiB), NaN
    where Snakemake wrote NA (it measured nothing)."""
    return [(name, float(t.get("s", math.nan)), float(t.get("max_rss", math.nan))) for name, t in benchmarks.items()]


def draw_timings(rows: list[tuple[str, float, float]], path: Path) -> Path:
    """A horizontal bar chart of wall seconds per job (rows as given, first at the top), each bar
    labelled with its seconds and peak RSS (MiB, Snakemake's max_rss) where known (NaN: unknown).
    No rows: a chart that says so (the report still links the file)."""
    # A bare Figure (no pyplot): no global backend or figure registry, saved through Agg (PNG).
    # Imported here: only the report rules need matplotlib (0.3 s to import).
    from matplotlib.figure import Figure

    labels = [label for label, _, _ in rows]
    seconds = [0.0 if _missing(s) else float(s) for _, s, _ in rows]  # unmeasured: an empty bar, labelled so
    fig = Figure(figsize=(8, 1.2 + 0.35 * max(1, len(rows))), dpi=100)
    ax = fig.subplots()
    if not rows:  # still a picture: the report links it, and an empty chart says why
        ax.text(0.5, 0.5, "no benchmark files: no GPU job ran for this run", ha="center", va="center")
        ax.set_axis_off()
        return _save_figure(fig, path)
    bars = ax.barh(range(len(rows)), seconds, color="#4477aa")
    ax.set_yticks(range(len(rows)), labels)
    ax.invert_yaxis()  # first job at the top, like the table it comes from
    ax.set_xlabel("wall time (s)")
    ax.set_title(f"GPU jobs: {sum(seconds):.1f} s in all")
    ax.bar_label(bars, labels=[_bar_label(s, rss) for _, s, rss in rows], padding=3, fontsize=8)
    ax.set_xlim(0, max(seconds + [1e-9]) * 1.3)  # room for the labels past the longest bar
    return _save_figure(fig, path)


def _save_figure(fig: Figure, path: Path) -> Path:
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", metadata={"Software": None})  # no version stamp: same bytes
    return path


def _missing(value: Any) -> bool:
    return value is None or math.isnan(float(value))


def _bar_label(seconds: Any, rss: Any) -> str:
    text = "not measured" if _missing(seconds) else f"{float(seconds):.1f} s"
    return text if _missing(rss) else f"{text}, {float(rss):.0f} MiB"
