"""Local inputs tracked by content (rules/inputs.smk, kolors_story.plan.content_digest): the demo
with its style folder, Kolors folder and a LoRA given as a user's own files. An edit that keeps the
file's time still reruns exactly the chain that reads it; a touch or a no-op rerun plans nothing."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest
import yaml

from kolors_story.data.demo_data import build_demo_dataset
from workflow_copy import snakemake

pytestmark = pytest.mark.workflow
DATA_CHAIN = {"download_dataset": 1, "filter_dataset": 1, "build_metadata": 1}


def planned(folder: Path, *args: str) -> tuple[dict[str, int], str]:
    """Rule -> job count of a dry run, and its output."""
    proc = snakemake(folder, "-n", "--cores", "1", "--configfile", "demo/config.yaml", "mine.yaml", *args)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    if "Nothing to be done" in out:
        return {}, out
    table = out.split("Job stats:")[1]
    return {m[1]: int(m[2]) for m in re.finditer(r"^(\w+)\s+(\d+)$", table, re.M) if m[1] != "total"}, out


def keep_time(path: Path, data: bytes) -> None:
    """Rewrite a file in place as a tool that keeps times (cp -p, rsync -t, an unzip) does."""
    st = path.stat()
    path.write_bytes(data)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


@pytest.fixture(scope="module")
def own_style(tmp_path_factory) -> Path:
    """The demo's data stages run on a style folder of the user's (a copy of the demo's images)."""
    folder = tmp_path_factory.mktemp("own")
    build_demo_dataset(folder / "style")
    config = {"dataset": {"path": "style"}}
    (folder / "mine.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    proc = snakemake(folder, "--cores", "1", "--configfile", "demo/config.yaml", "mine.yaml", "--until", "build_metadata")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return folder


def test_a_no_op_rerun_and_touched_files_plan_nothing(own_style):
    assert planned(own_style, "--until", "build_metadata")[0] == {}
    for path in (own_style / "style").iterdir():
        os.utime(path)
    assert planned(own_style, "--until", "build_metadata")[0] == {}


def test_a_caption_edited_in_place_reruns_the_data_chain_and_says_which(own_style):
    caption = sorted((own_style / "style").glob("*.txt"))[0]
    text = caption.read_bytes()
    keep_time(caption, text.replace("ink".encode(), "INK".encode()) if b"ink" in text else text + b"!")
    try:
        jobs, out = planned(own_style, "--until", "build_metadata")
        assert jobs == DATA_CHAIN, out[-3000:]
        assert f"1 edited ({caption.name})" in out and "dataset.path 'style' changed" in out
        whole, _ = planned(own_style)  # and everything after it: training and every panel
        assert whole["train_lora"] == 1 and whole["generate_scene"] >= 8
    finally:
        keep_time(caption, text)
    assert planned(own_style, "--until", "build_metadata")[0] == {}  # as it was: nothing again


@pytest.mark.parametrize("change", ["added", "removed", "renamed"])
def test_an_added_removed_or_renamed_image_reruns_the_data_chain(own_style, change):
    style = own_style / "style"
    image = sorted(style.glob("*.jpg"))[0]
    moved = {"added": style / "extra.jpg", "removed": own_style / "aside.jpg", "renamed": style / "zz_renamed.jpg"}[change]
    (shutil.copy2 if change == "added" else shutil.move)(image, moved)
    try:
        jobs, out = planned(own_style, "--until", "build_metadata")
        assert jobs == DATA_CHAIN, out[-3000:]
        assert f"1 {'added' if change != 'removed' else 'removed'}" in out
    finally:
        if change == "added":
            moved.unlink()
        else:
            shutil.move(moved, image)


def lora_file(kolors: Path, out: Path, seed: int) -> Path:
    """A trainer-made LoRA for the tiny Kolors UNet, its lora_B drawn from `seed`."""
    import torch

    from kolors_story.models.kolors_folder import KolorsFolder
    from kolors_story.training import TrainSettings, add_lora, save_lora

    unet = KolorsFolder(kolors).load_unet(torch.float32)
    add_lora(unet, TrainSettings(rank=4, alpha=4.0))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if ".lora_B." in name:
                param.copy_(torch.randn(param.shape, generator=gen))
    return save_lora(unet, out)


def test_a_local_model_folders_weights_and_a_use_lora_file_are_tracked(own_style):
    """models.kolors as a local folder (a copy of the tiny Kolors), train.use_lora as a file: the
    weights or the LoRA replaced, their times kept, rerun the job that reads them, and only it."""
    snakemake(own_style, "--cores", "1", "--configfile", "demo/config.yaml", "--until", "build_tiny_models")
    shutil.copytree(own_style / "resources/tiny/kolors", own_style / "kolors")
    lora = lora_file(own_style / "kolors", own_style / "lora", seed=1)
    other = lora_file(own_style / "kolors", own_style / "other", seed=2).read_bytes()
    mine = {"dataset": {"path": "style"}, "models": {"kolors": "kolors"},
            "train": {"use_lora": str(lora.relative_to(own_style))}}
    (own_style / "mine.yaml").write_text(yaml.safe_dump(mine), encoding="utf-8")
    try:
        run = snakemake(own_style, "--cores", "1", "--configfile", "demo/config.yaml", "mine.yaml", "--until", "import_lora")
        assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
        assert planned(own_style, "--until", "import_lora")[0] == {}
        keep_time(lora, other)
        assert planned(own_style, "--until", "import_lora")[0] == {"import_lora": 1}
        weights = next((own_style / "kolors/unet").glob("*.safetensors"))
        keep_time(weights, weights.read_bytes()[:-1] + b"\1")
        assert planned(own_style, "--until", "import_lora")[0] == {"prepare_model": 1, "import_lora": 1}
    finally:
        (own_style / "mine.yaml").write_text(yaml.safe_dump({"dataset": {"path": "style"}}), encoding="utf-8")


def test_a_dataset_too_small_for_the_batch_is_refused_before_chatglm_loads(own_style):
    """One image with train.batch_size 4: refused by encode_texts before it loads ChatGLM (no
    training, no encoder), naming the count and the keys."""
    one = own_style / "one"
    one.mkdir()
    image = sorted((own_style / "style").glob("*.jpg"))[0]
    shutil.copy2(image, one / image.name)
    small = {"run": "small", "dataset": {"path": "one"}, "train": {"batch_size": 4}}
    (own_style / "small.yaml").write_text(yaml.safe_dump(small), encoding="utf-8")
    proc = snakemake(own_style, "--cores", "1", "--configfile", "demo/config.yaml", "small.yaml", "--until", "encode_texts")
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "rule encode_texts" in out, out[-3000:]
    log = next((own_style / "results/shared/logs/encode_texts").glob("*.log")).read_text(encoding="utf-8")
    assert "holds 1 image(s) after filtering" in log and "train.batch_size 4" in log, log[-2000:]
    assert "prompt embeddings" not in log  # nothing encoded: ChatGLM never loaded
