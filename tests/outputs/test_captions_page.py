"""The captions page (kolors_story.outputs.captions_page): each image beside its training text,
where the text came from and its warnings, in one self-contained HTML file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from kolors_story.outputs.captions_page import write_captions_page


def test_every_image_is_a_thumbnail_beside_its_text_source_and_warnings(tmp_path):
    images = []
    for i, size in enumerate([(300, 200), (64, 64)]):
        images.append(tmp_path / f"img{i}.png")
        Image.fromarray(np.full((size[1], size[0], 3), 40 * i, dtype=np.uint8)).save(images[-1])
    records = [
        {"image": "img0.png", "text": "ink style，<桥>", "source": "generated", "model": "tiny", "tokens": 9,
         "cached": True, "warnings": []},
        {"image": "img1.png", "text": "水墨画", "source": "fallback", "model": "tiny", "tokens": 4,
         "warnings": ["empty caption for img1.png from tiny; using dataset.default_caption '水墨画'"]},
    ]
    page = write_captions_page(records, images, tmp_path / "out/captions.html", "Captions").read_text(encoding="utf-8")
    assert page.count("data:image/jpeg;base64,") == 2 and page.count("<tr>") == 3
    assert "ink style，&lt;桥&gt;" in page and "generated (cached)" in page and "empty caption for img1.png" in page
    assert "1 generated, 1 fallback" in page and "Captioner: tiny" in page
    assert "/tmp" not in page and str(tmp_path) not in page  # relocatable: no paths, only file names


def test_an_unreadable_image_is_named_not_fatal(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    record = {"image": "bad.png", "text": "x", "source": "user", "model": None, "tokens": 3, "warnings": []}
    page = write_captions_page([record], [bad], tmp_path / "p.html", "t").read_text(encoding="utf-8")
    assert "(unreadable)" in page and "1 user" in page
