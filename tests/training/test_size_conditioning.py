"""Kolors' size conditioning reaches the UNet exact in every training precision: with bf16 weights
the time ids go in as fp32 (bf16 holds 1489 as 1488, a crop at 341 as 340), as the pipeline's
sizes do, and the UNet's sinusoidal projection takes them as they are."""

from __future__ import annotations

import torch
from diffusers import DDPMScheduler
from kolors_fixtures import write_training_folder

from kolors_story.models.kolors_folder import KolorsFolder
from kolors_story.training.data import assign_sizes, read_metadata, size_conditioning
from kolors_story.training.loop import TrainState, accumulate_gradients, prepare_batches
from kolors_story.training.processes import Processes
from kolors_story.training.settings import TrainSettings

CPU = torch.device("cpu")


def test_bf16_training_gives_the_unet_exact_sizes(tiny_kolors, tmp_path):
    # 32 px wide, 1489 high: covering a 32 px square keeps 1489 rows; a random crop anywhere in them
    data = write_training_folder(tmp_path / "data", [(32, 1489)], ["二次元"])
    folder = KolorsFolder(tiny_kolors)
    settings = TrainSettings(steps=1, resolution=32, precision="bf16", rank=4, crop="random", seed=3)
    examples = read_metadata(data)
    assign_sizes(examples, settings)
    scheduler = folder.load_scheduler(DDPMScheduler)
    run = TrainState.create(folder, settings, examples, torch.bfloat16, CPU)
    batches = prepare_batches(folder, examples, settings, tmp_path / "cache", CPU, torch.bfloat16,
                              scheduler.config.num_train_timesteps, validating=False)
    drawn, seen = [], []
    draw = batches.draw
    batches.draw = lambda order, gen: drawn.append(draw(order, gen)) or drawn[-1]
    run.unet.add_time_proj.register_forward_hook(lambda module, args, out: seen.append(args[0].clone()))

    accumulate_gradients(run, batches, Processes(0, 1, CPU), scheduler, torch.bfloat16)

    assert run.unet.dtype == torch.bfloat16 and len(seen) == 1
    want = torch.tensor(size_conditioning(examples[0], drawn[0].origins[0]), dtype=torch.float32)
    assert want[0] == 1489
    assert seen[0].tolist() == want.tolist()  # bf16 ids: 1488 and the crop top rounded
    assert seen[0].dtype == torch.float32
