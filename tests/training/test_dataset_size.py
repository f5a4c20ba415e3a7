"""The training data: a dataset smaller than one optimizer step is refused before any process starts or
model loads; kohya repeats train and key their own checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest

from kolors_story.errors import UserError
from kolors_story.host import training_launch as launch
from kolors_story.training import TrainJob, TrainSettings, train_lora
from kolors_story.training.data import check_dataset_size, read_metadata


def _dataset(root: Path, repeats: list[int] | None = None, n: int = 3) -> Path:
    """A training folder's metadata.csv; the images are never opened by the check."""
    (root / "train").mkdir(parents=True)
    header = "file_name,text" + (",repeats" if repeats else "")
    lines = [f"{i}.jpg,x" + (f",{repeats[i]}" if repeats else "") for i in range(n)]
    (root / "train" / "metadata.csv").write_text("\n".join([header, *lines]) + "\n", encoding="utf-8")
    return root


def test_the_message_names_the_three_numbers_the_image_count_and_the_fix(tmp_path):
    examples = read_metadata(_dataset(tmp_path))
    settings = TrainSettings(batch_size=2, gradient_accumulation=2)
    check_dataset_size(examples, TrainSettings(batch_size=3), 1, tmp_path / "m.csv")  # 3 per step: enough
    with pytest.raises(UserError) as info:
        check_dataset_size(examples, settings, 2, tmp_path / "m.csv")
    message = str(info.value)
    for part in ("holds 3 image(s)", "train.batch_size 2", "train.gradient_accumulation 2", "train.processes 2",
                 "= 8", "at most 3", "add images"):
        assert part in message, part


def test_repeats_count_as_examples(tmp_path):
    examples = read_metadata(_dataset(tmp_path, repeats=[5, 1, 1]))
    check_dataset_size(examples, TrainSettings(batch_size=7), 1, tmp_path)  # 7 examples per epoch: enough
    with pytest.raises(UserError, match=r"holds 3 image\(s\) \(7 examples per epoch with their repeats\)"):
        check_dataset_size(examples, TrainSettings(batch_size=8), 1, tmp_path)


@pytest.mark.parametrize("processes", [1, 2])
def test_launch_refuses_before_any_process_or_model(tmp_path, monkeypatch, processes):
    def no_launch(*args, **kwargs):
        raise AssertionError("no training process may start")

    monkeypatch.setattr(launch, "run_logged", no_launch)
    monkeypatch.setattr(launch, "train_lora", no_launch)
    data = _dataset(tmp_path / "data", n=2)
    expected = rf"holds 2 image\(s\).*batch_size 1 x train.gradient_accumulation 3 x train.processes {processes} = {3 * processes}"
    with pytest.raises(UserError, match=expected):
        launch.train(TrainJob(tmp_path / "no-model", data, tmp_path / "out"),
                     TrainSettings(gradient_accumulation=3), processes=processes)


def test_train_lora_refuses_before_the_model_folder_is_read(tmp_path):
    """`python -m kolors_story.training` (and each rank) checks too, before KolorsFolder."""
    data = _dataset(tmp_path / "data", n=1)
    with pytest.raises(UserError, match=r"holds 1 image\(s\)"):
        train_lora(TrainJob(tmp_path / "no-model", data, tmp_path / "out"), TrainSettings(batch_size=2))


def _with_repeats(folder: Path, repeats: list[int]) -> None:
    """Add the repeats column build_metadata writes for kohya folders."""
    csv_path = folder / "train" / "metadata.csv"
    lines = csv_path.read_text(encoding="utf-8").splitlines()
    rows = [f"{line},{n}" for line, n in zip(lines[1:], repeats)]
    csv_path.write_text("\n".join([lines[0] + ",repeats", *rows]) + "\n", encoding="utf-8")


def test_repeats_train_and_key_their_own_checkpoints(tiny_kolors, tmp_path):
    """Checkpoints of a run with other repeats are never resumed; all-1 repeats are the plain run."""
    from kolors_story.models.kolors_folder import KolorsFolder
    from kolors_story.training.loop import run_fingerprint
    from kolors_fixtures import write_training_folder

    settings = TrainSettings(steps=2, resolution=32, precision="fp32", rank=4, alpha=4, checkpoint_every=1)
    folders = {name: write_training_folder(tmp_path / name, [(40, 40)] * 2, ["水墨画", "山水"]) for name in ("plain", "ones", "rep")}
    _with_repeats(folders["ones"], [1, 1])
    _with_repeats(folders["rep"], [3, 1])
    kolors = KolorsFolder(tiny_kolors)
    keys = {name: run_fingerprint(settings, kolors, read_metadata(f)) for name, f in folders.items()}
    assert keys["plain"] == keys["ones"] != keys["rep"]
    result = train_lora(TrainJob(tiny_kolors, folders["rep"], tmp_path / "out", work_dir=tmp_path / "work"),
                        settings)
    assert len(result.losses) == 2 and (tmp_path / "work" / keys["rep"]).is_dir()


def test_an_init_lora_replaced_under_its_name_keys_other_checkpoints(tiny_kolors, tmp_path):
    """train.init_lora names a file: a rerun after that file was replaced (its content tracked by
    the rules) must start from the new file, not resume the old start's checkpoints."""
    from kolors_story.models.kolors_folder import KolorsFolder
    from kolors_story.training.loop import run_fingerprint
    from kolors_fixtures import write_training_folder

    lora = tmp_path / "start.safetensors"
    lora.write_bytes(b"one start")
    settings = TrainSettings(steps=2, resolution=32, precision="fp32", rank=4, init_lora=str(lora))
    examples = read_metadata(write_training_folder(tmp_path / "data", [(40, 40)] * 2, ["水墨画", "山水"]))
    kolors = KolorsFolder(tiny_kolors)
    before = run_fingerprint(settings, kolors, examples)
    assert run_fingerprint(settings, kolors, examples) == before
    lora.write_bytes(b"another start")
    assert run_fingerprint(settings, kolors, examples) != before
