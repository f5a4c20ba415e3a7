"""Lay the story out: a plain grid of panels, a captioned page, and a contact sheet of candidates.

Panels go in reading order (row by row, left to right). Text is set in Noto Sans CJK (Simplified
Chinese face) from the `manimgx-fonts-cjk` package, so Chinese captions never render as
missing-glyph boxes; any other .ttf/.otf/.ttc can be passed as `font`.

Sizes scale with the panel size: the caption font is a fixed fraction of the panel width with a
floor of MIN_TEXT_PX, so 64 px demo panels get legible captions (their cells are then wider than
the panels) and 1024 px panels get proportionally larger text.
"""

from __future__ import annotations

import importlib.util
import math
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from kolors_story.data.images import check_grid, compose_grid, fit_panel
from kolors_story.errors import UserError

FONT_PACKAGE = "manimgx-fonts-cjk"  # PyPI name; the module is manimgx_fonts_cjk
FONT_FILE = "NotoSansCJK-VF.otf.ttc"
FONT_FACE = "SC"  # face of a collection to prefer (Noto Sans CJK SC: Simplified Chinese)

MIN_TEXT_PX = 12  # smallest caption / label font, in pixels
CAPTION_SCALE = 0.035  # caption font size per pixel of panel width (1024 px -> 36 px)
TITLE_SCALE = 1.75  # title font size per caption font size
MIN_LINE_CHARS = 12  # a caption line holds at least this many CJK characters (widens small cells)

PAGE_BACKGROUND = (255, 255, 255)
TEXT_COLOUR = (34, 34, 34)
TITLE_COLOUR = (17, 17, 17)
BORDER_COLOUR = (200, 200, 200)
HIGHLIGHT_COLOUR = (230, 90, 20)  # chosen candidate on the contact sheet

# Line breaking (simplified kinsoku): these never start a line ...
_NO_LINE_START = set("，。、；：！？）》」』】〕〉”’…—·,.;:!?)]}%")
# ... and these never end one.
_NO_LINE_END = set("（《「『【〔〈“‘([{")
# A "word" that must not be split: a run of non-space characters outside the CJK blocks.
_CJK = "\u2e80-\u9fff\uf900-\ufaff\u3000-\u303f\uff00-\uffef"
_TOKEN = re.compile(rf"[^\s{_CJK}]+|\n|[^\S\n]+|.")


# ------------------------------------------------------------------------------------------- fonts


def cjk_font_path() -> Path:
    """The CJK font file shipped by the `manimgx-fonts-cjk` package (Noto Sans CJK, OFL-1.1)."""
    spec = importlib.util.find_spec("manimgx_fonts_cjk")
    if spec is not None and spec.origin:
        path = Path(spec.origin).parent / FONT_FILE
        if path.is_file():
            return path
    raise UserError(
        f"No CJK font for the story captions: the Python package `{FONT_PACKAGE}` (Noto Sans CJK) "
        f"is not installed or lacks {FONT_FILE}. Install the project's requirements "
        f"(`pip install -r requirements.txt`, or `pip install {FONT_PACKAGE}`), or pass a "
        ".ttf/.otf/.ttc font with Chinese glyphs as `font`."
    )


def font_face_index(path: Path) -> int:
    """Index of the preferred face (name ending in FONT_FACE) of a collection, else 0."""
    if path.suffix.lower() not in {".ttc", ".otc"}:
        return 0
    index = 0
    while True:
        try:
            face = ImageFont.truetype(str(path), 12, index=index)
        except OSError:  # past the last face
            return 0
        if face.getname()[0].endswith(f" {FONT_FACE}"):
            return index
        index += 1


@lru_cache(maxsize=64)
def _font(path: str, size: int, weight: str) -> ImageFont.FreeTypeFont:
    try:
        font = ImageFont.truetype(path, size, index=font_face_index(Path(path)),
                                  layout_engine=ImageFont.Layout.BASIC)
    except OSError as exc:
        raise UserError(f"Cannot load font {path!r} ({exc}); pass a .ttf/.otf/.ttc file as `font`.") from exc
    try:  # a variable font (Noto Sans CJK VF) starts at its lightest weight: pick a named one
        names = [n.decode() if isinstance(n, bytes) else n for n in font.get_variation_names()]
    except (OSError, AttributeError):
        names = []
    for name in (weight, "Regular"):
        if name in names:
            font.set_variation_by_name(name)
            break
    return font


def load_font(size: int, font: Path | None = None, weight: str = "Regular") -> ImageFont.FreeTypeFont:
    """`font` (default: cjk_font_path()) at `size` px; `weight` names a variable font's instance."""
    path = Path(font) if font is not None else cjk_font_path()
    if not path.is_file():
        raise UserError(f"Font file {path} does not exist; pass an existing .ttf/.otf/.ttc as `font`.")
    return _font(str(path), max(1, int(size)), weight)


def line_height(font: ImageFont.FreeTypeFont) -> int:
    ascent, descent = font.getmetrics()
    return ascent + descent + max(1, round(font.size * 0.15))


def wrap_text(text: str, font: ImageFont.FreeTypeFont, max_width: int) -> list[str]:
    """`text` broken into lines no wider than `max_width` px (one glyph wider than that gets a line
    of its own). CJK text breaks between any two characters, other text at spaces (a word wider
    than a line is split); closing punctuation never starts a line, opening punctuation never ends
    one; explicit newlines are kept."""
    lines: list[str] = []
    line = ""

    def fits(candidate: str) -> bool:
        return font.getlength(candidate) <= max_width

    def push(token: str) -> None:
        """Start a new line with `token`, carrying characters that may not be split across."""
        nonlocal line
        head, tail = line.rstrip(), token.lstrip()
        while len(head) > 1 and (tail[:1] in _NO_LINE_START or head[-1] in _NO_LINE_END):
            head, tail = head[:-1], head[-1] + tail
        if head:
            lines.append(head)
        line = tail

    for token in _TOKEN.findall(text):
        if token == "\n":
            lines.append(line.rstrip())
            line = ""
        elif not line.strip() and token.isspace():
            continue  # no leading spaces on a line
        elif fits(line + token):
            line += token
        elif token.isspace():
            push("")
        elif len(token) > 1 and not fits(token):  # a word wider than a line: split it
            for char in token:
                if fits(line + char) or not line.strip():
                    line += char
                else:
                    push(char)
        elif not line.strip():
            line = token
        else:
            push(token)
    if line.strip() or not lines:
        lines.append(line.rstrip())
    return lines


def draw_lines(draw: ImageDraw.ImageDraw, lines: list[str], font: ImageFont.FreeTypeFont,
                x: int, y: int, width: int, fill, centre: bool) -> None:
    step = line_height(font)
    for i, line in enumerate(lines):
        dx = (width - font.getlength(line)) / 2 if centre else 0
        draw.text((x + max(0, round(dx)), y + i * step), line, font=font, fill=fill)


# -------------------------------------------------------------------------------------------- grid


# -------------------------------------------------------------------------------- captioned page


def caption_size(panel_width: int) -> int:
    """Caption font size in px for panels `panel_width` px wide."""
    return max(MIN_TEXT_PX, round(panel_width * CAPTION_SCALE))


def compose_page(
    images: list[Image.Image],
    captions: list[str],
    title: str,
    columns: int,
    rows: int,
    margin: int | None = None,
    gap: int | None = None,
    font: Path | None = None,
) -> Image.Image:
    """A white page: `title` centred at the top, then the panels in a columns x rows grid, each
    with its caption beneath (wrapped to the cell width) and a thin grey border.

    Every panel is shown at the first panel's size, unscaled. Text size follows the panel width
    (caption_size); a cell is at least MIN_LINE_CHARS caption characters wide, so small panels sit
    centred in wider cells. `margin` (page edge) and `gap` (between cells) default to sizes that
    follow the caption size. All caption bands share the height of the longest caption.
    """
    if len(captions) != len(images):
        raise UserError(
            f"{len(images)} panels but {len(captions)} captions; give every scene one caption "
            "(an empty string for none)."
        )
    text_px = caption_size(images[0].width if images else 0)
    gap = round(text_px * 1.5) if gap is None else gap
    margin = 2 * text_px if margin is None else margin
    check_grid(len(images), columns, rows, gap)
    if margin < 0:
        raise UserError(f"Story page margin {margin} is negative; set config key `layout.margin` to 0 or more.")

    panel_w, panel_h = images[0].size
    caption_font = load_font(text_px, font)
    title_font = load_font(round(text_px * TITLE_SCALE), font, weight="Bold")
    cell_w = max(panel_w, math.ceil(caption_font.getlength("字" * MIN_LINE_CHARS)))
    pad = max(2, round(text_px * 0.5))  # panel -> caption
    border = max(1, round(panel_w / 512))

    wrapped = [wrap_text(str(c or "").strip(), caption_font, cell_w) if str(c or "").strip() else []
               for c in captions]
    caption_h = max(len(lines) for lines in wrapped) * line_height(caption_font)
    cell_h = panel_h + (pad + caption_h if caption_h else 0)
    grid_w = columns * cell_w + (columns - 1) * gap
    grid_h = rows * cell_h + (rows - 1) * gap

    title_lines = wrap_text(title.strip(), title_font, grid_w) if title and title.strip() else []
    title_h = len(title_lines) * line_height(title_font)
    title_space = text_px + pad if title_lines else 0

    page = Image.new("RGB", (grid_w + 2 * margin, title_h + title_space + grid_h + 2 * margin),
                     PAGE_BACKGROUND)
    draw = ImageDraw.Draw(page)
    draw_lines(draw, title_lines, title_font, margin, margin, grid_w, TITLE_COLOUR, centre=True)
    grid = _Grid(columns, cell_w, cell_h, gap, margin, margin + title_h + title_space)
    _draw_cells(page, images, wrapped, caption_font, grid, pad, border)
    return page


@dataclass(frozen=True)
class _Grid:
    columns: int
    cell_w: int
    cell_h: int
    gap: int
    left: int
    top: int

    def cell(self, index: int) -> tuple[int, int]:
        row, col = divmod(index, self.columns)
        return self.left + col * (self.cell_w + self.gap), self.top + row * (self.cell_h + self.gap)


def _draw_cells(page: Image.Image, images: list[Image.Image], wrapped: list[list[str]], font, grid: _Grid,
                pad: int, border: int) -> None:
    """Each panel centred in its cell with a thin border, its caption lines beneath."""
    draw = ImageDraw.Draw(page)
    panel_w, panel_h = images[0].size
    cells = []
    for index, lines in enumerate(wrapped):
        x, y = grid.cell(index)
        px = x + (grid.cell_w - panel_w) // 2
        draw.rectangle((px - border, y - border, px + panel_w - 1 + border, y + panel_h - 1 + border),
                       outline=BORDER_COLOUR, width=border)
        draw_lines(draw, lines, font, x, y + panel_h + pad, grid.cell_w, TEXT_COLOUR, centre=len(lines) == 1)
        cells.append((px, y))
    for image, (px, y) in zip(images, cells):  # after the borders: panels stay intact
        page.paste(fit_panel(image, (panel_w, panel_h)), (px, y))


# ------------------------------------------------------------------------------- contact sheet


def contact_sheet(
    rows: list[tuple],
    thumb: int | None = None,
    title: str | None = None,
    font: Path | None = None,
) -> Image.Image:
    """One row per scene, (id, candidates, scores, chosen index[, tags]): its id, then its
    candidates as thumbnails (at most `thumb` px a side, default the first candidate's size up to
    256), each labelled with its score ("5.83"), after its tag when the row has tags (the prompt it
    was drawn from: "P2 5.83"); the chosen candidate gets a HIGHLIGHT_COLOUR border and label, with a ★."""
    _check_sheet_rows(rows)
    if thumb is None:
        thumb = min(max(rows[0][1][0].size), 256)
    if thumb < 1:
        raise UserError(f"Contact sheet thumbnail size {thumb} must be at least 1 px.")

    text_px = max(MIN_TEXT_PX, round(thumb * 0.07))
    label_font = load_font(text_px, font)
    chosen_font = load_font(text_px, font, weight="Bold")
    title_font = load_font(round(text_px * TITLE_SCALE), font, weight="Bold")
    hl = max(2, round(thumb * 0.03))  # highlight border width
    space = max(3 * hl, round(text_px * 1.2))  # between thumbnails (room for the highlight)
    margin = 2 * text_px
    line_h = line_height(label_font)
    below = hl + max(2, hl // 2)  # thumbnail -> score label (clear of the highlight)
    id_w = max(math.ceil(label_font.getlength(str(scene))) for scene, *_ in rows) + space
    row_h = thumb + below + line_h + space
    most = max(len(row[1]) for row in rows)
    grid_w = id_w + most * thumb + (most - 1) * space + hl
    title_lines = wrap_text(title.strip(), title_font, grid_w) if title and title.strip() else []
    title_h = len(title_lines) * line_height(title_font) + (text_px if title_lines else 0)

    sheet = Image.new("RGB", (grid_w + 2 * margin, title_h + len(rows) * row_h - space + 2 * margin),
                      PAGE_BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    draw_lines(draw, title_lines, title_font, margin, margin, grid_w, TITLE_COLOUR, centre=True)
    for r, (scene, images, scores, chosen, *tags) in enumerate(rows):
        tags = tags[0] if tags else [""] * len(images)
        y = margin + title_h + r * row_h + hl
        ascent, descent = label_font.getmetrics()
        draw.text((margin, y + (thumb - ascent - descent) // 2), str(scene), font=label_font, fill=TEXT_COLOUR)
        for i, (image, score, tag) in enumerate(zip(images, scores, tags)):
            x = margin + id_w + i * (thumb + space) + hl
            _draw_thumbnail(sheet, draw, image, (x, y), thumb, hl if i == chosen else 0)
            label = (f"{tag} " if tag else "") + _score_label(score) + (" ★" if i == chosen else "")
            draw_lines(draw, [label], chosen_font if i == chosen else label_font, x, y + thumb + below,
                        thumb, HIGHLIGHT_COLOUR if i == chosen else TEXT_COLOUR, centre=True)
    return sheet


def _check_sheet_rows(rows: list[tuple]) -> None:
    if not rows:
        raise UserError("No scenes for the contact sheet; check the config's scenes.")
    for scene, images, scores, chosen, *_ in rows:
        if not images:
            raise UserError(f"Scene {scene!r} has no candidate images for the contact sheet.")
        if len(scores) != len(images):
            raise UserError(f"Scene {scene!r}: {len(images)} candidates but {len(scores)} scores.")
        if not 0 <= chosen < len(images):
            raise UserError(f"Scene {scene!r}: chosen index {chosen} is not one of its "
                            f"{len(images)} candidates (0..{len(images) - 1}).")


def _draw_thumbnail(sheet: Image.Image, draw, image: Image.Image, at: tuple[int, int], thumb: int,
                    highlight: int) -> None:
    """The candidate at most `thumb` px a side, centred in its square at `at`, with a thin grey
    border, or a `highlight`-px wide one in HIGHLIGHT_COLOUR when it is the chosen one."""
    x, y = at
    small = image.convert("RGB")
    small.thumbnail((thumb, thumb), Image.Resampling.LANCZOS)
    ox, oy = x + (thumb - small.width) // 2, y + (thumb - small.height) // 2
    width = highlight or 1
    draw.rectangle((ox - width, oy - width, ox + small.width - 1 + width, oy + small.height - 1 + width),
                   outline=HIGHLIGHT_COLOUR if highlight else BORDER_COLOUR, width=width)
    sheet.paste(small, (ox, oy))


def _score_label(score: float | None) -> str:
    if score is None or (isinstance(score, float) and math.isnan(score)):
        return "–"
    return f"{float(score):.2f}"


# ---------------------------------------------------------------------------------------- files


def _load_panels(paths: list[Path]) -> list[Image.Image]:
    missing = [str(p) for p in paths if not Path(p).is_file()]
    if missing:
        raise UserError(f"Story panels missing: {', '.join(missing)}; generate these scenes first.")
    images = []
    for path in paths:
        with Image.open(path) as image:
            images.append(image.convert("RGB"))
    return images


def _save(image: Image.Image, out_path: Path) -> Path:
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    image.save(out_path)
    return out_path


def compose_story(paths: list[Path], out_path: Path, columns: int, rows: int, gap: int = 0) -> Path:
    """Read the panel files (in story order), tile them and save the story image to `out_path`."""
    return _save(compose_grid(_load_panels(paths), columns, rows, gap), out_path)


def compose_story_page(
    paths: list[Path],
    captions: list[str],
    title: str,
    out_path: Path,
    columns: int,
    rows: int,
    margin: int | None = None,
    gap: int | None = None,
    font: Path | None = None,
) -> Path:
    """Read the panel files (in story order), lay them out as a captioned page (compose_page) and
    save it to `out_path`."""
    page = compose_page(_load_panels(paths), captions, title, columns, rows, margin, gap, font)
    return _save(page, out_path)


def write_contact_sheet(candidate_dirs: list[Path], out_path: Path) -> Path:
    """The contact sheet of a run from its candidates/<scene>/ folders (candidates.json + k.png)."""
    from kolors_story.render.candidates_file import read_record

    rows = []
    for folder in candidate_dirs:
        record = read_record(Path(folder))
        images = _load_panels([Path(folder) / name for name in record.files])
        rows.append((record.scene, images, record.scores, record.chosen, *_prompt_tags(record)))
    return _save(contact_sheet(rows), out_path)


def _prompt_tags(record) -> list[list[str]]:
    """[tags] when the scene had alternative prompts: "P1" for its own prompt, "P2", ... for the
    alternatives in the order they were drawn; [] (no tags) otherwise."""
    prompts = list(dict.fromkeys(c.prompt for c in record.candidates))
    if prompts == [None]:
        return []
    numbers = {p: k for k, p in enumerate([None, *(p for p in prompts if p is not None)], 1)}
    return [[f"P{numbers[c.prompt]}" for c in record.candidates]]
