"""A published panel renders again bit for bit (CPU) from its bundle alone: the bundle's LoRA and
prompts.json plus the tiny Kolors; stock diffusers through the model card's snippet, anchor-mode
panels through kolors_story.tools.reproduce (it records the anchors again from their recipes)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kolors_story.render.scenes import (
    Consistency, RenderInputs, SamplerSettings, Scene, candidate_seeds, render_anchor, render_scene,
)
from kolors_story.errors import UserError
from kolors_story.render.candidates_file import (
    RECORD_FILE, AnchorRecipe, Candidate, CandidateRecord, ConsistencyRecipe, PanelRecipe, Runtime, read_record,
    write_record,
)
from kolors_story.outputs.publishing import ModelCard, build_bundle
from kolors_story.tools.reproduce import main, rerender_panel
from kolors_story.models.random_aesthetic import build_tiny_aesthetic_predictor
from kolors_story.training import TrainJob, TrainSettings, train_lora

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def published(tiny_kolors, training_folder, tmp_path_factory) -> tuple[Path, dict]:
    """A bundle of two panels, a plain one and one sharing attention with an anchor, each the
    best of a LoRA-scale sweep of batched candidates; then everything but the bundle is deleted."""
    work, root = tmp_path_factory.mktemp("work"), tmp_path_factory.mktemp("published")
    lora = train_lora(TrainJob(tiny_kolors, training_folder, work / "lora"), TrainSettings(
        steps=1, resolution=32, precision="fp32", rank=2, alpha=2)).lora_file
    aesthetic = build_tiny_aesthetic_predictor(work / "aesthetic")
    settings = SamplerSettings(steps=2, candidates=3, lora_scale=(0.5, 1.0))
    option = Consistency(strength=4.0, steps_fraction=1.0, max_tokens=64, selection_weight=2.0)
    anchor = render_anchor(RenderInputs(tiny_kolors, lora), Scene("girl", "水墨画，少女", "丑陋", 0, 32, 32), settings,
                           option, work / "anchors/girl.safetensors", device=CPU)
    scenes = {"s1": (Scene("s1", "水墨画，山水", "", 3, 32, 48), []),  # empty negative: the pipeline's default
              "s2": (Scene("s2", "水墨画，少女，读书", "丑陋", 7, 32, 32), [anchor])}
    for name, (scene, anchors) in scenes.items():
        render_scene(RenderInputs(tiny_kolors, lora, aesthetic_dir=aesthetic), scene, settings,
                     work / f"scenes/{name}.png", candidates_dir=work / f"candidates/{name}", device=CPU,
                     anchors=anchors, consistency=option if anchors else None)
    records = {name: read_record(work / f"candidates/{name}") for name in scenes}
    Image.new("RGB", (64, 64)).save(work / "story.png")
    bundle = build_bundle(root / "bundle", lora, [work / f"scenes/{n}.png" for n in scenes], list(records.values()),
                          {"scores": {"s1.png": 5.0, "s2.png": 6.0}}, work / "story.png",
                          ModelCard("t", str(tiny_kolors), "", "test"))
    shutil.rmtree(work)  # the anchors, candidates and LoRA of the run: only the bundle is left
    return bundle, records


def panel(bundle: Path, scene: str) -> np.ndarray:
    with Image.open(bundle / "panels" / f"{scene}.png") as image:
        return np.asarray(image)


def test_prompts_json_holds_the_kept_candidates_full_recipe(published):
    bundle, records = published
    rows = {r["id"]: r for r in json.loads((bundle / "prompts.json").read_text(encoding="utf-8"))["scenes"]}
    for name, record in records.items():
        recipe = PanelRecipe.from_json(rows[name])
        assert recipe == record.recipe()
        assert (recipe.seed, recipe.lora_scale) == (record.seed, record.lora_scale)
        assert recipe.batch_seeds == tuple(candidate_seeds(recipe.batch_seeds[0], 3))
        assert (recipe.sampler, recipe.steps, recipe.guidance_scale, recipe.dtype, recipe.device) == (
            "euler", 2, 5.0, "float32", "cpu")
        assert rows[name]["selection"]["candidates"] == 6 and rows[name]["selection"]["chosen"] == record.chosen
    assert rows["s1"]["stock_diffusers"] and rows["s1"]["consistency"] is None
    assert not rows["s2"]["stock_diffusers"] and rows["s2"]["selection"]["anchor_similarity"] is not None
    assert [a["id"] for a in rows["s2"]["consistency"]["anchors"]] == ["girl"]


def test_model_card_snippet_renders_the_plain_panel_again_with_stock_diffusers(published, monkeypatch, tmp_path):
    bundle, _ = published
    snippet = (bundle / "README.md").read_text(encoding="utf-8").split("```python\n")[1].split("```")[0]
    assert 'if s["id"] == "s1"' in snippet  # the card picks the panel stock diffusers reproduces
    hub = types.ModuleType("modelscope")
    hub.snapshot_download = lambda repo_id: str(bundle)  # "<owner>/<this-repo>": the bundle, as uploaded
    monkeypatch.setitem(sys.modules, "modelscope", hub)
    monkeypatch.chdir(tmp_path)
    exec(compile(snippet, "model card", "exec"), {})
    with Image.open(tmp_path / "s1.png") as image:
        assert np.array_equal(np.asarray(image), panel(bundle, "s1"))


def test_anchor_panel_renders_again_through_kolors_story(published, tiny_kolors, tmp_path, capsys):
    bundle, _ = published
    assert main([str(bundle), str(tiny_kolors), "s2", str(tmp_path / "s2.png")]) == 0
    assert "bit for bit the published" in capsys.readouterr().out
    with Image.open(tmp_path / "s2.png") as image:
        assert np.array_equal(np.asarray(image), panel(bundle, "s2"))
    assert np.array_equal(np.asarray(rerender_panel(tiny_kolors, bundle, "s1", CPU)), panel(bundle, "s1"))


# The reproduce command in a process whose torch uses 3 threads (torch caps OMP_NUM_THREADS at
# the cores; set_num_threads does not), printing the thread count each render ran on.
SPY_ON_THREADS = """
import sys, torch
torch.set_num_threads(3)
from kolors_story.tools import reproduce
seen = {}
def counting(name, real):
    def call(*args, **kwargs):
        seen[name] = torch.get_num_threads()
        return real(*args, **kwargs)
    return call
reproduce.render_anchor = counting("anchor", reproduce.render_anchor)
reproduce.render = counting("panel", reproduce.render)
code = reproduce.main(sys.argv[1:])
print(f"threads: anchor {seen['anchor']}, panel {seen['panel']}, after {torch.get_num_threads()}")
sys.exit(code)
"""


def test_a_process_with_another_thread_count_renders_bit_for_bit(published, tiny_kolors, tmp_path):
    """The jobs ran on one torch thread (the scene jobs' default `threads: 1`); a reproduce process
    whose torch would use three pins the recorded one for the anchor and the panel."""
    bundle, records = published
    rows = {r["id"]: r for r in json.loads((bundle / "prompts.json").read_text(encoding="utf-8"))["scenes"]}
    recorded = PanelRecipe.from_json(rows["s2"])
    assert recorded.runtime == records["s2"].runtime and recorded.runtime.torch_threads == 1
    assert recorded.consistency.anchors[0].runtime.torch_threads == 1
    assert recorded.runtime == Runtime.current(CPU)  # versions, kernels: this machine's
    done = subprocess.run([sys.executable, "-c", SPY_ON_THREADS, str(bundle), str(tiny_kolors), "s2",
                           str(tmp_path / "s2.png")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    # a tiny model's panel may come out the same on 3 threads: the counts in use are checked too
    assert "threads: anchor 1, panel 1, after 3" in done.stdout
    assert "rendering on 1 torch thread(s), as its job did" in done.stderr
    assert "s2.png: bit for bit the published" in done.stdout
    with Image.open(tmp_path / "s2.png") as image:
        assert np.array_equal(np.asarray(image), panel(bundle, "s2"))


def test_a_panel_not_bit_for_bit_names_the_recorded_items_not_matched(published, tiny_kolors, tmp_path, capsys):
    bundle = shutil.copytree(published[0], tmp_path / "bundle")
    prompts = json.loads((bundle / "prompts.json").read_text(encoding="utf-8"))
    row = next(r for r in prompts["scenes"] if r["id"] == "s1")
    row["runtime"] |= {"torch": "2.0.0", "cpu_capability": "AVX512"}  # recorded on another machine
    (bundle / "prompts.json").write_text(json.dumps(prompts), encoding="utf-8")
    with Image.open(bundle / "panels/s1.png") as image:
        pixels = np.asarray(image).copy()
    pixels[0, 0, 0] ^= 1  # what another machine's kernels do to one pixel
    Image.fromarray(pixels).save(bundle / "panels/s1.png")
    assert main([str(bundle), str(tiny_kolors), "s1", str(tmp_path / "s1.png")]) == 0
    line = capsys.readouterr().out
    assert "NOT bit for bit" in line and "recorded by its jobs and not matched here:" in line
    assert f"scene s1: torch 2.0.0 (here {torch.__version__})" in line
    assert f"scene s1: cpu capability AVX512 (here {torch.backends.cpu.get_cpu_capability()})" in line
    assert "threads" not in line.split("not matched here:")[1]  # pinned, so matched


def test_record_round_trips_and_older_files_are_refused_with_the_fix(tmp_path):
    gpu = Runtime(torch_threads=4, torch="2.5.1", diffusers="0.32.2", cpu_capability="AVX512", deterministic=False,
                  gpu="NVIDIA H100 80GB HBM3", cuda="12.4")
    girl = AnchorRecipe(id="girl", prompt="少女", negative_prompt="", seed=0, width=64, height=64, sampler="ddim",
                        steps=4, guidance_scale=5.0, lora_scale=1.0, steps_fraction=0.6, max_tokens=64, runtime=gpu)
    record = CandidateRecord(
        scene="s1", prompt="少女", negative_prompt="丑陋", width=64, height=64, sampler="ddim", steps=4,
        guidance_scale=5.0, precision="fp16", dtype="float16", device="cuda",
        candidates=(Candidate(1, 1.0, (1,), 5.0, 0.5, 6.0, "0.png"), Candidate(2, 1.0, (2,), 5.5, 0.9, 7.3, "1.png")),
        chosen=1, consistency=ConsistencyRecipe(strength=1.0, steps_fraction=0.6, selection_weight=2.0, anchors=(girl,)),
        without_consistency="without_consistency.png", runtime=gpu)
    write_record(record, tmp_path)
    assert read_record(tmp_path) == record
    recipe = record.recipe()
    assert (recipe.seed, recipe.batch_seeds, recipe.batch_index, recipe.stock_diffusers) == (2, (2,), 0, False)
    assert PanelRecipe.from_json(json.loads(json.dumps(recipe.to_json()))) == recipe
    assert recipe.runtime == gpu and recipe.consistency.anchors[0].runtime == gpu
    old = {"scene": "s1", "seeds": [1], "chosen": 0}  # the untyped dict of earlier versions
    (tmp_path / RECORD_FILE).write_text(json.dumps(old), encoding="utf-8")
    with pytest.raises(UserError, match="delete .* so that its generate_scene job runs again"):
        read_record(tmp_path)
    with pytest.raises(UserError, match="lacks .*sampler.*render_anchor records it again"):
        AnchorRecipe.from_meta({"id": "girl", "prompt": "少女", "seed": 0}, tmp_path / "girl.safetensors")
