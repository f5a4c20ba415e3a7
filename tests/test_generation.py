"""Scene rendering: samplers, seeds and sizes on the tiny Kolors through stock KolorsPipeline."""

import numpy as np
import pytest
import torch

from kolors_story.generation import SamplerSettings, Scene, load_pipeline, make_scheduler, render, render_scene
from kolors_story.tiny_kolors import KOLORS_SCHEDULER


@pytest.fixture(scope="module")
def pipe(tiny_kolors):
    return load_pipeline(tiny_kolors, SamplerSettings(steps=3), torch.device("cpu"))


def test_same_seed_same_image_other_seed_other_image(pipe):
    settings = SamplerSettings(steps=3)
    scene = Scene("a", "古风，水墨画", "丑陋", seed=5, width=32, height=48)
    first, again = np.asarray(render(pipe, scene, settings)), np.asarray(render(pipe, scene, settings))
    assert first.shape == (48, 32, 3)
    assert np.array_equal(first, again)
    other = np.asarray(render(pipe, Scene("a", scene.prompt, scene.negative_prompt, 6, 32, 48), settings))
    assert not np.array_equal(first, other)


@pytest.mark.parametrize("name, cls", [("euler", "EulerDiscreteScheduler"), ("ddim", "DDIMScheduler"),
                                       ("dpmpp_2m", "DPMSolverMultistepScheduler")])
def test_samplers_keep_kolors_betas(name, cls):
    scheduler = make_scheduler(name, KOLORS_SCHEDULER)
    assert type(scheduler).__name__ == cls
    assert scheduler.config.num_train_timesteps == 1100 and scheduler.config.beta_end == 0.014


def test_unknown_sampler_is_refused():
    with pytest.raises(ValueError, match="unknown sampler"):
        make_scheduler("plms", KOLORS_SCHEDULER)


def test_render_scene_writes_the_panel(tiny_kolors, training_folder, tmp_path):
    from kolors_story.training import TrainSettings, train_lora

    lora = train_lora(tiny_kolors, training_folder, tmp_path / "lora",
                      TrainSettings(steps=1, resolution=32, precision="fp32", rank=2, alpha=2)).lora_file
    out = render_scene(tiny_kolors, lora, Scene("s1", "水墨画", seed=1, width=32, height=32),
                       SamplerSettings(sampler="ddim", steps=2, lora_scale=0.5), tmp_path / "scenes" / "s1.png")
    assert out.read_bytes()[:4] == b"\x89PNG"
