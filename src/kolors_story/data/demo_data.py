"""A small procedural ink-wash style dataset, with planted defects, for the demo and the tests.

The images share one recognisable look (pale paper, layered misty mountains in soft ink, an
optional moon, boat or pine, a red seal), so a style LoRA has something to learn; the defects
give the filter stage real work: every kind is caught by exactly one check.
"""

from __future__ import annotations

import codecs
import io
import shutil
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

PAPER = np.array([236, 230, 214], dtype=np.float32)  # warm rice paper
INK = np.array([28, 28, 32], dtype=np.float32)
SEAL_RED = (178, 34, 34)
JPEG_QUALITY = 92

# Caption pieces: the first always applies, the rest follow what is drawn.
CAPTION_BASE = "水墨画，山水，远山，薄雾，留白"
CAPTION_EXTRAS = {"moon": "明月", "boat": "小舟", "pine": "松树"}
CAPTION_SEAL = "红色印章"


def _mountain_layer(rng: np.random.Generator, w: int, h: int, base: float, amp: float) -> np.ndarray:
    """Alpha mask (h, w) in 0..1 of one ridge: a sum of random sines, ink fading downwards (mist)."""
    x = np.linspace(0.0, 1.0, w)
    ridge = np.full(w, base)
    for freq in (1.5, 3.0, 7.0, 15.0):
        ridge += amp / freq * np.sin(2 * np.pi * (freq * x + rng.uniform(0, 1))) * rng.uniform(0.6, 1.2)
    ys = np.linspace(0.0, 1.0, h)[:, None]
    depth = ys - ridge[None, :]  # > 0 below the ridge line
    inside = depth > 0
    # Darkest at the ridge, fading with depth: the classic wet-ink wash.
    return np.where(inside, np.exp(-depth * rng.uniform(4.0, 7.0)), 0.0)


def _paint(rng: np.random.Generator, w: int, h: int) -> tuple[Image.Image, list[str]]:
    """One ink-wash landscape of size (w, h) and the caption extras of what it shows."""
    canvas = np.ones((h, w, 3), dtype=np.float32) * PAPER
    canvas += rng.normal(0, 4.0, size=(h, w, 1))  # paper fibre texture
    n_layers = int(rng.integers(2, 4))
    for i in range(n_layers):
        # Far layers are higher and paler, near ones lower and darker.
        base = 0.35 + 0.18 * i + rng.uniform(-0.05, 0.05)
        strength = 0.35 + 0.25 * i
        alpha = _mountain_layer(rng, w, h, base, amp=0.25) * strength
        canvas = canvas * (1 - alpha[..., None]) + INK * alpha[..., None]
    img = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8), "RGB")
    img = img.filter(ImageFilter.GaussianBlur(radius=max(w, h) / 160))

    extras: list[str] = []
    draw = ImageDraw.Draw(img)
    s = min(w, h)
    if rng.random() < 0.4:
        cx, cy, r = w * rng.uniform(0.6, 0.85), h * rng.uniform(0.12, 0.25), s * 0.08
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=(120, 120, 120), width=max(1, s // 64))
        extras.append("moon")
    if rng.random() < 0.4:
        bx, by = w * rng.uniform(0.2, 0.6), h * rng.uniform(0.82, 0.9)
        draw.polygon([(bx, by), (bx + s * 0.14, by), (bx + s * 0.11, by + s * 0.03), (bx + s * 0.03, by + s * 0.03)], fill=(40, 40, 44))
        extras.append("boat")
    if rng.random() < 0.4:
        px = w * rng.uniform(0.08, 0.3)
        draw.line([(px, h * 0.95), (px + s * 0.03, h * 0.55)], fill=(35, 30, 28), width=max(1, s // 40))
        for _ in range(4):
            ox, oy = px + rng.uniform(-0.08, 0.1) * s, h * rng.uniform(0.5, 0.7)
            draw.ellipse([ox - s * 0.06, oy - s * 0.025, ox + s * 0.06, oy + s * 0.025], fill=(45, 55, 45))
        extras.append("pine")
    img = img.filter(ImageFilter.GaussianBlur(radius=max(w, h) / 300))  # soften the brush edges

    # The red seal, bottom right: what makes the style recognisable at a glance.
    seal = max(3, s // 10)
    x0, y0 = w - seal - max(2, s // 24), h - seal - max(2, s // 24)
    ImageDraw.Draw(img).rectangle([x0, y0, x0 + seal, y0 + seal], fill=SEAL_RED)
    return img, extras


def _caption(extras: list[str]) -> str:
    return "，".join([CAPTION_BASE, *(CAPTION_EXTRAS[e] for e in extras), CAPTION_SEAL])


def _jpeg_bytes(img: Image.Image, quality: int = JPEG_QUALITY) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _phash(data: bytes) -> bytes:
    """64-bit perceptual hash by imagededup's PHash, the code Data-Juicer's phash dedup runs.

    Data-Juicer drops a duplicate only when the hashes are equal, and a resize flips a bit now
    and then; the demo uses this to pick a source whose resized copy is a true phash duplicate.
    """
    from imagededup.methods import PHash  # here: imagededup imports torch, only this needs it

    with Image.open(io.BytesIO(data)) as img:
        array = np.asarray(img.convert("RGB"))
    return bytes.fromhex(PHash(verbose=False).encode_image(image_array=array))


def _resized_copy(img: Image.Image, size: int) -> bytes:
    return _jpeg_bytes(img.resize((int(size * 0.9), int(size * 0.9)), Image.Resampling.LANCZOS), quality=75)


# Sidecars are saved the ways people's tools save them (cycled by image number): the download
# stage must read each one as the same caption.
CAPTION_ENCODINGS = ("utf-8", "gb18030", "utf-16-le-bom", "utf-8-sig")
NOTES = "Demo dataset written by kolors_story.data.demo_data; not an image, the download stage lists it as skipped.\n"


def _caption_bytes(caption: str, encoding: str) -> bytes:
    if encoding == "utf-16-le-bom":  # explicit byte order: "utf-16" would follow the machine's
        return codecs.BOM_UTF16_LE + caption.encode("utf-16-le")
    return caption.encode(encoding)


def _write(out_dir: Path, stem: str, data: bytes, caption: str | None) -> None:
    (out_dir / f"{stem}.jpg").write_bytes(data)
    if caption is not None:
        encoding = CAPTION_ENCODINGS[int(stem[4:7]) % len(CAPTION_ENCODINGS)]
        (out_dir / f"{stem}.txt").write_bytes(_caption_bytes(caption + "\n", encoding))


def build_demo_dataset(out_dir: Path, n_images: int = 24, size: int = 96, seed: int = 0) -> dict[str, int]:
    """Write an ink-wash image folder (JPEG + `.txt` caption sidecars) with planted defects.

    Files are `img_NNN[_kind].jpg`; originals sort before their duplicates so dedup keeps them.
    Sidecars come in UTF-8, GB18030, UTF-16 (BOM) and UTF-8 with BOM (`CAPTION_ENCODINGS`), and
    a `README.md` sits among the images, as in folders people have.
    `n_images` good images survive a filter of min 64x64, aspect 0.5-2.0 and phash dedup (one of
    them has no caption sidecar); the defects do not. Same seed, same bytes.
    Returns counts per kind; the kinds are disjoint and add up to the number of image files.
    """
    if n_images < 3:
        raise ValueError("n_images must be >= 3 (two duplicate sources and one uncaptioned image)")
    if size < 64:
        raise ValueError("size must be >= 64, the demo filter's minimum")
    out_dir = Path(out_dir)
    if out_dir.exists():
        shutil.rmtree(out_dir)  # a stale file would break determinism
    out_dir.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    counter = iter(range(10_000))

    def stem(kind: str = "") -> str:
        return f"img_{next(counter):03d}" + (f"_{kind}" if kind else "")

    counts = {k: 0 for k in ("good", "no_caption", "undersized", "wrong_aspect", "duplicate", "corrupt", "truncated")}
    originals: list[tuple[Image.Image, str, bytes]] = []
    for i in range(n_images):
        img, extras = _paint(rng, size, size)
        data = _jpeg_bytes(img)
        no_caption = i == n_images - 1
        _write(out_dir, stem("nocap" if no_caption else ""), data, None if no_caption else _caption(extras))
        originals.append((img, _caption(extras), data))
        counts["no_caption" if no_caption else "good"] += 1

    for _ in range(2):  # too small for min 64x64
        img, extras = _paint(rng, 40, 40)
        _write(out_dir, stem("small"), _jpeg_bytes(img), _caption(extras))
        counts["undersized"] += 1
    for _ in range(2):  # big enough, but aspect 2.5 > 2.0
        img, extras = _paint(rng, int(size * 2.5), size)
        _write(out_dir, stem("wide"), _jpeg_bytes(img), _caption(extras))
        counts["wrong_aspect"] += 1

    # An exact byte copy, and a resized + re-encoded copy: phash must catch both.
    _, cap0, data0 = originals[0]
    _write(out_dir, stem("dup_exact"), data0, cap0)
    source = next(
        (o for o in originals[1:-1] if _phash(_resized_copy(o[0], size)) == _phash(o[2])), originals[1]
    )
    _write(out_dir, stem("dup_resized"), _resized_copy(source[0], size), source[1])
    counts["duplicate"] += 2

    _write(out_dir, stem("corrupt"), rng.bytes(2048), "水墨画，损坏的文件")  # garbage named .jpg
    counts["corrupt"] += 1
    img, extras = _paint(rng, size, size)
    data = _jpeg_bytes(img)
    _write(out_dir, stem("truncated"), data[: len(data) // 2], _caption(extras))  # valid header, half the scan
    counts["truncated"] += 1
    (out_dir / "README.md").write_text(NOTES, encoding="utf-8")
    return counts
