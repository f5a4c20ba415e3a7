"""plan.content_digest: a local input's content as one digest, each file hashed once per identity."""

import os
import time

import pytest

from kolors_story.plan import content_digest
from kolors_story.plan.content_digest import changes, digest, listing

OLD = time.time() - 3600  # files older than the settle time, so their hashes are cached


def write(path, data: bytes, when: float = OLD):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    os.utime(path, (when, when))
    return path


@pytest.fixture(autouse=True)
def settled_at_once(monkeypatch):
    """Files count as settled as soon as written (the real wait, SETTLED_S, is tested alone)."""
    monkeypatch.setattr(content_digest, "SETTLED_S", 0.0)


@pytest.fixture
def style(tmp_path):
    folder = tmp_path / "style"
    write(folder / "a.jpg", b"jpeg a")
    write(folder / "a.txt", b"ink style, a girl")
    write(folder / "10_sub" / "b.png", b"png b")
    write(folder / ".DS_Store", b"finder")
    write(folder / ".git" / "HEAD", b"ref")
    return folder


@pytest.fixture
def hashed(monkeypatch):
    """The files sha256 was computed for, in order."""
    seen = []
    real = content_digest.sha256_file
    monkeypatch.setattr(content_digest, "sha256_file", lambda path: seen.append(path.name) or real(path))
    return seen


def test_every_file_by_name_and_content_hidden_names_left_out(style, tmp_path):
    files = listing(style, tmp_path / "cache")
    assert sorted(files) == ["10_sub/b.png", "a.jpg", "a.txt"]
    assert len(set(files.values())) == 3


def test_a_rerun_hashes_only_what_changed_and_a_touch_changes_nothing(style, tmp_path, hashed):
    before = listing(style, tmp_path / "cache")
    assert len(hashed) == 3
    hashed.clear()
    assert listing(style, tmp_path / "cache") == before and hashed == []  # every hash from the cache
    for path in style.rglob("*"):
        if path.is_file():
            os.utime(path)  # touched: new times, same bytes
    assert digest(listing(style, tmp_path / "cache")) == digest(before)


def test_an_edit_in_place_with_its_old_time_kept_changes_the_digest(style, tmp_path, hashed):
    before = listing(style, tmp_path / "cache")
    hashed.clear()
    write(style / "a.txt", b"ink style, a boy")  # same size, same mtime: only ctime tells
    now = listing(style, tmp_path / "cache")
    assert hashed == ["a.txt"] and digest(now) != digest(before)
    assert changes(before, now) == "1 edited (a.txt)"


def test_added_removed_and_renamed_files_are_named(style, tmp_path):
    before = listing(style, tmp_path / "cache")
    write(style / "c.jpg", b"jpeg c")
    (style / "a.jpg").rename(style / "a2.jpg")
    (style / "10_sub" / "b.png").unlink()
    now = listing(style, tmp_path / "cache")
    assert digest(now) != digest(before)
    assert changes(before, now) == "2 added (a2.jpg, c.jpg); 2 removed (10_sub/b.png, a.jpg)"
    many = {f"{i:02d}.jpg": "x" for i in range(8)}
    assert changes({}, many) == "8 added (00.jpg, 01.jpg, 02.jpg, 03.jpg, 04.jpg, +3 more)"


def test_a_file_just_written_is_hashed_again_until_it_settles(tmp_path, hashed, monkeypatch):
    monkeypatch.setattr(content_digest, "SETTLED_S", 2.0)
    lora = write(tmp_path / "style.safetensors", b"weights", when=time.time())
    listing(lora, tmp_path / "cache")
    listing(lora, tmp_path / "cache")
    assert hashed == ["style.safetensors"] * 2  # a coarse clock could give the next write this ctime


def test_a_single_file_and_a_damaged_cache(tmp_path):
    lora = write(tmp_path / "style.ckpt", b"weights")
    files = listing(lora, tmp_path / "cache")
    assert list(files) == [""]
    for cache in (tmp_path / "cache").iterdir():
        cache.write_text("{not json")
    assert listing(lora, tmp_path / "cache") == files
