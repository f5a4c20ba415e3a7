"""Story layouts: the plain grid (reading order, cell sizes, gaps, blanks, too many panels), the
captioned page, the contact sheet of scored candidates, and the CJK font (no tofu)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml
from fontTools.ttLib import TTFont
from PIL import Image, ImageFont

from kolors_story.outputs import story_page
from kolors_story.errors import UserError
from kolors_story.render.candidates_file import Candidate, CandidateRecord, write_record
from kolors_story.outputs.story_page import (
    HIGHLIGHT_COLOUR,
    caption_size,
    cjk_font_path,
    compose_grid,
    compose_page,
    compose_story,
    compose_story_page,
    contact_sheet,
    font_face_index,
    write_contact_sheet,
    load_font,
    wrap_text,
)

REPO = Path(__file__).resolve().parents[2]
COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255), (255, 0, 255),
           (10, 10, 10), (128, 64, 32)]
# Panel colours for pages: saturated, far from white, from the dark text and from the grey border.
PAGE_COLOURS = [(230, 30, 30), (30, 200, 30), (30, 30, 230), (230, 200, 0), (0, 190, 200),
                (200, 0, 200), (120, 60, 20), (60, 140, 90)]
TITLE = "古风少女的桃花梦"
NOT_IN_FONT = "\ue000"  # private use: Noto Sans CJK has no glyph, so it draws .notdef (tofu)


def panels(n: int, size: tuple[int, int] = (40, 30), colours=COLOURS) -> list[Image.Image]:
    return [Image.new("RGB", size, colours[i]) for i in range(n)]


def default_story() -> dict:
    return yaml.safe_load((REPO / "config.yaml").read_text(encoding="utf-8"))["story"]


def story_captions() -> list[str]:
    """One caption per scene of the default story (its caption, prompt, or action and setting)."""
    return [scene.get("caption") or scene.get("prompt")
            or "，".join(filter(None, [scene.get("action"), scene.get("setting")])) or scene["id"]
            for scene in default_story()["scenes"]]


def bbox(image: Image.Image, colour) -> tuple[int, int, int, int]:
    """(left, top, right, bottom), exclusive, of the pixels exactly `colour`."""
    ys, xs = np.nonzero(np.all(np.asarray(image) == colour, axis=-1))
    assert len(xs), f"colour {colour} not in image"
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def ink(image: Image.Image, box, darker_than: int = 110) -> int:
    """Number of text-dark pixels (every channel below `darker_than`) inside `box`."""
    region = np.asarray(image.crop(box))
    return int(np.all(region < darker_than, axis=-1).sum())


# -------------------------------------------------------------------------------------- grid


def test_baseline_layout_2_columns_4_rows_reading_order():
    story = compose_grid(panels(8), columns=2, rows=4)
    assert story.size == (80, 120)
    for index, colour in enumerate(COLOURS):
        row, col = divmod(index, 2)
        assert story.getpixel((col * 40 + 20, row * 30 + 15)) == colour


@pytest.mark.parametrize("columns,rows", [(4, 2), (1, 8)])
def test_other_grid_shapes(columns, rows):
    story = compose_grid(panels(8), columns=columns, rows=rows)
    assert story.size == (columns * 40, rows * 30)
    for index, colour in enumerate(COLOURS):
        row, col = divmod(index, columns)
        assert story.getpixel((col * 40 + 20, row * 30 + 15)) == colour


def test_gap_and_blank_cells():
    story = compose_grid(panels(3), columns=2, rows=2, gap=5, background="white")
    assert story.size == (2 * 40 + 5, 2 * 30 + 5)
    assert story.getpixel((42, 10)) == (255, 255, 255)  # gap between columns
    assert story.getpixel((45 + 20, 35 + 15)) == (255, 255, 255)  # 4th cell left blank
    assert story.getpixel((20, 35 + 15)) == COLOURS[2]


def test_other_sizes_are_resized_to_first_panel():
    images = panels(1) + [Image.new("RGBA", (80, 90), (0, 255, 0, 255))]
    story = compose_grid(images, columns=2, rows=1)
    assert story.size == (80, 30) and story.mode == "RGB"
    assert story.getpixel((79, 29)) == (0, 255, 0)


def test_too_many_panels_names_config_keys():
    with pytest.raises(UserError) as err:
        compose_grid(panels(5), columns=2, rows=2)
    assert "layout.columns" in str(err.value) and "layout.rows" in str(err.value)
    with pytest.raises(UserError, match="layout.columns"):
        compose_grid(panels(1), columns=0, rows=2)
    with pytest.raises(UserError, match="layout.gap"):
        compose_grid(panels(1), columns=1, rows=1, gap=-1)


def test_compose_story_from_files(tmp_path: Path):
    paths = []
    for i, image in enumerate(panels(4, size=(16, 16))):
        paths.append(tmp_path / f"s{i}.png")
        image.save(paths[-1])
    out = compose_story(paths, tmp_path / "out" / "story.png", columns=2, rows=2)
    with Image.open(out) as story:
        assert story.size == (32, 32)
        assert story.getpixel((24, 24)) == COLOURS[3]
    with pytest.raises(UserError, match="nope.png"):
        compose_story(paths + [tmp_path / "nope.png"], tmp_path / "x.png", columns=3, rows=2)


# -------------------------------------------------------------------------------------- font


def test_cjk_font_is_noto_sans_cjk_sc_regular():
    path = cjk_font_path()
    assert path.is_file()
    assert load_font(12).getname() == ("Noto Sans CJK SC", "Regular")
    assert load_font(12, weight="Bold").getname() == ("Noto Sans CJK SC", "Bold")
    assert load_font(12) is load_font(12)  # cached


def strings(node) -> list[str]:
    """Every string (keys and values) in a parsed YAML tree."""
    if isinstance(node, dict):
        return [s for k, v in node.items() for s in strings(k) + strings(v)]
    if isinstance(node, list):
        return [s for item in node for s in strings(item)]
    return [node] if isinstance(node, str) else []


def test_font_has_a_glyph_for_every_character_of_the_default_story():
    """Every character of every text in config.yaml and demo/config.yaml (titles, prompts, style,
    characters, captions...) and of the contact sheet's labels has a glyph in the font."""
    texts = ["0123456789.–★"]
    for name in ("config.yaml", "demo/config.yaml"):
        texts += strings(yaml.safe_load((REPO / name).read_text(encoding="utf-8")))
    wanted = {ch for text in texts for ch in text if not ch.isspace()}
    assert set(TITLE) <= wanted
    path = cjk_font_path()
    cmap = TTFont(path, fontNumber=font_face_index(path), lazy=True).getBestCmap()
    missing = sorted(ch for ch in wanted if ord(ch) not in cmap)
    assert not missing, f"font lacks glyphs for {missing}"


def test_rendered_cjk_is_not_tofu():
    font = load_font(24)
    notdef = font.getmask(NOT_IN_FONT)
    assert sum(bytes(notdef)) > 0  # the font's .notdef is a visible box: the comparison means something
    for ch in TITLE + "，。":
        mask = font.getmask(ch)
        assert sum(bytes(mask)) > 0, ch
        assert (mask.size, bytes(mask)) != (notdef.size, bytes(notdef)), f"{ch!r} renders as .notdef"
    # The same check catches tofu: DejaVu Sans (matplotlib's font) has no CJK, so 古 is its .notdef.
    import matplotlib

    dejavu = ImageFont.truetype(str(Path(matplotlib.get_data_path()) / "fonts/ttf/DejaVuSans.ttf"), 24)
    assert bytes(dejavu.getmask("古")) == bytes(dejavu.getmask(NOT_IN_FONT))


def test_missing_font_package_is_a_clear_error(monkeypatch, tmp_path: Path):
    monkeypatch.setattr(story_page.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError, match="manimgx-fonts-cjk"):
        cjk_font_path()
    with pytest.raises(UserError, match="nope.ttf"):
        load_font(12, font=tmp_path / "nope.ttf")


def test_wrap_text_cjk_latin_and_punctuation():
    font = load_font(12)
    width = round(font.getlength("字" * 6))
    text = "古风，水墨画，一个黑色长发少女，坐在古代书院的教室里。"
    lines = wrap_text(text, font, width)
    assert len(lines) > 1 and "".join(lines) == text
    assert all(font.getlength(line) <= width for line in lines)
    assert not any(line[0] in "，。" for line in lines)  # closing punctuation never starts a line
    latin = wrap_text("ink style painting of mountains", font, width)
    assert " ".join(latin) == "ink style painting of mountains"  # broken only at spaces
    assert wrap_text("第一行\n第二行", font, width) == ["第一行", "第二行"]
    long_word = "x" * 100
    assert "".join(wrap_text(long_word, font, width)) == long_word
    assert wrap_text("", font, width) == [""]


# ---------------------------------------------------------------------------------- captioned page


@pytest.mark.parametrize("columns,rows", [(2, 4), (4, 2), (1, 8)])
@pytest.mark.parametrize("size", [64, 200])
def test_page_layouts_with_cjk_captions(columns, rows, size):
    captions = story_captions()
    page = compose_page(panels(8, (size, size), PAGE_COLOURS), captions, TITLE, columns, rows)
    assert page.mode == "RGB" and page.getpixel((0, 0)) == (255, 255, 255)
    boxes = [bbox(page, colour) for colour in PAGE_COLOURS]
    for index, (left, top, right, bottom) in enumerate(boxes):
        assert (right - left, bottom - top) == (size, size)  # every panel whole, unscaled
        row, col = divmod(index, columns)
        assert top == boxes[row * columns][1] and left == boxes[col][0]  # reading order, aligned
    lefts = sorted({b[0] for b in boxes})
    tops = sorted({b[1] for b in boxes})
    assert len(lefts) == columns and len(tops) == rows
    # Title: ink in the band above the first row, roughly centred on the page.
    title_band = (0, 0, page.width, tops[0])
    assert ink(page, title_band) > 50
    ys, xs = np.nonzero(np.all(np.asarray(page.crop(title_band)) < 110, axis=-1))
    assert abs((xs.min() + xs.max()) / 2 - page.width / 2) < page.width * 0.05
    # Captions: ink below every panel, above the next row.
    for index, (left, top, right, bottom) in enumerate(boxes):
        row = index // columns
        below = tops[row + 1] if row + 1 < rows else page.height
        assert ink(page, (left - size, bottom + 1, right + size, below)) > 50, f"no caption under {index}"


def test_page_text_scales_with_panel_size_and_small_panels_get_wider_cells():
    assert caption_size(64) == 12 and caption_size(256) == 12 and caption_size(1024) == 36
    small = compose_page(panels(2, (64, 64), PAGE_COLOURS), ["水墨", "山水"], TITLE, 2, 1)
    assert small.width > 2 * 64 + 64  # cells wider than the panels: captions stay legible
    big = compose_page(panels(2, (1024, 1024), PAGE_COLOURS), ["水墨", "山水"], TITLE, 2, 1)
    # The title band grows with the text size (36 px captions -> 63 px title).
    assert bbox(big, PAGE_COLOURS[0])[1] > 2.5 * bbox(small, PAGE_COLOURS[0])[1]


def test_page_blank_cells_and_no_title():
    page = compose_page(panels(3, (64, 64), PAGE_COLOURS), ["一", "", "三"], "", 2, 2)
    first = bbox(page, PAGE_COLOURS[0])
    assert ink(page, (0, 0, page.width, first[1])) == 0  # no title band ink
    left, top, right, bottom = bbox(page, PAGE_COLOURS[1])
    assert ink(page, (left, bottom + 2, right, bottom + 30)) == 0  # empty caption: nothing drawn
    assert all(bbox(page, c) for c in PAGE_COLOURS[:3])


def test_page_errors_name_config_keys():
    with pytest.raises(UserError) as err:
        compose_page(panels(5, (64, 64)), ["字"] * 5, TITLE, columns=2, rows=2)
    assert "layout.columns" in str(err.value) and "layout.rows" in str(err.value)
    with pytest.raises(UserError, match="captions"):
        compose_page(panels(2, (64, 64)), ["字"], TITLE, columns=2, rows=1)
    with pytest.raises(UserError, match="layout.margin"):
        compose_page(panels(1, (64, 64)), ["字"], TITLE, columns=1, rows=1, margin=-1)


def test_compose_story_page_from_files(tmp_path: Path):
    paths = []
    for i, image in enumerate(panels(2, (64, 64), PAGE_COLOURS)):
        paths.append(tmp_path / f"s{i}.png")
        image.save(paths[-1])
    out = compose_story_page(paths, ["水墨画", "山水"], TITLE, tmp_path / "out" / "page.png", 2, 1)
    with Image.open(out) as page:
        assert bbox(page.convert("RGB"), PAGE_COLOURS[1])
    with pytest.raises(UserError, match="nope.png"):
        compose_story_page(paths + [tmp_path / "nope.png"], ["a"] * 3, TITLE, tmp_path / "x.png", 3, 1)


# ---------------------------------------------------------------------------------- contact sheet


def test_contact_sheet_highlights_the_chosen_candidate_and_labels_scores():
    scores = [5.8312, 4.1, 6.02]
    sheet_rows = [("s1_class", panels(3, (64, 64), PAGE_COLOURS[0:3]), scores, 2),
                  ("s2_sleepy", panels(3, (64, 64), PAGE_COLOURS[3:6]), scores, 0)]
    sheet = contact_sheet(sheet_rows, title="候选图")
    highlight = np.all(np.asarray(sheet) == HIGHLIGHT_COLOUR, axis=-1)
    for r, (_, _, _, chosen) in enumerate(sheet_rows):
        for i in range(3):
            left, top, right, bottom = bbox(sheet, PAGE_COLOURS[3 * r + i])
            assert (right - left, bottom - top) == (64, 64)
            ring = highlight[top - 2:bottom + 2, left - 2:right + 2].copy()
            ring[2:-2, 2:-2] = False
            ring_share = ring.sum() / (2 * (68 + 64) * 2)
            label = (left, bottom + 3, right, bottom + 30)
            label_highlight = highlight[label[1]:label[3], label[0]:label[2]].sum()
            if i == chosen:
                assert ring_share == 1.0  # a full highlight border
                assert label_highlight > 20  # its score label is in the highlight colour
            else:
                assert ring_share == 0.0 and label_highlight == 0
                assert ink(sheet, label) > 20  # a dark score label
    # The scene id sits left of its first candidate; the title above the first row.
    first = bbox(sheet, PAGE_COLOURS[0])
    assert ink(sheet, (0, first[1], first[0] - 4, first[3])) > 20
    assert ink(sheet, (0, 0, sheet.width, first[1] - 6)) > 20


def test_contact_sheet_of_a_run_reads_the_scene_jobs_records(tmp_path: Path):
    folder = tmp_path / "candidates" / "s1"
    folder.mkdir(parents=True)
    candidates = []
    for k, colour in enumerate(PAGE_COLOURS[:3]):
        Image.new("RGB", (64, 64), colour).save(folder / f"{k}.png")
        candidates.append(Candidate(seed=k, lora_scale=1.0, batch_seeds=(0, 1, 2), score=5.0 + k % 2, file=f"{k}.png"))
    write_record(CandidateRecord(scene="s1", prompt="p", negative_prompt="", width=64, height=64, sampler="euler",
                                 steps=2, guidance_scale=5.0, precision="fp32", dtype="float32", device="cpu",
                                 candidates=tuple(candidates), chosen=1), folder)
    with Image.open(write_contact_sheet([folder], tmp_path / "sheet.png")) as sheet:
        highlight = np.all(np.asarray(sheet.convert("RGB")) == HIGHLIGHT_COLOUR, axis=-1)
        left, top, right, bottom = bbox(sheet.convert("RGB"), PAGE_COLOURS[1])  # the chosen one is framed
        assert highlight[top - 2, left:right].all()
        left, top, right, bottom = bbox(sheet.convert("RGB"), PAGE_COLOURS[0])
        assert not highlight[top - 2, left:right].any()


def test_contact_sheet_score_label_text():
    assert story_page._score_label(5.8312) == "5.83"
    assert story_page._score_label(float("nan")) == "–"


def test_contact_sheet_sizes_follow_candidates_and_errors():
    big = contact_sheet([("s1", panels(2, (512, 512), PAGE_COLOURS), [1.0, 2.0], 1)])
    left, top, right, bottom = bbox(big, PAGE_COLOURS[0])
    assert (right - left, bottom - top) == (256, 256)  # default thumbnails cap at 256 px
    uneven = contact_sheet([("s1", panels(1, (64, 64), PAGE_COLOURS), [1.0], 0),
                            ("s2", panels(3, (64, 64), PAGE_COLOURS[1:]), [1.0, 2.0, 3.0], 2)], thumb=32)
    assert bbox(uneven, PAGE_COLOURS[3])[2] - bbox(uneven, PAGE_COLOURS[3])[0] == 32
    with pytest.raises(UserError, match="chosen index 3"):
        contact_sheet([("s1", panels(2, (64, 64)), [1.0, 2.0], 3)])
    with pytest.raises(UserError, match="2 candidates but 1 scores"):
        contact_sheet([("s1", panels(2, (64, 64)), [1.0], 0)])
    with pytest.raises(UserError, match="no candidate"):
        contact_sheet([("s1", [], [], 0)])
    with pytest.raises(UserError, match="No scenes"):
        contact_sheet([])
