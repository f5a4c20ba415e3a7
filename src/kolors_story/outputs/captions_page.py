"""The captions page: every kept image (a thumbnail, embedded) beside its training text, where that
text came from (the user's own caption, the captioner's, or a fallback), its ChatGLM token count
and any warning. One self-contained HTML file (results/<run>/data/captions.html, and in the
Snakemake report): the browser draws the Chinese text, no font needed here."""

from __future__ import annotations

import base64
import html
import io
from collections import Counter
from pathlib import Path

from PIL import Image

THUMB = 160  # pixels, the longer side
SOURCES = {"user": "the image's own caption (caption.keep_existing)", "generated": "written by the captioner",
           "fallback": "the captioner's was empty: the image's own caption, else dataset.default_caption"}
STYLE = """body{font-family:sans-serif;margin:1.5em}table{border-collapse:collapse}
td,th{border-bottom:1px solid #ddd;padding:6px 10px;text-align:left;vertical-align:top}
.user{color:#1a6e1a}.generated{color:#1a4f9e}.fallback{color:#b35c00}.warn{color:#b00020;font-size:.9em}
img{max-width:%dpx;max-height:%dpx}""" % (THUMB, THUMB)


def thumbnail_uri(image: Path) -> str:
    """A small JPEG of the image as a data URI ("" when it cannot be read)."""
    try:
        with Image.open(image) as img:
            img = img.convert("RGB")
            img.thumbnail((THUMB, THUMB))
            buffer = io.BytesIO()
            img.save(buffer, format="JPEG", quality=85)
    except OSError:
        return ""
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _row(record: dict, image: Path) -> str:
    uri = thumbnail_uri(image)
    picture = f'<img src="{uri}" alt="{html.escape(record["image"])}">' if uri else "(unreadable)"
    warnings = "".join(f'<div class="warn">⚠ {html.escape(w)}</div>' for w in record.get("warnings", []))
    source = record["source"] + (" (cached)" if record.get("cached") else "")
    return (f'<tr><td>{picture}</td><td>{html.escape(record["image"])}</td>'
            f'<td lang="zh">{html.escape(record["text"])}{warnings}</td>'
            f'<td class="{record["source"]}" title="{html.escape(SOURCES.get(record["source"], ""))}">'
            f'{html.escape(source)}</td><td>{record["tokens"]}</td></tr>')


def write_captions_page(records: list[dict], images: list[Path], out: Path, title: str) -> Path:
    """Write the page: one table row per record (records[i] describes images[i])."""
    counts = Counter(r["source"] for r in records)
    summary = ", ".join(f"{counts[s]} {s}" for s in SOURCES if counts[s])
    models = sorted({r["model"] for r in records if r.get("model")})
    rows = "\n".join(_row(r, Path(i)) for r, i in zip(records, images))
    page = (f'<!DOCTYPE html><html lang="zh"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>"
            f"<p>{len(records)} images: {html.escape(summary)}. Captioner: {html.escape(', '.join(models) or '-')}."
            "</p><table><tr><th>image</th><th>file</th><th>training text</th><th>from</th>"
            f"<th>ChatGLM tokens</th></tr>\n{rows}\n</table></body></html>\n")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page, encoding="utf-8")
    return out
