"""Seals (kolors_story.seals) and the shared file helpers: each kind of damage to a sealed file or
folder, and a cut safetensors file without a seal, is found and named with the command that
remakes it; a full disk is refused before writing."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from kolors_story import files, seals
from kolors_story.models.tensor_cache import TensorCache


@pytest.fixture
def lora(tmp_path):
    path = tmp_path / "lora" / "pytorch_lora_weights.safetensors"
    path.parent.mkdir()
    save_file({"a.lora_A.weight": torch.arange(64.0).reshape(8, 8)}, path)
    seals.seal(path, "train_lora")
    return path


def damage(path, how):
    raw = bytearray(path.read_bytes())
    if how == "truncate":
        path.write_bytes(raw[: len(raw) // 2])
    elif how == "bitflip":
        raw[-5] ^= 0x10
        path.write_bytes(bytes(raw))
    elif how == "replace":  # another file of the same size
        raw[-4:] = b"\x00\x00\x80\x3f"
        path.write_bytes(bytes(raw))
    elif how == "grow":
        path.write_bytes(bytes(raw) + b"\x00" * 8)


def test_an_intact_artifact_passes(lora):
    seals.verify(lora)
    assert seals.read_seal(lora)["rule"] == "train_lora"


@pytest.mark.parametrize("how,words", [("truncate", "truncated: "), ("bitflip", "changed since its job"),
                                       ("replace", "changed since its job"), ("grow", "changed since its job")])
def test_each_damage_is_named_with_the_command_that_remakes_it(lora, how, words):
    damage(lora, how)
    with pytest.raises(seals.DamagedArtifact) as err:
        seals.verify(lora)
    message = str(err.value)
    assert message.startswith(f"{lora}: {words}") and "\n" not in message
    assert f"snakemake -R {lora}" in message and "made by rule train_lora" in message


def test_a_cut_safetensors_without_a_seal_is_refused_too(lora):
    seals.seal_path(lora).unlink()
    damage(lora, "truncate")
    with pytest.raises(seals.DamagedArtifact, match="truncated|not a safetensors file"):
        seals.verify(lora)
    lora.write_bytes(b"PNG not a tensor file at all")
    with pytest.raises(seals.DamagedArtifact, match="not a safetensors file"):
        seals.verify(lora)


def test_a_sealed_folder_finds_a_changed_missing_or_added_file(tmp_path):
    folder = tmp_path / "candidates"
    (folder / "sub").mkdir(parents=True)
    (folder / "candidates.json").write_text("{}")
    (folder / "sub" / "0.png").write_bytes(b"x" * 100)
    seals.seal(folder, "generate_scene")
    seals.verify(folder)
    (folder / "sub" / "0.png").write_bytes(b"y" * 100)
    with pytest.raises(seals.DamagedArtifact, match="sub/0.png: changed since its job"):
        seals.verify(folder)
    (folder / "sub" / "0.png").unlink()
    with pytest.raises(seals.DamagedArtifact, match="sub/0.png: missing"):
        seals.verify(folder)
    seals.seal(folder, "generate_scene")
    (folder / "extra.png").write_bytes(b"z")
    with pytest.raises(seals.DamagedArtifact, match="extra.png: not written by its job"):
        seals.verify(folder)


def test_the_check_command_lists_every_damaged_artifact(lora, tmp_path, capsys):
    other = tmp_path / "panel.png"
    other.write_bytes(b"p" * 10)
    seals.seal(other, "generate_scene")
    assert seals.main([str(tmp_path)]) == 0
    damage(other, "truncate")
    assert seals.main([str(tmp_path)]) == 1
    out = capsys.readouterr()
    assert "2 sealed artifact(s) checked, 1 damaged" in out.out and "panel.png: truncated" in out.err


@pytest.mark.parametrize("how", ["truncate", "bitflip"])
def test_a_damaged_cache_entry_is_dropped_and_made_again(tmp_path, caplog, how):
    cache = TensorCache(tmp_path)
    key = cache.key("caption")
    cache.put(key, {"x": torch.arange(100.0)})
    damage(cache._path(key), how)
    assert cache.get(key) is None and not cache._path(key).exists()
    assert "is damaged" in caplog.text and "making it again" in caplog.text
    cache.put(key, {"x": torch.arange(100.0)})
    assert torch.equal(cache.get(key)["x"], torch.arange(100.0))


def test_seals_leave_the_output_folders_as_their_jobs_wrote_them(tmp_path, monkeypatch):
    # the challenge's evaluate() opens every file of the scenes folder; a bundle is uploaded whole
    monkeypatch.chdir(tmp_path)
    scenes = Path("results/demo/scenes")
    scenes.mkdir(parents=True)
    for name in ("s1.png", "s2.png"):
        (scenes / name).write_bytes(name.encode())
        assert seals.seal(scenes / name, "copy_panel") == Path(f"results/.seals/demo/scenes/{name}.seal.json")
    bundle = Path("results/demo/bundle")
    bundle.mkdir()
    (bundle / "README.md").write_text("card")
    seals.seal(bundle, "bundle")
    assert sorted(os.listdir(scenes)) == ["s1.png", "s2.png"] and os.listdir(bundle) == ["README.md"]
    assert seals.sealed_artifact(seals.seal_path(scenes / "s1.png")) == scenes / "s1.png"
    assert seals.sealed_under(Path("results/demo")) == [bundle, scenes / "s1.png", scenes / "s2.png"]
    assert seals.sealed_under(Path("results")) == seals.sealed_under(Path("results/demo"))
    assert seals.sealed_under(scenes) == [scenes / "s1.png", scenes / "s2.png"]
    (scenes / "s2.png").write_bytes(b"other!")
    assert [p.split(":")[0] for p in seals.verify_all(Path("results"))] == ["results/demo/scenes/s2.png"]
    # outside the working folder: a .seals folder beside the artifact (a hidden folder, not a file)
    elsewhere = tmp_path.parent / f"{tmp_path.name}-out" / "x.png"
    elsewhere.parent.mkdir()
    elsewhere.write_bytes(b"x")
    assert seals.seal(elsewhere, "r") == elsewhere.parent / ".seals" / "x.png.seal.json"
    seals.verify(elsewhere)


def test_too_little_free_space_is_refused_before_writing(tmp_path, monkeypatch):
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=5 << 20))
    with pytest.raises(files.NoSpace, match=r"no space left on /.* \(the LoRA file\): 110\.0 MiB needed, 5\.0 MiB free"):
        files.ensure_space(tmp_path / "not" / "made" / "yet", 100 << 20, "the LoRA file")
    files.ensure_space(tmp_path, 1 << 20, "a small file")


@pytest.fixture
def checked_once(monkeypatch) -> list[Path]:
    """Every sha256 the seal checks compute; files of any size are recorded once settled (50 ms)."""
    hashed: list[Path] = []
    sha256 = seals.sha256_file
    monkeypatch.setattr(seals, "sha256_file", lambda path: hashed.append(Path(path)) or sha256(path))
    monkeypatch.setattr(seals, "CHECKED_MIN_BYTES", 0)
    monkeypatch.setattr(seals, "SETTLED_S", 0.05)
    return hashed


def test_a_large_artifact_is_hashed_once_by_the_jobs_that_read_it(lora, checked_once):
    import time

    seals.verify(lora)  # just written: hashed, not recorded (a coarse clock)
    time.sleep(0.1)
    for _ in range(3):  # the first settled check hashes and records; the next ones trust it
        seals.verify(lora)
    assert checked_once == [lora, lora]
    seals.seal(lora, "train_lora")  # a new seal (its job ran again): hashed again
    seals.verify(lora)
    assert len(checked_once) == 3


@pytest.mark.parametrize("how", ["bitflip", "replace", "truncate", "swap"])
def test_a_recorded_artifact_changed_since_is_hashed_again_and_refused(lora, checked_once, how):
    """mtime put back after the change, or another file renamed over it: ctime or the inode moved."""
    import time

    time.sleep(0.1)
    seals.verify(lora)
    seals.verify(lora)
    assert len(checked_once) == 1
    before = lora.stat()
    if how == "swap":
        other = lora.with_name("other.safetensors")
        shutil.copy2(lora, other)
        damage(other, "bitflip")
        os.replace(other, lora)
    else:
        damage(lora, how)
    os.utime(lora, ns=(before.st_atime_ns, before.st_mtime_ns))
    with pytest.raises(seals.DamagedArtifact, match="truncated|changed since its job"):
        seals.verify(lora)
