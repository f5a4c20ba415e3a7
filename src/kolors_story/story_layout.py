"""Tile the story's panels into one image, in reading order (row by row, left to right)."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from kolors_story.errors import UserError


def _check_grid(n_images: int, columns: int, rows: int, gap: int) -> None:
    if columns < 1 or rows < 1:
        raise UserError(
            f"Story grid {columns} columns x {rows} rows is empty; set config keys "
            "`layout.columns` and `layout.rows` to at least 1."
        )
    if gap < 0:
        raise UserError(f"Story grid gap {gap} is negative; set config key `layout.gap` to 0 or more.")
    if n_images == 0:
        raise UserError("No panels to compose into a story image; check the config's scenes.")
    if n_images > columns * rows:
        raise UserError(
            f"{n_images} panels do not fit a {columns} x {rows} grid ({columns * rows} cells); "
            "raise config keys `layout.columns` / `layout.rows` so that columns * rows >= "
            "the number of scenes."
        )


def _fit(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """The panel as RGB at the cell size (panels usually share one size; others are resized)."""
    image = image.convert("RGB")
    if image.size != size:
        image = image.resize(size, Image.Resampling.LANCZOS)
    return image


def compose_grid(
    images: list[Image.Image], columns: int, rows: int, gap: int = 0, background: str = "white"
) -> Image.Image:
    """Panels row-major into a columns x rows grid; every cell is the first panel's size.

    Cells past the last panel stay `background`; `gap` pixels separate cells (not the border).
    """
    _check_grid(len(images), columns, rows, gap)
    cell_w, cell_h = images[0].size
    canvas = Image.new(
        "RGB", (columns * cell_w + (columns - 1) * gap, rows * cell_h + (rows - 1) * gap), background
    )
    for index, image in enumerate(images):
        row, col = divmod(index, columns)
        canvas.paste(_fit(image, (cell_w, cell_h)), (col * (cell_w + gap), row * (cell_h + gap)))
    return canvas


def compose_story(paths: list[Path], out_path: Path, columns: int, rows: int, gap: int = 0) -> Path:
    """Read the panel files (in story order), tile them and save the story image to `out_path`."""
    missing = [str(p) for p in paths if not Path(p).is_file()]
    if missing:
        raise UserError(f"Story panels missing: {', '.join(missing)}; generate these scenes first.")
    images = []
    for path in paths:
        with Image.open(path) as image:
            images.append(image.convert("RGB"))
    story = compose_grid(images, columns, rows, gap)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    story.save(out_path)
    return out_path
