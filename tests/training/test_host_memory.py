"""What a training process holds in host memory: its UNet goes straight to its device (a node of 8
processes held 8 host copies, ~42 GB, before)."""

from __future__ import annotations

import torch

from kolors_story.models.kolors_folder import KolorsFolder
from kolors_story.training.data import assign_sizes, read_metadata
from kolors_story.training.loop import TrainState
from kolors_story.training.settings import TrainSettings


def test_a_training_process_loads_its_unet_onto_its_own_device(tiny_kolors, training_folder, monkeypatch):
    """TrainState.create asks the folder for the UNet on the process's device and moves nothing
    afterwards (a CPU-loaded UNet moved with .to() is the host copy this avoids)."""
    calls: list[tuple] = []
    load = KolorsFolder.load_unet

    def recording(self, dtype, device=None):
        calls.append(("load_unet", dtype, device))
        unet = load(self, dtype)  # the tiny UNet, on the CPU: the call is what is checked
        move = unet.to
        unet.to = lambda *args, **kwargs: calls.append(("to", *args)) or move(*args, **kwargs)
        return unet

    monkeypatch.setattr(KolorsFolder, "load_unet", recording)
    settings = TrainSettings(steps=1, resolution=32, precision="fp32", rank=4)
    examples = read_metadata(training_folder)
    assign_sizes(examples, settings)
    device = torch.device("cpu")
    TrainState.create(KolorsFolder(tiny_kolors), settings, examples, torch.float32, device)
    assert calls == [("load_unet", torch.float32, device)]
