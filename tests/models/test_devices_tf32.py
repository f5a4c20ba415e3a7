"""TF32 through torch's fp32_precision settings, on CUDA only, for scene jobs and for training."""

from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from kolors_story.models import devices

# In a child process: these are process-wide settings, and the legacy getters raise once they are set.
CHECK = """
import torch
from kolors_story.models.devices import enable_tf32
matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
before = matmul.fp32_precision, conv.fp32_precision
enable_tf32(torch.device("cpu"))
assert (matmul.fp32_precision, conv.fp32_precision) == before, "TF32 changed on a CPU"
enable_tf32(torch.device("cuda", 1))  # a device object: no GPU needed to set the flags
assert (matmul.fp32_precision, conv.fp32_precision) == ("tf32", "tf32")
print("ok")
"""


def test_tf32_is_set_through_fp32_precision_for_cuda_and_left_alone_on_a_cpu():
    done = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


@pytest.fixture
def tf32_calls(monkeypatch) -> list[torch.device]:
    calls: list[torch.device] = []
    monkeypatch.setattr(devices, "enable_tf32", lambda device: calls.append(torch.device(device)))
    return calls


def test_a_scene_job_enables_tf32_on_its_gpu(tf32_calls):
    from kolors_story.render.scenes import SamplerSettings, move_to_device

    moved = SimpleNamespace(to=lambda *a, **k: None)
    pipe = SimpleNamespace(to=lambda device: None, unet=moved, vae=moved)
    move_to_device(pipe, torch.device("cpu"), SamplerSettings())
    move_to_device(pipe, torch.device("cuda"), SamplerSettings())
    assert tf32_calls == [torch.device("cuda")]


class _Stop(Exception):
    pass


def test_training_enables_tf32_on_its_device_before_loading_anything(tf32_calls, monkeypatch, tmp_path):
    from kolors_story.training.loop import train_lora
    from kolors_story.training.settings import TrainJob, TrainSettings

    def stop(device: torch.device) -> None:
        tf32_calls.append(torch.device(device))
        raise _Stop  # the rest of the training is not this test's business

    monkeypatch.setattr(devices, "enable_tf32", stop)
    with pytest.raises(_Stop):
        train_lora(TrainJob(tmp_path, tmp_path, tmp_path / "out"), TrainSettings(steps=1), torch.device("cuda"))
    assert tf32_calls == [torch.device("cuda")]
