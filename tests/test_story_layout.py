"""Story grid: reading order, cell sizes, gaps, blanks and the too-many-panels error."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from kolors_story.errors import UserError
from kolors_story.story_layout import compose_grid, compose_story

COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255), (255, 0, 255),
           (10, 10, 10), (128, 64, 32)]


def panels(n: int, size: tuple[int, int] = (40, 30)) -> list[Image.Image]:
    return [Image.new("RGB", size, COLOURS[i]) for i in range(n)]


def test_baseline_layout_2_columns_4_rows_reading_order():
    story = compose_grid(panels(8), columns=2, rows=4)
    assert story.size == (80, 120)
    for index, colour in enumerate(COLOURS):
        row, col = divmod(index, 2)
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
