"""Image files as RGB training images, the one decoder every data stage uses.

Strict: a truncated file or one over Pillow's decompression-bomb limit is refused, whatever the
process set (`import data_juicer` turns LOAD_TRUNCATED_IMAGES on process-wide). Faithful: EXIF
orientation applied, transparency composited on a background colour, 16-bit grayscale scaled
to 8 bits (Pillow's convert("RGB") clips it), palette/CMYK/LA converted by Pillow.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from PIL import ExifTags, Image, ImageColor, ImageFile, ImageOps

from kolors_story.errors import UserError

RGB = tuple[int, int, int]
WHITE: RGB = (255, 255, 255)
BACKGROUND_KEY = "dataset.background"
SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I"}  # "I": 16-bit PNM/PNG; values past 65535 clip
ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}


class BadImage(Exception):
    """A file that cannot become an RGB training image; str() is the reason, free of paths."""


def parse_background(value: str | None) -> RGB:
    """`dataset.background` as an RGB triple: a colour name (white) or #rrggbb."""
    if value is None:
        return WHITE
    try:
        rgb = ImageColor.getrgb(str(value))
    except ValueError:
        raise UserError(
            f"{BACKGROUND_KEY} {value!r} is not a colour; write a name such as white, black or gray, or #rrggbb."
        ) from None
    return tuple(rgb[:3])  # type: ignore[return-value]


@contextlib.contextmanager
def strict_decoding() -> Iterator[None]:
    """Truncated files raise, and so does an image over Pillow's MAX_IMAGE_PIXELS (not only 2x it)."""
    previous = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = previous


def _sixteen_to_l(img: Image.Image) -> Image.Image:
    """16-bit grayscale -> 8-bit L by scaling 0..65535 to 0..255 (rounded)."""
    import numpy as np  # here: the Snakefile imports this module at parse time, numpy costs 0.15 s

    values = np.clip(np.asarray(img, dtype=np.int64), 0, 65535)
    return Image.fromarray(((values * 255 + 32767) // 65535).astype(np.uint8), "L")


def to_rgb(img: Image.Image, background: RGB = WHITE) -> Image.Image:
    """Any Pillow image as RGB; transparent pixels show `background`, not what lies under them."""
    if img.mode in SIXTEEN_BIT_MODES:
        img = _sixteen_to_l(img)
    if img.mode == "La":  # premultiplied: Pillow converts it only through LA
        img = img.convert("LA")
    if img.mode in ALPHA_MODES or "transparency" in img.info:
        canvas = Image.new("RGBA", img.size, (*background, 255))
        return Image.alpha_composite(canvas, img.convert("RGBA")).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


def orientation(img: Image.Image) -> int:
    return int(img.getexif().get(ExifTags.Base.Orientation, 1) or 1)


def is_plain_jpeg(img: Image.Image) -> bool:
    """An RGB JPEG shown as stored: its bytes can be used as they are (no second lossy encode)."""
    return img.format == "JPEG" and img.mode == "RGB" and orientation(img) == 1 and "transparency" not in img.info


def is_plain_jpeg_file(path: str | os.PathLike) -> bool:
    """`is_plain_jpeg` from the file's header (nothing decoded); False if Pillow cannot open it
    or it is over the pixel limit (the decoder then says why)."""
    try:
        with strict_decoding():
            with Image.open(path) as img:
                return is_plain_jpeg(img)
    except Exception:  # noqa: BLE001 - not openable: the caller decodes it and learns why
        return False


def _scrub(message: str, source: str | os.PathLike | IO[bytes]) -> str:
    """Pillow's messages name the file (or a memory address); a reason is stored in the results,
    which must hold no absolute path and be the same on every run, so keep only the name."""
    if isinstance(source, (str, os.PathLike)):
        for form in sorted({os.fspath(source), os.path.abspath(source), str(Path(source).resolve())}, key=len, reverse=True):
            message = message.replace(form, Path(source).name)
    return re.sub(r"<[^<>]* at 0x[0-9a-fA-F]+>", "<image bytes>", message)


def describe(img: Image.Image) -> str:
    """Format and mode as a short note, e.g. 'TIFF I;16' or 'GIF P, frame 1 of 4'."""
    frames = getattr(img, "n_frames", 1)
    return f"{img.format} {img.mode}" + (f", frame 1 of {frames}" if frames > 1 else "")


def load_rgb(source: str | os.PathLike | IO[bytes], background: RGB = WHITE) -> tuple[Image.Image, str]:
    """Decode every byte of one image and return it upright as RGB, with `describe()` of the file.

    Raises BadImage with the reason (undecodable, truncated, over the pixel limit). Any error of
    a decoder counts: a damaged file can raise almost anything, and it must cost only its own row.
    """
    try:
        with strict_decoding(), Image.open(source) as img:
            img.load()
            what = describe(img)
            rgb = upright_rgb(img, background)
    except Exception as exc:  # see the docstring
        raise bad_image(exc, source) from exc
    return rgb, what


def bad_image(exc: Exception, source: str | os.PathLike | IO[bytes] | None) -> BadImage:
    """The BadImage for a decoder's exception: over the pixel limit, or undecodable; no paths."""
    message = _scrub(str(exc), source) if source is not None else str(exc)
    if isinstance(exc, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        return BadImage(f"too large: {message} (Pillow's decompression-bomb limit, PIL.Image.MAX_IMAGE_PIXELS); downscale the file")
    return BadImage(f"cannot decode image: {message or type(exc).__name__}")


def upright_rgb(img: Image.Image, background: RGB = WHITE) -> Image.Image:
    """A decoded image turned by its EXIF orientation and made RGB: a new image, without the
    source's info (no ICC profile of another colour space, no EXIF): the pixels are what is stored."""
    rgb = to_rgb(ImageOps.exif_transpose(img), background)
    if rgb is img:
        rgb = rgb.copy()
    rgb.info = {}
    return rgb


def image_problem(path: str | Path) -> str | None:
    """Why the file at `path` is not a usable image (missing, undecodable, too large), or None."""
    path = Path(path)
    if not path.is_file():
        return "file not found"
    try:
        load_rgb(path)
    except BadImage as exc:
        return str(exc)
    return None


def looks_like_image(path: Path) -> bool:
    """Whether Pillow recognises the file from its header (nothing is decoded)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path):
                return True
    except Image.DecompressionBombError:
        return True  # an image, just a huge one: the filter drops it and says why
    except Exception:  # noqa: BLE001 - any failure to identify means "not an image"
        return False


@functools.cache
def image_suffixes() -> frozenset[str]:
    """File suffixes of the formats Pillow can decode (computed on first use: it loads every plugin)."""
    stubs = {"BUFR", "GRIB", "HDF5", "MPEG", "WMF"}  # identified by Pillow but not decodable by it
    return frozenset(ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN and fmt not in stubs)


# ---------------------------------------------------------------- grids of panels
def check_grid(n_images: int, columns: int, rows: int, gap: int) -> None:
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


def fit_panel(image: Image.Image, size: tuple[int, int]) -> Image.Image:
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
    check_grid(len(images), columns, rows, gap)
    cell_w, cell_h = images[0].size
    canvas = Image.new(
        "RGB", (columns * cell_w + (columns - 1) * gap, rows * cell_h + (rows - 1) * gap), background
    )
    for index, image in enumerate(images):
        row, col = divmod(index, columns)
        canvas.paste(fit_panel(image, (cell_w, cell_h)), (col * (cell_w + gap), row * (cell_h + gap)))
    return canvas
