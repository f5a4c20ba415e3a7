"""Scene rendering on the tiny Kolors through stock KolorsPipeline: samplers, seeds, best-of-N."""

import numpy as np
import pytest
import torch
from PIL import Image

from kolors_story.render.scenes import (
    RenderInputs, SamplerSettings, Scene, candidate_seeds, load_pipeline, pipeline_and_embeddings_per_prompt,
    make_scheduler, load_style_lora, render, render_scene,
)
from kolors_story.render.candidates_file import read_record
from kolors_story.models.aesthetic import AestheticScorer
from kolors_story.models.random_aesthetic import build_tiny_aesthetic_predictor
from kolors_story.models.kolors_configs import KOLORS_SCHEDULER
from kolors_story.training import TrainJob, TrainSettings, train_lora

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def pipe(tiny_kolors):
    return load_pipeline(tiny_kolors, SamplerSettings(steps=3), CPU)


@pytest.fixture(scope="module")
def lora(tiny_kolors, training_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora")
    return train_lora(TrainJob(tiny_kolors, training_folder, out),
                      TrainSettings(steps=1, resolution=32, precision="fp32",
                                                                      rank=2, alpha=2)).lora_file


def test_same_seed_same_image_other_seed_other_image(pipe):
    settings = SamplerSettings(steps=3)
    scene = Scene("a", "古风，水墨画", "丑陋", seed=5, width=32, height=48)
    first, again = np.asarray(render(pipe, scene, settings)[0]), np.asarray(render(pipe, scene, settings)[0])
    assert first.shape == (48, 32, 3)
    assert np.array_equal(first, again)
    other = np.asarray(render(pipe, Scene("a", scene.prompt, scene.negative_prompt, 6, 32, 48), settings)[0])
    assert not np.array_equal(first, other)


def test_batched_candidates_match_one_call_per_seed(pipe):
    scene = Scene("a", "古风，水墨画", "丑陋", seed=5, width=32, height=32)
    seeds = candidate_seeds(5, 3)
    assert seeds[0] == 5 and len(set(seeds)) == 3
    batched = render(pipe, scene, SamplerSettings(steps=3, batch_candidates=True), seeds)
    single = render(pipe, scene, SamplerSettings(steps=3, batch_candidates=False), seeds)
    for a, b in zip(batched, single):
        assert np.abs(np.asarray(a).astype(int) - np.asarray(b).astype(int)).max() <= 1


@pytest.mark.parametrize("name, cls", [("euler", "EulerDiscreteScheduler"), ("ddim", "DiffSynthDDIMScheduler"),
                                       ("dpmpp_2m", "DPMSolverMultistepScheduler")])
def test_samplers_keep_kolors_betas(name, cls):
    scheduler = make_scheduler(name, KOLORS_SCHEDULER)
    assert type(scheduler).__name__ == cls
    assert scheduler.config.num_train_timesteps == 1100 and scheduler.config.beta_end == 0.014


def test_unknown_sampler_is_refused():
    with pytest.raises(ValueError, match="unknown sampler"):
        make_scheduler("plms", KOLORS_SCHEDULER)


def test_scene_embeddings_are_the_pipelines_own_and_render_the_same_panel(tiny_kolors):
    """A scene's embeddings come from the one prompt-embedding owner, without ChatGLM in the
    pipeline, and are bitwise what the stock pipeline's encode_prompt gives."""
    scene = Scene("a", "水墨画", "丑陋", seed=1, width=32, height=32)
    full = load_pipeline(tiny_kolors, SamplerSettings(steps=2), CPU)
    reference = full.encode_prompt(prompt=scene.prompt, device=CPU, negative_prompt=scene.negative_prompt)
    pipe, [embeds] = pipeline_and_embeddings_per_prompt(tiny_kolors, SamplerSettings(steps=2), scene, CPU)
    assert pipe.text_encoder is None
    names = ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds")
    for name, tensor in zip(names, reference):
        assert torch.equal(embeds[name], tensor), name
    with_text = np.asarray(full(
        prompt=scene.prompt, negative_prompt=scene.negative_prompt, width=32, height=32, num_inference_steps=2,
        generator=torch.Generator().manual_seed(1)).images[0])
    assert np.array_equal(np.asarray(render(pipe, scene, SamplerSettings(steps=2), embeds=embeds)[0]), with_text)


def test_training_and_scene_jobs_share_one_prompt_cache(tiny_kolors, training_folder, tmp_path, caplog):
    """A caption encoded for training is not encoded again when a scene uses it (same dtype)."""
    from kolors_story.models.kolors_folder import KolorsFolder
    from kolors_story.training.encoding import encode_texts

    encode_texts(KolorsFolder(tiny_kolors), ["水墨画", ""], tmp_path, CPU, torch.float32)
    with caplog.at_level("INFO", logger="kolors_story.models.prompt_embeddings"):
        pipeline_and_embeddings_per_prompt(tiny_kolors, SamplerSettings(steps=2), Scene("s", "水墨画"), CPU, tmp_path)
    assert "2 cached, 0 to encode" in caplog.text
    assert len(list((tmp_path / "text").rglob("*.safetensors"))) == 2


def test_render_scene_writes_the_panel(tiny_kolors, lora, tmp_path):
    record = render_scene(RenderInputs(tiny_kolors, lora), Scene("s1", "水墨画", seed=1, width=32, height=32),
                          SamplerSettings(sampler="ddim", steps=2, lora_scale=0.5), tmp_path / "s1.png",
                          device=CPU)
    assert (tmp_path / "s1.png").read_bytes()[:4] == b"\x89PNG" and record.seed == 1
    assert record.recipe().sampler == "ddim" and record.lora_scale == 0.5 and record.recipe().batch_seeds == (1,)


def test_best_of_n_keeps_the_highest_scoring_candidate(tiny_kolors, lora, tmp_path):
    aesthetic = build_tiny_aesthetic_predictor(tmp_path / "aesthetic")
    settings = SamplerSettings(steps=2, candidates=4)
    record = render_scene(RenderInputs(tiny_kolors, lora, aesthetic_dir=aesthetic),
                          Scene("s1", "水墨画，山水", seed=3, width=32, height=32), settings, tmp_path / "s1.png",
                          candidates_dir=tmp_path / "cands", device=CPU)
    files = [tmp_path / "cands" / f for f in record.files]
    separately = AestheticScorer(aesthetic).score_files(files)
    scores = [separately[f.name] for f in files]
    assert scores == pytest.approx(record.scores, abs=1e-5)
    assert record.chosen == int(np.argmax(scores)) and record.seed == candidate_seeds(3, 4)[record.chosen]
    chosen = np.asarray(Image.open(files[record.chosen]))
    assert np.array_equal(np.asarray(Image.open(tmp_path / "s1.png")), chosen)
    assert read_record(tmp_path / "cands") == record  # the typed record round-trips through its file
    assert all(c.batch_seeds == tuple(candidate_seeds(3, 4)) for c in record.candidates)  # one batch
    assert len(set(scores)) > 1


def test_lora_scale_sweep_competes_scales_and_records_the_winner(tiny_kolors, lora, tmp_path):
    aesthetic = build_tiny_aesthetic_predictor(tmp_path / "aesthetic")
    settings = SamplerSettings(steps=2, candidates=2, lora_scale=(0.0, 1.0))
    record = render_scene(RenderInputs(tiny_kolors, lora, aesthetic_dir=aesthetic),
                          Scene("s1", "水墨画", seed=2, width=32, height=32), settings, tmp_path / "s1.png",
                          candidates_dir=tmp_path / "c", device=CPU)
    assert [c.lora_scale for c in record.candidates] == [0.0, 0.0, 1.0, 1.0]
    assert [c.seed for c in record.candidates] == candidate_seeds(2, 2) * 2
    assert record.lora_scale == record.candidates[record.chosen].lora_scale == record.recipe().lora_scale
    assert record.chosen == int(np.argmax(record.scores))
    base = np.asarray(Image.open(tmp_path / "c/0.png")).astype(int)
    styled = np.asarray(Image.open(tmp_path / "c/2.png")).astype(int)
    assert np.abs(base - styled).max() > 0


def test_alternative_prompts_compete_with_every_seed_and_the_winner_renders_again(tiny_kolors, lora, tmp_path):
    """prompt_writer.variants: the scene's prompts x seeds are scored; the record names each
    candidate's prompt, and the kept one's recipe (its prompt, seed, batch) renders the panel again."""
    aesthetic = build_tiny_aesthetic_predictor(tmp_path / "aesthetic")
    settings = SamplerSettings(steps=2, candidates=2)
    scene = Scene("s1", "水墨画，山水", seed=4, width=32, height=32, alternatives=("水墨画，小桥流水", "古风，竹林"))
    record = render_scene(RenderInputs(tiny_kolors, lora, aesthetic_dir=aesthetic), scene, settings,
                          tmp_path / "s1.png", candidates_dir=tmp_path / "c", device=CPU)
    assert [c.prompt for c in record.candidates] == [None, None, "水墨画，小桥流水", "水墨画，小桥流水", "古风，竹林", "古风，竹林"]
    assert [c.seed for c in record.candidates] == candidate_seeds(4, 2) * 3
    assert record.chosen == int(np.argmax(record.scores)) and read_record(tmp_path / "c") == record
    recipe = record.recipe()
    assert recipe.prompt == scene.prompts[record.chosen // 2] and recipe.seed == record.seed
    pipe, [embeds] = pipeline_and_embeddings_per_prompt(
        tiny_kolors, settings, Scene("s1", recipe.prompt, seed=recipe.seed, width=32, height=32), CPU)
    load_style_lora(pipe, lora, 1.0, fuse=True)
    again = render(pipe, Scene("s1", recipe.prompt, width=32, height=32), settings, list(recipe.batch_seeds), embeds)
    kept = np.asarray(Image.open(tmp_path / "s1.png"))
    assert np.array_equal(np.asarray(again[recipe.batch_index]), kept)
    others = [np.asarray(Image.open(tmp_path / "c" / f)) for f in record.files]
    assert not np.array_equal(others[0], others[2])  # another prompt, the same seed: another image


def test_consistency_anchors_change_the_scene_deterministically_and_weigh_the_pick(tiny_kolors, lora, tmp_path):
    from kolors_story.render.scenes import Consistency, render_anchor

    aesthetic = build_tiny_aesthetic_predictor(tmp_path / "aesthetic")
    settings = SamplerSettings(steps=3, candidates=2, batch_candidates=False)  # one call per seed, as compare
    option = Consistency(strength=4.0, steps_fraction=1.0, max_tokens=64, selection_weight=2.0, compare=True)
    anchor = render_anchor(RenderInputs(tiny_kolors, lora), Scene("girl", "水墨画，少女", seed=0, width=32, height=32),
                           settings, option, tmp_path / "anchors/girl.safetensors", device=CPU)
    assert anchor.with_suffix(".png").is_file()
    scene = Scene("s1", "水墨画，少女，读书", seed=7, width=32, height=32)

    def run(name, anchors):
        return render_scene(RenderInputs(tiny_kolors, lora, aesthetic_dir=aesthetic), scene, settings,
                            tmp_path / f"{name}.png", candidates_dir=tmp_path / name, device=CPU, anchors=anchors,
                            consistency=option)

    plain, shared = run("plain", []), run("shared", [anchor])
    run("again", [anchor])  # its candidate files are compared below
    pixels = {n: np.asarray(Image.open(tmp_path / n / "0.png")).astype(int) for n in ("plain", "shared", "again")}
    assert np.array_equal(pixels["shared"], pixels["again"])
    assert np.abs(pixels["shared"] - pixels["plain"]).max() > 0
    assert [c.anchor_similarity for c in plain.candidates] == [None, None] and plain.consistency is None
    combined = [c.score + 2.0 * c.anchor_similarity for c in shared.candidates]
    assert [c.selection_score for c in shared.candidates] == pytest.approx(combined)
    assert shared.chosen == int(np.argmax(combined))
    assert [c.batch_seeds for c in shared.candidates] == [(7,), (100_010,)]  # batch_candidates off
    used = shared.consistency  # the record says how sharing was set and how each anchor was recorded
    assert (used.strength, used.steps_fraction, used.selection_weight) == (4.0, 1.0, 2.0)
    assert [(a.id, a.prompt, a.seed, a.max_tokens, a.steps) for a in used.anchors] == [("girl", "水墨画，少女", 0, 64, 3)]
    # compare: the chosen seed again with sharing off is the plain run's candidate of that seed
    assert [c.seed for c in plain.candidates] == [c.seed for c in shared.candidates]
    assert plain.without_consistency is None
    without = np.asarray(Image.open(tmp_path / "shared" / shared.without_consistency))
    chosen = shared.chosen
    assert np.array_equal(without, np.asarray(Image.open(tmp_path / "plain" / f"{chosen}.png")))
    assert not np.array_equal(without, np.asarray(Image.open(tmp_path / "shared" / f"{chosen}.png")))


def test_prompt_embeddings_are_cached_and_a_cached_panel_is_bitwise_the_same(tiny_kolors, lora, tmp_path, caplog):
    settings = SamplerSettings(steps=2)
    scene = Scene("s1", "水墨画，山水", "丑陋", seed=4, width=32, height=32)
    cache = tmp_path / "cache"

    def run(name, scene=scene, cache_dir=cache):
        caplog.clear()
        render_scene(RenderInputs(tiny_kolors, lora, cache_dir=cache_dir), scene, settings,
                     tmp_path / f"{name}.png", device=CPU)
        return np.asarray(Image.open(tmp_path / f"{name}.png"))

    with caplog.at_level("INFO", logger="kolors_story.models.prompt_embeddings"):
        uncached = run("uncached", cache_dir=None)
        first = run("first")
        assert "2 to encode" in caplog.text
        second = run("second")
        assert "2 cached, 0 to encode" in caplog.text
        run("other_negative", Scene("s1", scene.prompt, "模糊", seed=4, width=32, height=32))
        assert "1 cached, 1 to encode" in caplog.text
    assert np.array_equal(uncached, first) and np.array_equal(first, second)
    assert len(list((cache / "text").rglob("*.safetensors"))) == 3  # prompt and both negatives


def test_the_embeddings_file_gives_bitwise_the_cache_and_the_scene_never_loads_chatglm(
        tiny_kolors, lora, tmp_path, monkeypatch):
    """The encode_texts job's file: the pipeline's own embeddings, bitwise, and a scene or anchor
    job that reads it renders the same image without ever loading the text encoder."""
    from safetensors.torch import load_file

    from kolors_story.errors import UserError
    from kolors_story.render.scenes import Consistency, render_anchor
    from kolors_story.models.kolors_folder import KolorsFolder
    from kolors_story.models.prompt_embeddings import EmbeddingsFile, PromptEmbeddings, write_embeddings

    folder, settings = KolorsFolder(tiny_kolors), SamplerSettings(steps=2)
    scene = Scene("s1", "水墨画，山水", "丑陋", seed=4, width=32, height=32)
    girl = Scene("girl", "水墨画，少女", "丑陋", seed=0, width=32, height=32)
    store = write_embeddings(folder, [scene.prompt, scene.negative_prompt, girl.prompt, "二次元"],
                             tmp_path / "e.safetensors", torch.float32, CPU, tmp_path / "cache")
    direct = PromptEmbeddings(folder, torch.float32, CPU).for_pipeline(scene.prompt, scene.negative_prompt)
    stored = EmbeddingsFile(store, folder, torch.float32, CPU).for_pipeline(scene.prompt, scene.negative_prompt)
    assert direct.keys() == stored.keys() and all(torch.equal(direct[k], stored[k]) for k in direct)
    option = Consistency(strength=1.0, steps_fraction=1.0, max_tokens=16)
    render_scene(RenderInputs(tiny_kolors, lora), scene, settings, tmp_path / "encoded.png", device=CPU)
    render_anchor(RenderInputs(tiny_kolors, lora), girl, settings, option, tmp_path / "encoded/girl.safetensors",
                  device=CPU)

    def refuse(*args, **kwargs):
        raise AssertionError("a scene job with an embeddings file loaded ChatGLM")

    monkeypatch.setattr(KolorsFolder, "load_text_encoder", refuse)
    render_scene(RenderInputs(tiny_kolors, lora, embeddings=store), scene, settings, tmp_path / "stored.png",
                 device=CPU)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "encoded.png")), np.asarray(Image.open(tmp_path / "stored.png")))
    render_anchor(RenderInputs(tiny_kolors, lora, embeddings=store), girl, settings, option,
                  tmp_path / "stored/girl.safetensors", device=CPU)
    encoded, read = load_file(tmp_path / "encoded/girl.safetensors"), load_file(tmp_path / "stored/girl.safetensors")
    assert encoded.keys() == read.keys() and all(torch.equal(encoded[k], read[k]) for k in encoded)
    with pytest.raises(UserError, match="snakemake -R encode_texts"):
        render_scene(RenderInputs(tiny_kolors, lora, embeddings=store),
                     Scene("s2", "另一个提示", "丑陋", seed=1, width=32, height=32), settings, tmp_path / "missing.png",
                     device=CPU)
