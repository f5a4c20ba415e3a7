"""kohya-style folders through the whole data stage: nested <repeats>_<name>/ folders -> rows ->
Data-Juicer filter -> training folder -> the trainer's examples and batch order."""

from __future__ import annotations

import csv
import io
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kolors_story.data.filtering import filter_rows
from kolors_story.data.local_folder import collect_local, collect_local_rows
from kolors_story.data.demo_data import build_demo_dataset
from kolors_story.data.training_folder import build_training_folder
from kolors_story.errors import UserError
from kolors_story.training.data import BatchOrder, examples_per_epoch, read_metadata

OPS = [{"image_shape_filter": {"min_width": 64, "min_height": 64}}, {"image_deduplicator": {"method": "phash"}}]


def _noise(path: Path, seed: int, size: tuple[int, int] = (80, 72)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


@pytest.fixture(scope="module")
def staged(tmp_path_factory) -> dict:
    """A kohya folder (3 images x 10, one of them too small, 2 images x 2, a top-level image)
    through download, filter and the training folder."""
    root = tmp_path_factory.mktemp("kohya") / "img"
    for i, rel in enumerate(["10_style/a.png", "10_style/b.jpg", "10_style/small.png", "2_extra/c.png",
                             "2_extra/sub/d.png", "top.png"]):
        _noise(root / rel, i, (40, 40) if "small" in rel else (80, 72))
    (root / "10_style" / "a.caption").write_text("山水", encoding="utf-8")
    run = tmp_path_factory.mktemp("run")
    rows, report = collect_local(root, run / "images", "ink, {caption}", "水墨画", None)
    result = filter_rows(rows, OPS, run / "dj")
    csv_path = build_training_folder(result.kept, run / "dataset")
    return {"rows": rows, "report": report, "result": result, "csv": csv_path, "dataset": run / "dataset"}


def test_filter_stats_count_repeats_after_filtering(staged):
    assert [(r["id"], r.get("repeats")) for r in staged["rows"]] == [
        ("a", 10), ("b", 10), ("small", 10), ("c", 2), ("d", 2), ("top", None)]
    assert staged["result"].stats["repeats"] == {
        "images": 5,
        "examples_per_epoch": 10 + 10 + 2 + 2 + 1,
        "folders": [
            {"folder": "./", "repeats": 1, "images": 1, "examples_per_epoch": 1},
            {"folder": "10_style/", "repeats": 10, "images": 2, "examples_per_epoch": 20},  # small.png filtered out
            {"folder": "2_extra/", "repeats": 2, "images": 1, "examples_per_epoch": 2},
            {"folder": "2_extra/sub/", "repeats": 2, "images": 1, "examples_per_epoch": 2},
        ],
    }
    kept = staged["result"].kept
    assert kept[0]["caption"] == "山水" and kept[0]["caption_from"] == "10_style/a.caption"


def test_training_folder_carries_repeats_and_the_trainer_repeats_the_images(staged):
    with open(staged["csv"], encoding="utf-8", newline="") as fh:
        table = list(csv.reader(fh))
    assert table == [["file_name", "text", "repeats"], ["a.jpg", "ink, 山水", "10"], ["b.jpg", "ink, 水墨画", "10"],
                     ["c.jpg", "ink, 水墨画", "2"], ["d.jpg", "ink, 水墨画", "2"], ["top.jpg", "ink, 水墨画", "1"]]
    examples = read_metadata(staged["dataset"])
    assert [ex.repeats for ex in examples] == [10, 10, 2, 2, 1] and examples_per_epoch(examples) == 25
    for ex in examples:
        ex.target_size = (64, 64) if ex.image_path.stem in {"a", "c"} else (32, 64)  # two buckets
    order, gen = BatchOrder(examples, batch_size=2), torch.Generator().manual_seed(0)
    epoch = []
    while len(epoch) < 25:  # one epoch: 13 batches (12 + 1 + partial ones per bucket)
        batch = order.next(gen)
        assert len({examples[i].target_size for i in batch}) == 1  # buckets never mix
        epoch += batch
    assert len(epoch) == 25 and not order.pending
    assert Counter(epoch) == {0: 10, 1: 10, 2: 2, 3: 2, 4: 1}


def test_batch_order_resumes_exactly_with_repeats(staged):
    examples = read_metadata(staged["dataset"])
    for ex in examples:
        ex.target_size = (64, 64)
    order, gen = BatchOrder(examples, 3), torch.Generator().manual_seed(5)
    for _ in range(4):
        order.next(gen)
    state, gen_state = order.state_dict(), gen.get_state()
    ahead = [order.next(gen) for _ in range(12)]
    resumed, gen2 = BatchOrder(examples, 3), torch.Generator()
    resumed.load_state_dict(state)
    gen2.set_state(gen_state)
    assert [resumed.next(gen2) for _ in range(12)] == ahead


def test_without_repeats_the_batch_order_is_what_it_was(tmp_path):
    """All repeats 1: the same draws as before repeats existed (one randperm over the examples)."""
    from kolors_story.training.data import Example

    examples = [Example(tmp_path / f"{i}.jpg", "x", target_size=(64, 64) if i % 3 else (32, 64)) for i in range(7)]
    order, gen, reference = BatchOrder(examples, 2), torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    got = [order.next(gen) for _ in range(4)]
    perm = torch.randperm(7, generator=reference).tolist()
    groups: dict = {}
    for i in perm:
        groups.setdefault(examples[i].target_size, []).append(i)
    batches = [g[k:k + 2] for g in groups.values() for k in range(0, len(g), 2)]
    expected = [batches[i] for i in torch.randperm(len(batches), generator=reference).tolist()]
    assert got == expected[:4]


def test_metadata_csv_is_unchanged_without_repeats(tmp_path):
    """A dataset with no repeats folder: file_name,text only, byte for byte as before."""
    folder = tmp_path / "demo"
    build_demo_dataset(folder, n_images=3)
    rows = [r for r in collect_local_rows(folder, default_caption="水墨画") if "_" not in r["id"][4:]]
    rows.append({**rows[0], "id": "plain_sub", "source": "sub/x.jpg"})  # a plain subfolder: no repeats field
    csv_path = build_training_folder(rows, tmp_path / "out")
    expected = io.StringIO(newline="")
    writer = csv.writer(expected)
    writer.writerow(["file_name", "text"])
    writer.writerows([(f"{r['id']}.jpg", r["text"]) for r in rows])
    assert csv_path.read_bytes() == expected.getvalue().encode("utf-8")
    assert [ex.repeats for ex in read_metadata(tmp_path / "out")] == [1] * len(rows)


def test_bad_repeats_in_metadata_csv_name_the_row(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "metadata.csv").write_text("file_name,text,repeats\na.jpg,x,2\nb.jpg,y,zero\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"metadata.csv row 2 \(b.jpg\) has repeats 'zero'.*build_metadata"):
        read_metadata(tmp_path)
