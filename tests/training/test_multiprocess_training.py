"""Data-parallel training under `accelerate launch`: 2 CPU processes (gloo) on the tiny Kolors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kolors_story.errors import UserError
from kolors_story.training import TrainJob, TrainSettings, train_lora
from kolors_story.training import checkpoints as ckpt
from kolors_story.host.training_launch import accelerate_command, check_process_count, train

BASE = dict(steps=3, resolution=32, precision="fp32", rank=4, alpha=4, learning_rate=5e-3,
            random_flip=True, checkpoint_every=2, seed=3)


@pytest.fixture(scope="module")
def two_processes(tiny_kolors, training_folder, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("two")
    result = train(TrainJob(tiny_kolors, training_folder, tmp / "out", cache_dir=tmp / "cache", work_dir=tmp / "work"),
                   TrainSettings(**BASE), processes=2, threads=2)
    return result, tmp


def test_two_processes_train_like_one_process_with_twice_the_accumulation(two_processes, tiny_kolors,
                                                                         training_folder, tmp_path):
    """Each process takes its share of the same draws, so 2 processes x accumulation 1 follow one
    process x accumulation 2: the same LoRA up to float summation order."""
    result, _ = two_processes
    one = train_lora(TrainJob(tiny_kolors, training_folder, tmp_path / "one", cache_dir=tmp_path / "cache"),
                     TrainSettings(**{**BASE, "gradient_accumulation": 2}))
    two_lora, one_lora = load_file(result.lora_file), load_file(one.lora_file)
    assert two_lora.keys() == one_lora.keys()
    for key in one_lora:
        torch.testing.assert_close(two_lora[key], one_lora[key], rtol=1e-4, atol=1e-6)
    assert [r["loss"] for r in result.losses] == pytest.approx([r["loss"] for r in one.losses], rel=1e-5)


def test_the_second_process_trains_on_other_batches(two_processes, tiny_kolors, training_folder, tmp_path):
    """Had both processes used the same micro-batch, the run would equal a single process's run."""
    result, _ = two_processes
    alone = train_lora(TrainJob(tiny_kolors, training_folder, tmp_path / "alone", cache_dir=tmp_path / "cache"),
                       TrainSettings(**BASE))
    two_lora, alone_lora = load_file(result.lora_file), load_file(alone.lora_file)
    assert any(not torch.allclose(two_lora[k], alone_lora[k]) for k in alone_lora)


def test_rank_zero_writes_checkpoints_and_the_result(two_processes):
    result, tmp = two_processes
    (run,) = (tmp / "work").iterdir()
    assert [p.name for p in ckpt.list_checkpoints(run, resumable=False)] == ["step-000002", "step-000003"]
    assert result.lora_file == tmp / "out" / "pytorch_lora_weights.safetensors"
    assert [r["step"] for r in result.losses] == [1, 2, 3] and result.picked_step == 3


def test_more_processes_than_gpus_is_refused_and_cpu_hosts_may_use_several():
    with pytest.raises(UserError, match="train.processes is 4 but this host shows 2 GPU"):
        check_process_count(4, 2)
    check_process_count(2, 2)
    check_process_count(2, 0)  # no GPU: processes share the CPU over gloo


def test_a_failing_launch_is_a_clear_error(training_folder, tmp_path):
    with pytest.raises(UserError, match="2 training processes failed"):
        train(TrainJob(tmp_path / "no-model", training_folder, tmp_path / "out"),
              TrainSettings(**BASE), processes=2, threads=2)


def test_killed_two_process_training_resumes_to_bitwise_the_uninterrupted_lora(tiny_kolors, training_folder, tmp_path):
    settings = TrainSettings(**{**BASE, "steps": 30, "checkpoint_every": 5})
    out = tmp_path / "interrupted"
    args = ["--model", str(tiny_kolors), "--dataset", str(training_folder), "--out", str(out),
            "--settings", json.dumps(settings.to_dict()), "--cache-dir", str(tmp_path / "cache")]
    # Its own session, so one killpg takes the launcher and both training processes at once.
    proc = subprocess.Popen(accelerate_command(2, 1, args, tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    deadline = time.monotonic() + 240
    while not ckpt.list_checkpoints(next(iter((out / "work").glob("*")), out / "none")):
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher; torchrun put each rank in its own session
    proc.communicate()
    while processes_mentioning(str(out)):  # the ranks die with their launcher (PR_SET_PDEATHSIG)
        assert time.monotonic() < deadline, "training ranks outlived their killed launcher"
        time.sleep(0.05)
    assert not (out / "pytorch_lora_weights.safetensors").exists(), "finished before the kill"

    resumed = train(TrainJob(tiny_kolors, training_folder, out, cache_dir=tmp_path / "cache"),
                    settings, processes=2, threads=2)
    assert 0 < resumed.resumed_from < 30
    straight = train(TrainJob(tiny_kolors, training_folder, tmp_path / "straight", cache_dir=tmp_path / "cache"),
                     settings, processes=2, threads=2)
    first, second = load_file(resumed.lora_file), load_file(straight.lora_file)
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    assert [r["loss"] for r in resumed.losses] == [r["loss"] for r in straight.losses]


def processes_mentioning(text: str) -> list[int]:
    """Pids of live processes whose command line contains `text` (Linux /proc)."""
    pids = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            if text.encode() in (entry / "cmdline").read_bytes():
                pids.append(int(entry.name))
        except OSError:  # exited meanwhile
            pass
    return pids
