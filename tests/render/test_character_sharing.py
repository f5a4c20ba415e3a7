"""Anchor-mode character consistency (kolors_story.render.character_sharing) on the tiny Kolors, CPU."""

import math

import numpy as np
import pytest
import torch

from kolors_story.render import character_sharing as C
from kolors_story.render.scenes import SamplerSettings, Scene, candidate_seeds, load_pipeline, render

CPU = torch.device("cpu")
STEPS = 4
SETTINGS = SamplerSettings(steps=STEPS)
ANCHOR = Scene("anchor", "二次元，少女，红发", "丑陋", seed=7, width=32, height=32)
SCENE = Scene("s1", "二次元，少女，森林", "丑陋", seed=3, width=32, height=48)  # other size than the anchor
LAYERS = ["up_blocks.0.attentions.0.transformer_blocks.0.attn1", "up_blocks.0.attentions.1.transformer_blocks.0.attn1"]


def _embeds(pipe, scene: Scene) -> dict:
    e, n, p, np_ = pipe.encode_prompt(prompt=scene.prompt, device=CPU, negative_prompt=scene.negative_prompt)
    return {"prompt_embeds": e, "negative_prompt_embeds": n, "pooled_prompt_embeds": p,
            "negative_pooled_prompt_embeds": np_}


@pytest.fixture(scope="module")
def pipe(tiny_kolors):
    pipe = load_pipeline(tiny_kolors, SETTINGS, CPU)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def embeds(pipe):
    return {"anchor": _embeds(pipe, ANCHOR), "scene": _embeds(pipe, SCENE),
            "other": _embeds(pipe, Scene("b", "二次元，男孩，蓝发", "丑陋"))}


@pytest.fixture(scope="module")
def anchor(pipe, embeds):
    image, features, meta = C.record_anchor(pipe, embeds["anchor"], ANCHOR.seed, ANCHOR.width, ANCHOR.height,
                                            STEPS, SETTINGS.guidance_scale, max_tokens=16, steps_fraction=1.0)
    return image, C.Anchor(features, meta)


@pytest.fixture(autouse=True)
def _restore(pipe):
    yield
    C.disable(pipe)


def _np(pipe, embeds: dict, scene: Scene = SCENE, seeds: list[int] | None = None) -> np.ndarray:
    """Float images (more sensitive than uint8) with render()'s arguments; batched for several seeds."""
    seeds = seeds or [scene.seed]
    batch = {k: v.repeat_interleave(len(seeds), dim=0) for k, v in embeds.items()}
    return pipe(width=scene.width, height=scene.height, num_inference_steps=STEPS, output_type="np",
                guidance_scale=SETTINGS.guidance_scale, generator=[torch.Generator("cpu").manual_seed(s) for s in seeds],
                **batch).images


def test_layer_selection_and_recorded_shapes(pipe, anchor):
    assert C.select_layers(pipe.unet) == LAYERS  # tiny UNet: up_blocks.0 has 2 transformer blocks, up_blocks.1 none
    assert C.select_layers(pipe.unet, ["*attentions.1*attn1"]) == LAYERS[1:]
    with pytest.raises(ValueError, match="attn1"):
        C.select_layers(pipe.unet, ["up_blocks.*attn2"])
    _, a = anchor
    assert a.meta["layers"] == LAYERS and a.meta["steps"] == STEPS and a.meta["recorded_steps"] == STEPS
    assert len(a.meta["timesteps"]) == STEPS and (a.meta["width"], a.meta["height"]) == (32, 32)
    assert set(a.features) == {f"step{i}.{n}" for i in range(STEPS) for n in LAYERS}
    channels = pipe.unet.up_blocks[0].attentions[0].transformer_blocks[0].attn1.to_k.in_features
    for t in a.features.values():  # 32 px -> 16x16 latent -> 8x8 tokens at up_blocks.0 -> 2-D stride 2 -> 16
        assert t.shape == (16, channels) and t.dtype == torch.float16


def test_token_subsampling_is_a_fixed_grid_stride():
    assert torch.equal(C.token_index(64, (16, 16), 16), torch.arange(64).view(8, 8)[::2, ::2].flatten())
    assert torch.equal(C.token_index(64, (16, 16), 64), torch.arange(64))
    assert torch.equal(C.token_index(4096, (128, 128), 1024), torch.arange(4096).view(64, 64)[::2, ::2].flatten())
    assert len(C.token_index(24 * 32, (96, 128), 100)) <= 100  # non-square grid
    assert len(C.token_index(1000, (7, 7), 100)) == 100  # grid unknown: 1-D stride


def test_recording_keeps_the_plain_anchor_image(pipe, embeds, anchor):
    image, _ = anchor
    plain = render(pipe, ANCHOR, SETTINGS, embeds=embeds["anchor"])[0]
    assert np.array_equal(np.asarray(image), np.asarray(plain))
    assert type(pipe.unet.attn_processors[f"{LAYERS[0]}.processor"]).__name__ == "AttnProcessor2_0"  # restored


def test_anchor_file_round_trips(anchor, tmp_path):
    image, a = anchor
    path = C.save_anchor(tmp_path / "anchors" / "hero.safetensors", a.features, a.meta, image)
    assert path.with_suffix(".png").is_file()
    loaded = C.load_anchor(path)
    assert loaded.meta == a.meta
    assert loaded.features.keys() == a.features.keys()
    assert all(torch.equal(loaded.features[k], v) for k, v in a.features.items())


def test_sharing_changes_the_scene_deterministically_and_disable_restores(pipe, embeds, anchor):
    _, a = anchor
    originals = dict(pipe.unet.attn_processors)
    base = _np(pipe, embeds["scene"])
    C.enable_sharing(pipe, [a], strength=1.0, steps_fraction=0.6)
    shared, again = _np(pipe, embeds["scene"]), _np(pipe, embeds["scene"])
    assert np.abs(shared - base).max() > 1e-4
    assert np.array_equal(shared, again)
    rendered = [render(pipe, SCENE, SETTINGS, embeds=embeds["scene"])[0] for _ in range(2)]  # via render(), PIL
    assert np.array_equal(np.asarray(rendered[0]), np.asarray(rendered[1]))
    C.disable(pipe)
    assert pipe.unet.attn_processors == originals
    assert np.array_equal(_np(pipe, embeds["scene"]), base)


@pytest.mark.parametrize("strength, fraction", [(0.0, 0.6), (1.0, 0.0)])
def test_off_settings_give_the_plain_image_bitwise(pipe, embeds, anchor, strength, fraction):
    _, a = anchor
    base = _np(pipe, embeds["scene"])
    C.enable_sharing(pipe, [a], strength=strength, steps_fraction=fraction)
    assert np.array_equal(_np(pipe, embeds["scene"]), base)


def test_strength_fraction_branches_and_two_anchors_all_matter(pipe, embeds, anchor):
    _, a = anchor
    _, feats, meta = C.record_anchor(pipe, embeds["other"], 11, 32, 32, STEPS, SETTINGS.guidance_scale,
                                     max_tokens=8, steps_fraction=1.0)
    b = C.Anchor(feats, meta)
    outs = {}
    for key, kwargs in {"s1": dict(anchors=[a]), "s4": dict(anchors=[a], strength=4.0),
                        "f1": dict(anchors=[a], steps_fraction=1.0), "cond": dict(anchors=[a], branches="cond"),
                        "ab": dict(anchors=[a, b])}.items():
        C.enable_sharing(pipe, **kwargs)
        outs[key] = _np(pipe, embeds["scene"])
        C.disable(pipe)
    for key in ("s4", "f1", "cond", "ab"):
        assert not np.array_equal(outs[key], outs["s1"]), key


def test_two_batched_candidates_match_one_call_per_seed(pipe, embeds, anchor):
    _, a = anchor
    seeds = candidate_seeds(SCENE.seed, 2)
    C.enable_sharing(pipe, [a], strength=2.0, steps_fraction=0.75)
    batched = _np(pipe, embeds["scene"], seeds=seeds)
    single = np.concatenate([_np(pipe, embeds["scene"], seeds=[s]) for s in seeds])
    assert batched.shape == (2, 48, 32, 3)
    np.testing.assert_allclose(batched, single, atol=1e-5)
    images = render(pipe, SCENE, SamplerSettings(steps=STEPS, candidates=2), seeds, embeds["scene"])
    assert len(images) == 2
    C.disable(pipe)
    assert not np.allclose(_np(pipe, embeds["scene"], seeds=seeds), batched, atol=1e-5)


def _layer_with_state(pipe, tokens: torch.Tensor, strength: float):
    attn = pipe.unet.get_submodule(LAYERS[0])
    state = C.SharingState(anchors=[], layers=[LAYERS[0]], timesteps=[1.0], strength=strength, steps_fraction=1.0)
    state.active, state.current = True, {LAYERS[0]: tokens}
    return attn, C.SharingProcessor(LAYERS[0], attn.processor, state)


@pytest.mark.parametrize("strength", [1.0, 3.0])
def test_anchor_equal_to_the_scene_leaves_attention_unchanged(pipe, strength):
    """Duplicating every key/value (any uniform strength) gives the same softmax average: checks the
    concatenation, the log(strength) bias and that the anchor goes through the layer's to_k/to_v."""
    attn, proc = _layer_with_state(pipe, torch.zeros(1), strength)
    x = torch.randn(1, 64, attn.to_k.in_features, generator=torch.Generator().manual_seed(0))
    proc.state.current[LAYERS[0]] = x[0]
    with torch.no_grad():
        torch.testing.assert_close(proc(attn, x), attn.processor(attn, x), atol=1e-5, rtol=1e-5)
        proc.state.current[LAYERS[0]] = torch.randn(16, x.shape[-1], generator=torch.Generator().manual_seed(1))
        assert not torch.allclose(proc(attn, x), attn.processor(attn, x), atol=1e-4)


def test_anchor_tokens_go_through_a_peft_lora_on_to_k_to_v(tiny_kolors):
    from peft import LoraConfig

    pipe = load_pipeline(tiny_kolors, SETTINGS, CPU)
    pipe.unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_k", "to_v"]), adapter_name="t")
    with torch.no_grad():
        for name, p in pipe.unet.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(2)))
    attn, proc = _layer_with_state(pipe, torch.zeros(1), 2.0)
    assert "lora" in type(attn.to_k).__module__
    x = torch.randn(2, 64, attn.to_k.in_features, generator=torch.Generator().manual_seed(0))
    proc.state.current[LAYERS[0]] = x[0]
    with torch.no_grad():  # item 0's own tokens as anchor: unchanged only if the LoRA applies to them too
        torch.testing.assert_close(proc(attn, x[:1]), attn.processor(attn, x[:1]), atol=1e-5, rtol=1e-5)
        pipe.unet.disable_adapters()
        lora_off = proc(attn, x[:1])
        pipe.unet.enable_adapters()
        assert not torch.allclose(lora_off, proc(attn, x[:1]), atol=1e-4)


def test_scene_with_other_steps_than_the_anchor_is_refused(pipe, embeds, anchor):
    _, a = anchor
    C.enable_sharing(pipe, [a])
    with pytest.raises(ValueError, match="sampler and steps"):
        pipe(width=32, height=32, num_inference_steps=3, generator=torch.Generator().manual_seed(0),
             output_type="latent", **embeds["scene"])


def test_sharing_more_steps_than_recorded_is_refused(pipe, embeds):
    _, feats, meta = C.record_anchor(pipe, embeds["anchor"], 7, 32, 32, STEPS, SETTINGS.guidance_scale,
                                     max_tokens=16, steps_fraction=0.5)
    assert meta["recorded_steps"] == 2 and len(feats) == 2 * len(LAYERS)
    C.enable_sharing(pipe, [C.Anchor(feats, meta)], steps_fraction=0.5)
    with pytest.raises(ValueError, match="recorded 2"):
        C.enable_sharing(pipe, [C.Anchor(feats, meta)], steps_fraction=0.8)
    assert math.isclose(0.5, meta["recorded_steps"] / meta["steps"])


def test_a_pipeline_with_sharing_on_is_freed_by_its_last_reference(tiny_kolors, embeds, anchor):
    """The UNet's step hook holds the pipeline weakly: dropping the pipeline frees it and its UNet
    at once, with no garbage collection (a strong hook made a cycle that kept both alive)."""
    import gc
    import weakref

    fresh = load_pipeline(tiny_kolors, SETTINGS, CPU)
    fresh.set_progress_bar_config(disable=True)
    C.enable_sharing(fresh, [anchor[1]])
    fresh(width=32, height=32, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0),
          output_type="latent", **embeds["scene"])  # the hooks ran
    pipeline, unet = weakref.ref(fresh), weakref.ref(fresh.unet)
    gc.disable()
    try:
        del fresh
        assert pipeline() is None and unet() is None
    finally:
        gc.enable()


def test_a_loaded_anchor_is_read_a_step_at_a_time_and_shares_the_same(pipe, embeds, anchor, tmp_path):
    """load_anchor maps the file and reads a step's tokens when sharing reaches it: nothing of the
    file is held after loading, and the scene is bitwise the one shared with the recorded anchor."""
    import gc

    _, a = anchor
    path = C.save_anchor(tmp_path / "hero.safetensors", a.features, a.meta)
    shape = next(iter(a.features.values())).shape

    def held() -> int:
        return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor) and o.shape == shape)

    before = held()
    loaded = C.load_anchor(path)
    assert held() == before and len(loaded.features) == len(a.features)
    C.enable_sharing(pipe, [a], strength=1.0, steps_fraction=0.5)
    recorded = _np(pipe, embeds["scene"])
    C.enable_sharing(pipe, [loaded], strength=1.0, steps_fraction=0.5)
    assert np.array_equal(_np(pipe, embeds["scene"]), recorded)
