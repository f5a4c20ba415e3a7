"""Resume anywhere and multi-GPU on a shared host: checkpoints load whatever device wrote them, the
fp16 loss scaler resumes where it was, and ranks wait for rank 0's caches as long as it takes (the
GPUs a multi-process training holds while its ranks run: tests/host/test_gpu_slots.py)."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import textwrap
import time
import zipfile
from datetime import timedelta
from pathlib import Path

import pytest
import torch

from kolors_story.training import checkpoints as ckpt
from kolors_story.training.processes import DEFAULT_BARRIER_TIMEOUT, barrier_timeout


def _relocate(state_file: Path, device: str) -> None:
    """Rewrite a torch.save file as if its tensors had been saved on `device` (e.g. cuda:1): the
    storage locations in data.pkl are what torch.load restores onto."""
    with zipfile.ZipFile(state_file) as old:
        entries = [(info, old.read(info)) for info in old.infolist()]
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as new:
        for info, data in entries:
            if info.filename.endswith("data.pkl"):
                tag = device.encode()
                data = data.replace(b"X\x03\x00\x00\x00cpu", b"X" + len(tag).to_bytes(4, "little") + tag)
            new.writestr(info, data)
    state_file.write_bytes(buffer.getvalue())


def test_a_checkpoint_written_on_another_gpu_loads_on_the_cpu(tmp_path):
    state = {"step": 4, "optimizer": {"state": {0: {"exp_avg": torch.ones(3)}}, "param_groups": []}}
    path = ckpt.save_checkpoint(tmp_path, 4, {"w": torch.zeros(2)}, state)
    _relocate(path / ckpt.STATE_FILE, "cuda:1")
    if not torch.cuda.is_available():  # the rewrite took: a plain load would go to cuda:1
        with pytest.raises(RuntimeError, match="CUDA"):
            torch.load(path / ckpt.STATE_FILE, weights_only=True)
    lora, loaded = ckpt.load_checkpoint(path)
    assert loaded["optimizer"]["state"][0]["exp_avg"].device.type == "cpu"
    assert torch.equal(loaded["optimizer"]["state"][0]["exp_avg"], torch.ones(3)) and loaded["step"] == 4


def _scaler_after_steps(scaler: torch.amp.GradScaler, overflow_steps: list[bool]) -> None:
    param = torch.nn.Parameter(torch.ones(2))
    optimizer = torch.optim.SGD([param], lr=0.1)
    for overflow in overflow_steps:
        optimizer.zero_grad()
        scaler.scale((param * (float("inf") if overflow else 1.0)).sum()).backward()
        scaler.step(optimizer)
        scaler.update()


def test_the_fp16_loss_scaler_resumes_where_it_was(tiny_kolors, tmp_path):
    """A CPU GradScaler with scaling on, through TrainState's own checkpoint state and resume."""
    from kolors_story.models.kolors_folder import KolorsFolder
    from kolors_story.training.loop import TrainState
    from kolors_story.training.lora_adapter import lora_state
    from kolors_story.training.settings import TrainSettings

    settings = TrainSettings(steps=2, resolution=32, precision="fp32", rank=4)
    folder, cpu = KolorsFolder(tiny_kolors), torch.device("cpu")
    run = TrainState.create(folder, settings, [], torch.float32, cpu)
    run.scaler = torch.amp.GradScaler("cpu", enabled=True, init_scale=2.0**12, growth_interval=2)
    _scaler_after_steps(run.scaler, [True, False, False, True, False])  # backoffs and a growth
    ckpt.save_checkpoint(tmp_path, 5, lora_state(run.unet), run.state_dict(5))
    resumed = TrainState.create(folder, settings, [], torch.float32, cpu)
    resumed.scaler = torch.amp.GradScaler("cpu", enabled=True, init_scale=2.0**12, growth_interval=2)
    assert resumed.resume(tmp_path) == 5
    assert resumed.scaler.state_dict() == run.scaler.state_dict()
    assert resumed.scaler.get_scale() != 2.0**12  # the state moved away from its start
    for scaler in (run.scaler, resumed.scaler):  # and both go on alike
        _scaler_after_steps(scaler, [False, False, True])
    assert resumed.scaler.state_dict() == run.scaler.state_dict()


RANK = textwrap.dedent("""
    import sys, time
    import torch
    from kolors_story.training.processes import Processes
    procs = Processes.start()
    if procs.rank == 0:
        time.sleep(float(sys.argv[1]))  # rank 0 filling the caches
    try:
        procs.barrier()
    except Exception as err:
        print(f"rank {procs.rank}: barrier failed: {type(err).__name__}", flush=True)
        sys.exit(3)
    print(f"rank {procs.rank}: through", flush=True)
""")


def _two_ranks(rank0_delay: float, timeout_s: str | None) -> list[subprocess.CompletedProcess]:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    env.pop("KOLORS_STORY_BARRIER_TIMEOUT_S", None)
    if timeout_s is not None:
        env["KOLORS_STORY_BARRIER_TIMEOUT_S"] = timeout_s
    procs = [subprocess.Popen([sys.executable, "-c", RANK, str(rank0_delay)], text=True, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)})
             for r in (0, 1)]
    return [subprocess.CompletedProcess(p.args, p.wait(timeout=120), p.stdout.read(), "") for p in procs]


def test_ranks_wait_for_rank_0_with_the_configured_timeout():
    """The timeout reaches the process group: 2 s is too short for a rank 0 that takes 6 s."""
    started = time.monotonic()
    rank0, rank1 = _two_ranks(6.0, "2")
    assert rank1.returncode == 3 and "barrier failed" in rank1.stdout, rank1.stdout[-2000:]
    assert time.monotonic() - started < 60


def test_the_default_timeout_outlasts_filling_the_caches():
    assert DEFAULT_BARRIER_TIMEOUT >= timedelta(hours=1) > timedelta(minutes=10)  # torch's default
    assert barrier_timeout() == DEFAULT_BARRIER_TIMEOUT or "KOLORS_STORY_BARRIER_TIMEOUT_S" in os.environ
    rank0, rank1 = _two_ranks(1.0, None)
    assert rank0.returncode == rank1.returncode == 0, rank0.stdout[-2000:] + rank1.stdout[-2000:]


def test_a_run_resumes_on_the_cpu_from_a_checkpoint_its_gpu_run_wrote(tiny_kolors, tmp_path):
    """The whole resume path, not just the file: AdamW moments written on cuda:1 go on on the CPU."""
    from kolors_story.models.kolors_folder import KolorsFolder
    from kolors_story.training.loop import TrainState
    from kolors_story.training.lora_adapter import lora_state
    from kolors_story.training.settings import TrainSettings

    settings = TrainSettings(steps=2, resolution=32, precision="fp32", rank=4)
    folder, cpu = KolorsFolder(tiny_kolors), torch.device("cpu")
    run = TrainState.create(folder, settings, [], torch.float32, cpu)
    for p in run.params:
        p.grad = torch.full_like(p, 0.5)
    run.optimizer_step()
    path = ckpt.save_checkpoint(tmp_path, 1, lora_state(run.unet), run.state_dict(1))
    _relocate(path / ckpt.STATE_FILE, "cuda:1")
    resumed = TrainState.create(folder, settings, [], torch.float32, cpu)
    assert resumed.resume(tmp_path) == 1
    for p, q in zip(run.params, resumed.params):
        before, after = run.optimizer.state[p], resumed.optimizer.state[q]
        assert after["exp_avg"].device == q.device and torch.equal(after["exp_avg"], before["exp_avg"])
        assert torch.equal(p, q)


@pytest.mark.parametrize("value", ["ten", "0", "-5", "nan", "inf"])
def test_a_bad_barrier_timeout_is_refused_with_the_variable_named(monkeypatch, value):
    from kolors_story.errors import UserError

    monkeypatch.setenv("KOLORS_STORY_BARRIER_TIMEOUT_S", value)
    with pytest.raises(UserError, match="KOLORS_STORY_BARRIER_TIMEOUT_S"):
        barrier_timeout()
    monkeypatch.setenv("KOLORS_STORY_BARRIER_TIMEOUT_S", "90")
    assert barrier_timeout() == timedelta(seconds=90)
