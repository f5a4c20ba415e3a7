"""generate.compile on the CPU: the tiny Kolors' UNet through torch.compile (scenes.compile_unet) renders
the eager panels, after the LoRA and the attention processors are in, without a compile per step.

Backend aot_eager (TorchDynamo + AOTAutograd, stock kernels: seconds to compile) unless a test says
otherwise; one test compiles with inductor (C++ kernels on the CPU, about a minute on 2 cores).
Tolerance: a panel is the eager one within 1/255 per pixel, one uint8 rounding step (inductor's
fused kernels move float pixels by ~1e-6; aot_eager has been bitwise so far).
"""

from __future__ import annotations

import gc
import weakref
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image
from torch._dynamo.utils import counters

from kolors_story.models.random_aesthetic import build_tiny_aesthetic_predictor
from kolors_story.render import panel_choice, scenes
from kolors_story.render.candidates_file import read_record
from kolors_story.render.scenes import (
    Consistency, RenderInputs, SamplerSettings, Scene, candidate_seeds, load_pipeline, load_style_lora, render,
    render_anchor, render_scene, warm_up,
)
from kolors_story.training import TrainJob, TrainSettings, train_lora

CPU = torch.device("cpu")
TOLERANCE = 1  # uint8 levels per pixel
COMPILED = SamplerSettings(steps=2, candidates=2, compile=True, compile_backend="aot_eager")
SCENE = Scene("s1", "水墨画，少女，读书", "丑陋", seed=7, width=32, height=32)


@pytest.fixture(scope="module")
def lora(tiny_kolors, training_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora")
    return train_lora(TrainJob(tiny_kolors, training_folder, out),
                      TrainSettings(steps=1, resolution=32, precision="fp32", rank=2, alpha=2)).lora_file


@pytest.fixture(scope="module")
def aesthetic(tmp_path_factory):
    return build_tiny_aesthetic_predictor(tmp_path_factory.mktemp("aesthetic") / "predictor")


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test counts its own compiles (dynamo's caches and counters are per process)."""
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def graphs() -> int:
    """Graphs TorchDynamo has compiled since the last counters.clear(): one per compile or recompile."""
    return counters["stats"]["unique_graphs"]


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path)).astype(int)


def assert_close(a, b) -> None:
    assert a.shape == b.shape and np.abs(a - b).max() <= TOLERANCE


def test_a_compiled_scene_renders_the_eager_panel(tiny_kolors, lora, aesthetic, tmp_path):
    """Best-of-2, LoRA fused: compiled on the CPU (it was CUDA-only, and compiled before the LoRA went
    in), the candidates and the choice are the eager ones."""
    inputs = RenderInputs(tiny_kolors, lora, aesthetic_dir=aesthetic)
    eager = render_scene(inputs, SCENE, replace(COMPILED, compile=False), tmp_path / "eager.png",
                         candidates_dir=tmp_path / "eager", device=CPU)
    assert graphs() == 0
    compiled = render_scene(inputs, SCENE, COMPILED, tmp_path / "compiled.png", candidates_dir=tmp_path / "compiled",
                            device=CPU)
    assert graphs() == 1  # the warm-up's graph serves both candidates, batched, every step
    assert compiled.chosen == eager.chosen and compiled.lora_fused
    assert_close(pixels(tmp_path / "compiled.png"), pixels(tmp_path / "eager.png"))
    for name in eager.files:
        assert_close(pixels(tmp_path / "compiled" / name), pixels(tmp_path / "eager" / name))
    assert read_record(tmp_path / "compiled") == compiled


def test_inductor_on_the_cpu_renders_the_eager_panel(tiny_kolors, lora, tmp_path):
    """generate.compile_backend's default: real code generation (C++ on the CPU)."""
    settings = replace(COMPILED, candidates=1, compile_backend="inductor")
    render_scene(RenderInputs(tiny_kolors, lora), SCENE, replace(settings, compile=False), tmp_path / "eager.png",
                 device=CPU)
    render_scene(RenderInputs(tiny_kolors, lora), SCENE, settings, tmp_path / "inductor.png", device=CPU)
    assert counters["inductor"] and graphs() == 1
    assert_close(pixels(tmp_path / "inductor.png"), pixels(tmp_path / "eager.png"))


def test_a_lora_scale_sweep_switches_scales_on_the_compiled_unet(tiny_kolors, lora, aesthetic, tmp_path):
    """Unfused: set_adapters changes the scale between candidates. On a UNet wrapped by torch.compile
    diffusers skips it and says the adapter is absent; compiled in place it finds it."""
    settings = replace(COMPILED, lora_scale=(0.0, 1.0))
    inputs = RenderInputs(tiny_kolors, lora, aesthetic_dir=aesthetic)
    runs = {name: render_scene(inputs, SCENE, replace(settings, compile=name == "compiled"), tmp_path / f"{name}.png",
                               candidates_dir=tmp_path / name, device=CPU) for name in ("eager", "compiled")}
    assert [c.lora_scale for c in runs["compiled"].candidates] == [0.0, 0.0, 1.0, 1.0]
    assert not runs["compiled"].lora_fused and runs["compiled"].chosen == runs["eager"].chosen
    for name in runs["eager"].files:
        assert_close(pixels(tmp_path / "compiled" / name), pixels(tmp_path / "eager" / name))
    assert np.abs(pixels(tmp_path / "compiled/0.png") - pixels(tmp_path / "compiled/2.png")).max() > 0


def test_the_warm_up_compiles_the_graph_the_candidates_use(tiny_kolors, lora):
    """The warm-up is the first step of the first candidate batch (CFG: 2N rows): rendering the
    candidates after it compiles nothing more."""
    pipe = load_pipeline(tiny_kolors, COMPILED, CPU)
    load_style_lora(pipe, lora, 1.0, fuse=True)
    embeds = pipe.encode_prompt(prompt=SCENE.prompt, device=CPU, negative_prompt=SCENE.negative_prompt)
    embeds = dict(zip(("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds",
                       "negative_pooled_prompt_embeds"), embeds))
    seeds = candidate_seeds(SCENE.seed, COMPILED.candidates)
    warm_up(pipe, SCENE, COMPILED, embeds, seeds)
    assert graphs() == 1
    render(pipe, SCENE, COMPILED, seeds, embeds)
    assert graphs() == 1


def test_compile_comes_after_the_lora_and_the_attention_processors(tiny_kolors, lora, tmp_path, monkeypatch):
    """The recorded call order of a scene job with an anchor: the UNet is compiled last."""
    anchor = render_anchor(RenderInputs(tiny_kolors, lora), Scene("girl", "水墨画，少女", seed=0, width=32, height=32),
                           replace(COMPILED, compile=False), Consistency(max_tokens=16), tmp_path / "girl.safetensors",
                           device=CPU)
    calls = []
    for name in ("load_style_lora", "share_anchors", "compile_unet"):
        original = getattr(scenes, name)
        monkeypatch.setattr(scenes, name, lambda *a, _f=original, _n=name, **k: calls.append(_n) or _f(*a, **k))
    render_scene(RenderInputs(tiny_kolors, lora), SCENE, replace(COMPILED, candidates=1), tmp_path / "s1.png",
                 device=CPU, anchors=[anchor], consistency=Consistency(max_tokens=16))
    assert calls == ["load_style_lora", "share_anchors", "compile_unet"]


def anchor_and_scene(tiny_kolors, lora, tmp_path, settings: SamplerSettings, consistency: Consistency,
                     aesthetic=None) -> tuple[int, int]:
    """Graphs compiled by an anchor job, then by a scene job that shares attention with it."""
    torch._dynamo.reset()  # an earlier call's graphs would serve this one (the same shapes)
    counters.clear()
    girl = Scene("girl", "水墨画，少女", "丑陋", seed=0, width=32, height=32)
    anchor = render_anchor(RenderInputs(tiny_kolors, lora), girl, settings, consistency,
                           tmp_path / "anchors/girl.safetensors", device=CPU)
    anchor_graphs = graphs()
    render_scene(RenderInputs(tiny_kolors, lora, aesthetic_dir=aesthetic), SCENE, settings, tmp_path / "s1.png",
                 candidates_dir=tmp_path / "s1", device=CPU, anchors=[anchor], consistency=consistency)
    return anchor_graphs, graphs() - anchor_graphs


def test_an_anchor_and_a_consistency_scene_compile_without_a_compile_per_step(tiny_kolors, lora, tmp_path):
    """dpmpp_2m (its 1-step warm-up used to run at a timestep the anchor never recorded): the anchor
    job compiles once and the scene twice (sharing on, then off after steps_fraction), at 3 steps as
    at 6; both are the eager ones within the tolerance, and the anchor's features too."""
    consistency = Consistency(steps_fraction=0.6, max_tokens=16)
    counts = {}
    for steps in (3, 6):
        settings = replace(COMPILED, sampler="dpmpp_2m", steps=steps, candidates=1)
        counts[steps] = anchor_and_scene(tiny_kolors, lora, tmp_path / f"compiled{steps}", settings, consistency)
    assert counts[3] == counts[6] == (1, 2)
    anchor_and_scene(tiny_kolors, lora, tmp_path / "eager6", replace(settings, compile=False), consistency)
    assert_close(pixels(tmp_path / "compiled6/s1.png"), pixels(tmp_path / "eager6/s1.png"))
    assert_close(pixels(tmp_path / "compiled6/anchors/girl.png"), pixels(tmp_path / "eager6/anchors/girl.png"))
    from safetensors.torch import load_file

    compiled, eager = (load_file(tmp_path / f"{d}/anchors/girl.safetensors") for d in ("compiled6", "eager6"))
    assert compiled.keys() == eager.keys() and all(torch.allclose(compiled[k], eager[k], atol=1e-3) for k in eager)


def test_the_compiled_unet_is_freed_before_the_predictor_loads(tiny_kolors, lora, aesthetic, tmp_path, monkeypatch):
    """render_scene's `del pipe`, with sharing's step hook installed and the UNet compiled: nothing
    refers to the UNet any more when the candidates are scored (garbage collection off)."""
    unets = []
    original_share, original_score = scenes.share_anchors, panel_choice.score_candidates

    def share(pipe, *args, **kwargs):
        unets.append(weakref.ref(pipe.unet))
        return original_share(pipe, *args, **kwargs)

    def score(*args, **kwargs):
        assert unets and unets[0]() is None, "the UNet is still alive while the predictor loads"
        return original_score(*args, **kwargs)

    monkeypatch.setattr(scenes, "share_anchors", share)
    monkeypatch.setattr(panel_choice, "score_candidates", score)
    consistency = Consistency(max_tokens=16)
    gc.disable()
    try:
        anchor_and_scene(tiny_kolors, lora, tmp_path, COMPILED, consistency, aesthetic)
    finally:
        gc.enable()
    assert len(unets) == 1
