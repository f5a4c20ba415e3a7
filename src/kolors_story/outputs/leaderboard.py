"""The sweep's leaderboard: every variant's score, pass/fail, consistency and the settings that
set it apart, as a table (CSV) and as a picture (PNG with each variant's story thumbnail).

A variant is a run under results/<variant>/; what is read from it is its scores.json, story.png
and config.yaml (the resolved config). Ranks are positions (1..n): equal means are ordered by
name, so exactly one variant is the best and the same inputs always give the same table.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from PIL import Image, ImageDraw

from kolors_story.errors import UserError
from kolors_story.data.images import BadImage, load_rgb
from kolors_story.outputs.story_page import (
    BORDER_COLOUR,
    HIGHLIGHT_COLOUR,
    PAGE_BACKGROUND,
    TEXT_COLOUR,
    draw_lines,
    line_height,
    load_font,
    wrap_text,
)
from kolors_story.dotted import differing_settings, flatten

FIXED_COLUMNS = ("rank", "variant", "mean_score", "passes", "threshold", "consistency",
                 "consistency_gain", "panels", "best")
THUMB_HEIGHT = 256  # story thumbnail height on the leaderboard picture
MAX_THUMB_WIDTH = 768  # a very wide story is scaled to this width instead (then shorter)
TEXT_PX = 18
TEXT_WIDTH = 560  # the text column wraps here (long prompts as setting values)
PAD = 16
BEST_BORDER = 6
PASS_COLOUR = (30, 150, 60)
FAIL_COLOUR = (200, 40, 40)
BADGE_TEXT = (255, 255, 255)


@dataclass(frozen=True)
class RunResult:
    """One variant's results: scores.json as read, its story image file and its resolved config."""

    name: str
    summary: dict
    story: Path
    config: dict


def _read_mapping(path: Path, what: str, step: str, parse: Callable[[str], Any],
                  errors: tuple[type[Exception], ...]) -> dict:
    """A JSON or YAML file that must hold a mapping; every failure names the file and the fix."""
    if not path.is_file():
        raise UserError(f"{what} {path} does not exist; run the variant's {step} step first.")
    try:
        data = parse(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, *errors) as exc:
        raise UserError(f"{what} {path} cannot be read ({exc}); delete it and rerun the variant.") from exc
    if not isinstance(data, dict):
        raise UserError(f"{what} {path} holds {type(data).__name__}, not a mapping; delete it and rerun the variant.")
    return data


def _read_json(path: Path, what: str) -> dict:
    return _read_mapping(path, what, "score_images", json.loads, (json.JSONDecodeError,))


def _read_config(path: Path) -> dict:
    return _read_mapping(path, "resolved config", "manifest", yaml.safe_load, (yaml.YAMLError,))


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def load_run(name: str, scores_json: Path, story_png: Path, config_yaml: Path) -> RunResult:
    """Read one variant's results; a missing or unreadable file is a UserError naming it."""
    scores_json, story_png, config_yaml = Path(scores_json), Path(story_png), Path(config_yaml)
    summary = _read_json(scores_json, "scores file")
    for key in ("mean", "threshold"):
        if not _is_number(summary.get(key)):
            raise UserError(f"scores file {scores_json} has no numeric {key!r} (found {summary.get(key)!r}); "
                            "delete it and rerun the variant's score_images step.")
    if not story_png.is_file():
        raise UserError(f"story image {story_png} does not exist; run the variant's compose_story step first.")
    return RunResult(name=name, summary=summary, story=story_png, config=_read_config(config_yaml))


def _setting_value(value: Any) -> Any:
    """Scalars as they are (CSV writes them plainly); lists and mappings as JSON, Chinese kept."""
    if value is None or isinstance(value, (str, int, float, bool)):
        return "" if value is None else value
    return json.dumps(value, ensure_ascii=False, sort_keys=True)


def _optional(value: Any) -> Any:
    return value if _is_number(value) else ""


def leaderboard_rows(runs: list[RunResult]) -> list[dict]:
    """One row per variant, best mean first (equal means by name); FIXED_COLUMNS, then one column
    per dotted setting whose value differs between the variants (`run` ignored)."""
    if not runs:
        raise UserError("No variants to compare; the sweep produced no runs.")
    names = [r.name for r in runs]
    if len(set(names)) != len(names):
        raise UserError(f"Variant names repeat in {names}; every variant needs its own name.")
    settings = differing_settings({r.name: r.config for r in runs})
    ordered = sorted(runs, key=lambda r: (-float(r.summary["mean"]), r.name))
    rows = []
    for rank, run in enumerate(ordered, 1):
        summary, flat = run.summary, flatten(run.config)
        mean, threshold = float(summary["mean"]), float(summary["threshold"])
        row: dict[str, Any] = {
            "rank": rank, "variant": run.name, "mean_score": mean, "passes": mean >= threshold,
            "threshold": threshold,
            "consistency": _optional((summary.get("consistency") or {}).get("mean")),
            "consistency_gain": _optional((summary.get("consistency_comparison") or {}).get("gain")),
            "panels": summary.get("n", len(summary.get("scores") or {})),
            "best": rank == 1,
        }
        row.update({key: _setting_value(flat.get(key)) for key in settings})
        rows.append(row)
    return rows


def write_leaderboard_csv(rows: list[dict], path: Path) -> Path:
    """UTF-8 CSV of `leaderboard_rows`; floats as repr, so float(cell) gives back the same value."""
    if not rows:
        raise UserError("No leaderboard rows to write; the sweep produced no runs.")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        for row in rows:
            writer.writerow({k: repr(v) if isinstance(v, float) else v for k, v in row.items()})
    return path


# ------------------------------------------------------------------------------------ picture


def _thumbnail(story: Path) -> Image.Image:
    try:
        image, _ = load_rgb(story)
    except BadImage as exc:
        raise UserError(f"story image {story} cannot be shown on the leaderboard ({exc}); rerun compose_story.") from exc
    scale = min(THUMB_HEIGHT / image.height, MAX_THUMB_WIDTH / image.width)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.Resampling.LANCZOS)


def _number(value: Any, digits: int = 4) -> str:
    return f"{value:.{digits}f}" if _is_number(value) else "–"


def _text_lines(row: dict, settings: list[str]) -> list[tuple[str, str]]:
    """(style, text) lines of a row's text column, after the name and the pass badge."""
    lines = [("plain", f"mean score {_number(row['mean_score'])}  ({row['panels']} panels)"),
             ("plain", f"consistency {_number(row['consistency'])}"
                       + (f"  (gain {row['consistency_gain']:+.3g})" if _is_number(row["consistency_gain"]) else ""))]
    lines += [("setting", f"{key} = {row[key]}") for key in settings]
    return lines


def _badge(draw: ImageDraw.ImageDraw, xy: tuple[int, int], text: str, colour: tuple, font) -> int:
    """A filled rounded label at `xy`; returns its width."""
    w = round(font.getlength(text)) + 2 * (TEXT_PX // 2)
    h = line_height(font)
    draw.rounded_rectangle((xy[0], xy[1], xy[0] + w, xy[1] + h), radius=h // 3, fill=colour)
    draw.text((xy[0] + TEXT_PX // 2, xy[1] + 1), text, font=font, fill=BADGE_TEXT)
    return w


def _row_block(row: dict, settings: list[str], fonts: dict) -> list[tuple[str, str]]:
    """Every wrapped line of a row's text column, in order, with its style."""
    out: list[tuple[str, str]] = [("name", line) for line in wrap_text(row["variant"], fonts["name"], TEXT_WIDTH)]
    out.append(("badges", ""))
    for style, text in _text_lines(row, settings):
        out += [(style, line) for line in wrap_text(text, fonts["plain"], TEXT_WIDTH)]
    return out


def _draw_row(page: Image.Image, draw: ImageDraw.ImageDraw, top: int, geometry: dict, row: dict,
              thumb: Image.Image, block: list[tuple[str, str]], fonts: dict) -> None:
    left, rank_w, thumb_w, height = geometry["left"], geometry["rank_w"], geometry["thumb_w"], geometry["height"]
    if row["best"]:  # the best variant: a thick border round its whole row
        draw.rectangle((left - PAD // 2, top - PAD // 2, geometry["right"] + PAD // 2, top + height + PAD // 2),
                       outline=HIGHLIGHT_COLOUR, width=BEST_BORDER)
    draw_lines(draw, [f"#{row['rank']}"], fonts["rank"], left, top + (height - line_height(fonts["rank"])) // 2,
                rank_w, TEXT_COLOUR, centre=True)
    tx = left + rank_w + (thumb_w - thumb.width) // 2
    ty = top + (height - thumb.height) // 2
    draw.rectangle((tx - 1, ty - 1, tx + thumb.width, ty + thumb.height), outline=BORDER_COLOUR)
    page.paste(thumb, (tx, ty))
    x, y = left + rank_w + thumb_w + PAD, top
    for style, text in block:
        font = fonts["name" if style == "name" else "plain"]
        if style == "badges":
            passed = row["passes"]
            label = f"PASS ≥ {row['threshold']:g}" if passed else f"FAIL < {row['threshold']:g}"
            w = _badge(draw, (x, y), label, PASS_COLOUR if passed else FAIL_COLOUR, fonts["plain"])
            if row["best"]:
                _badge(draw, (x + w + PAD // 2, y), "★ best", HIGHLIGHT_COLOUR, fonts["plain"])
        else:
            draw.text((x, y), text, font=font, fill=TEXT_COLOUR)
        y += line_height(font) + (4 if style == "badges" else 0)


def draw_leaderboard(rows: list[dict], runs: list[RunResult], path: Path) -> Path:
    """The leaderboard as a PNG: per variant in rank order its rank, story thumbnail, name, mean,
    PASS/FAIL badge, consistency and differing settings; the best row framed and badged."""
    if not rows:
        raise UserError("No leaderboard rows to draw; the sweep produced no runs.")
    by_name = {r.name: r for r in runs}
    missing = [row["variant"] for row in rows if row["variant"] not in by_name]
    if missing:
        raise UserError(f"Leaderboard rows name variants with no run results: {missing}.")
    settings = [k for k in rows[0] if k not in FIXED_COLUMNS]
    fonts = {"plain": load_font(TEXT_PX), "name": load_font(round(TEXT_PX * 1.3), weight="Bold"),
             "rank": load_font(TEXT_PX * 2, weight="Bold")}
    thumbs = [_thumbnail(by_name[row["variant"]].story) for row in rows]
    blocks = [_row_block(row, settings, fonts) for row in rows]
    text_h = [sum(line_height(fonts["name" if s == "name" else "plain"]) + (4 if s == "badges" else 0)
                  for s, _ in block) for block in blocks]
    text_w = max(round(fonts["name" if s == "name" else "plain"].getlength(t)) for b in blocks for s, t in b)
    rank_w = round(fonts["rank"].getlength(f"#{len(rows)}")) + PAD
    thumb_w = max(t.width for t in thumbs)
    margin = PAD + BEST_BORDER
    width = 2 * margin + rank_w + thumb_w + PAD + max(text_w, round(fonts["plain"].getlength("★ best")) * 3)
    heights = [max(THUMB_HEIGHT, th) for th in text_h]
    title = f"{len(rows)} variant{'s' if len(rows) != 1 else ''}, by mean aesthetic score"
    title_h = line_height(fonts["name"]) + PAD
    page = Image.new("RGB", (width, 2 * margin + title_h + sum(heights) + 2 * PAD * (len(rows) - 1)), PAGE_BACKGROUND)
    draw = ImageDraw.Draw(page)
    draw.text((margin, margin - BEST_BORDER), title, font=fonts["name"], fill=TEXT_COLOUR)
    top = margin + title_h
    for row, thumb, block, height in zip(rows, thumbs, blocks, heights):
        geometry = {"left": margin, "right": width - margin, "rank_w": rank_w, "thumb_w": thumb_w, "height": height}
        _draw_row(page, draw, top, geometry, row, thumb, block, fonts)
        top += height + 2 * PAD
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    page.save(path, format="PNG")  # Pillow writes no tIME/text chunks: same inputs, same bytes
    return path
