"""Caption text as people save it: the caption template, and text files decoded strictly
(UTF-8 with or without BOM, UTF-16, GB18030/GBK) with the encoding found."""

from __future__ import annotations

import codecs
import re
import string
from pathlib import Path


from kolors_story.errors import UserError


def check_caption_template(template: str) -> None:
    """Fail early unless `template` uses `{caption}` and no other placeholder."""
    key = "dataset.caption_template"
    try:
        fields = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as exc:  # unbalanced braces
        raise UserError(f"{key} {template!r} is not a valid template ({exc}); write e.g. '{{caption}}, ink wash'.") from exc
    if fields != {"caption"}:
        others = sorted(fields - {"caption"})
        what = f"uses unknown placeholder(s) {others}" if others else "has no {caption} placeholder"
        raise UserError(
            f"{key} {template!r} {what}; the only placeholder is {{caption}} (e.g. '{{caption}}, ink wash'). "
            "Write a literal brace as {{ or }}."
        )


def apply_template(template: str, caption: str) -> str:
    return template.format(caption=caption).strip()


_BOMS = (
    (codecs.BOM_UTF8, "utf-8", "utf-8 (BOM)"),
    (codecs.BOM_UTF16_LE, "utf-16-le", "utf-16-le (BOM)"),
    (codecs.BOM_UTF16_BE, "utf-16-be", "utf-16-be (BOM)"),
)


_CONTROLS = re.compile(r"[\x00-\x08\x0b\x0e-\x1f\x7f-\x9f]")  # no text has these; tab, newlines, form feed allowed


# GB18030 decodes most byte strings; byte pairs that are no character land in the private use area
# (its user-defined ranges), and U+FFFD marks an earlier broken conversion. Either means "not GBK text".
_NOT_GB_TEXT = re.compile("[\ue000-\uf8ff\ufffd]")


ENCODINGS_TRIED = "UTF-8 (with or without BOM), UTF-16 (with a BOM, or without one when it holds ASCII), GB18030/GBK"


def _undecodable(path: Path, why: str) -> UserError:
    return UserError(
        f"{path}: cannot read it as text ({why}; tried {ENCODINGS_TRIED}). "
        "Re-save the file as UTF-8 (in most editors: Save as > Encoding: UTF-8) and rerun."
    )


def _utf16_order(data: bytes) -> str | None:
    """UTF-16 byte order of BOM-less data, judged by where its NUL bytes fall (the high bytes of
    ASCII characters): at odd offsets little-endian, at even ones big-endian; None if unclear."""
    if len(data) % 2:
        return None
    even, odd = data[0::2].count(0), data[1::2].count(0)
    if odd >= 4 * even and odd:
        return "utf-16-le"
    if even >= 4 * odd and even:
        return "utf-16-be"
    return None


def _strict(data: bytes, codec: str, label: str, path: Path) -> str:
    try:
        text = data.decode(codec)
    except UnicodeDecodeError as exc:
        raise _undecodable(path, f"not valid {label} at byte {exc.start}") from None
    if _CONTROLS.search(text):
        raise _undecodable(path, f"as {label} it holds control characters, so it is not text")
    return text


def decode_text(data: bytes, path: Path) -> tuple[str, str]:
    """Text of a caption or metadata file, and the encoding found (e.g. 'utf-8', 'gb18030').

    Order: a BOM decides (UTF-8, UTF-16 LE/BE); NUL bytes mean BOM-less UTF-16 if their offsets
    say which byte order (ASCII characters in it), else binary; then UTF-8; then GB18030 (a
    superset of GBK and GB2312). Undecodable: invalid bytes in the chosen encoding, control
    characters, or a GB18030 reading with private-use or U+FFFD characters. A UTF-16 file
    without BOM that holds no ASCII at all cannot be told from GB18030; save it with a BOM.
    """
    for bom, codec, label in _BOMS:
        if data.startswith(bom):
            return _strict(data[len(bom):], codec, label, path), label
    if b"\x00" in data:
        codec = _utf16_order(data)
        if codec is None:
            raise _undecodable(path, "it holds NUL bytes: binary data, or UTF-16/UTF-32 without a byte-order mark")
        return _strict(data, codec, f"{codec} (no BOM)", path), f"{codec} (no BOM)"
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        pass  # not UTF-8: the legacy Chinese encoding is next
    else:
        return _strict(data, "utf-8", "utf-8", path), "utf-8"
    try:
        text = data.decode("gb18030")
    except UnicodeDecodeError as exc:
        raise _undecodable(path, f"neither UTF-8 nor GB18030 at byte {exc.start}") from None
    if _CONTROLS.search(text) or _NOT_GB_TEXT.search(text):
        raise _undecodable(path, "neither UTF-8 nor GB18030 text (as GB18030 it gives control or unassigned characters)")
    return text, "gb18030"


def read_text_file(path: Path) -> tuple[str, str]:
    """`decode_text` of the file at `path`; a newline-normalised text and its encoding."""
    text, encoding = decode_text(Path(path).read_bytes(), Path(path))
    return text.replace("\r\n", "\n").replace("\r", "\n"), encoding
