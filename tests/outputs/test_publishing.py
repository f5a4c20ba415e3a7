"""ModelScope bundle contents, clean replacement, token handling and offline upload failure."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import pytest
import yaml
from PIL import Image

from kolors_story.errors import UserError
from kolors_story.render.candidates_file import AnchorRecipe, Candidate, CandidateRecord, ConsistencyRecipe, Runtime
from kolors_story.outputs.hub_upload import modelscope_token, upload_bundle
from kolors_story.outputs.publishing import ModelCard, build_bundle
from kolors_story.run_files import LORA_WEIGHT_NAME

FAKE_TOKEN = "ms-fake-0123456789abcdef-secret"


RUNTIME = Runtime(torch_threads=1, torch="2.5.1", diffusers="0.32.2", cpu_capability="AVX2", deterministic=False)
GIRL = AnchorRecipe(id="girl", prompt="水墨画，少女", negative_prompt="模糊", seed=0, width=32, height=32,
                    sampler="euler", steps=20, guidance_scale=5.0, lora_scale=0.8, steps_fraction=0.6, max_tokens=256,
                    runtime=RUNTIME)


def make_record(scene: str, prompt: str, seed: int, consistency: ConsistencyRecipe | None = None,
                sampler: str = "euler") -> CandidateRecord:
    """A best-of-2 record whose second candidate (drawn in one batch with the first) was kept."""
    batch = (seed - 7, seed)
    candidates = tuple(Candidate(seed=s, lora_scale=0.8, batch_seeds=batch, score=5.0 + k, file=f"{k}.png")
                       for k, s in enumerate(batch))
    return CandidateRecord(scene=scene, prompt=prompt, negative_prompt="模糊", width=32, height=48,
                           sampler=sampler, steps=20, guidance_scale=4.5, precision="fp16", dtype="float16",
                           device="cuda", candidates=candidates, chosen=1, consistency=consistency)


def make_inputs(root: Path, n: int = 3, consistency: ConsistencyRecipe | None = None) -> dict:
    """Fake LoRA bytes, n panels (one JPEG) and their records, a story image and a scores.json summary."""
    root.mkdir(parents=True, exist_ok=True)
    lora = root / "trained_lora.safetensors"
    lora.write_bytes(b"lora-bytes")
    panels, records, scores = [], [], {}
    for i in range(n):
        suffix = ".jpg" if i == n - 1 else ".png"
        image = root / f"s{i}{suffix}"
        Image.new("RGB", (32, 32), (40 * i, 0, 0)).save(image)
        panels.append(image)
        records.append(make_record(f"s{i}", f"古风，水墨画，scene | {i}", 100 + i, consistency))
        scores[image.name] = 5.5 + i
    story = root / "story.png"
    Image.new("RGB", (64, 64), "white").save(story)
    mean = sum(scores.values()) / n
    summary = {"mean": mean, "threshold": 6.0, "passes": mean >= 6.0, "n": n, "scores": scores}
    return {"lora_file": lora, "panels": panels, "records": records, "scores": summary, "story_image": story}


def bundle(out_dir: Path, inputs: dict) -> Path:
    card = ModelCard(title="Ink 水墨 LoRA", base_model="Kwai-Kolors/Kolors-diffusers", trigger_words="水墨画",
                     run_name="demo")
    return build_bundle(out_dir, card=card, **inputs)


def test_bundle_contents(tmp_path: Path):
    inputs = make_inputs(tmp_path / "in")
    out = bundle(tmp_path / "bundle", inputs)
    names = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert names == sorted(["README.md", "panels/s0.png", "panels/s1.png", "panels/s2.png",
                            LORA_WEIGHT_NAME, "prompts.json", "story.png"])
    assert (out / LORA_WEIGHT_NAME).read_bytes() == b"lora-bytes"
    with Image.open(out / "panels" / "s2.png") as panel:  # the JPEG panel became a PNG
        assert panel.format == "PNG"

    prompts = json.loads((out / "prompts.json").read_text(encoding="utf-8"))
    assert [s["seed"] for s in prompts["scenes"]] == [100, 101, 102]  # the kept candidates'
    assert prompts["scenes"][2]["score"] == 7.5 and prompts["scenes"][0]["image"] == "panels/s0.png"
    first = prompts["scenes"][0]
    assert first["prompt"] == "古风，水墨画，scene | 0" and first["negative_prompt"] == "模糊"
    assert {k: first[k] for k in ("sampler", "steps", "guidance_scale", "lora_scale", "width", "height",
                                  "dtype", "device", "batch_seeds", "batch_index")} == {
        "sampler": "euler", "steps": 20, "guidance_scale": 4.5, "lora_scale": 0.8, "width": 32, "height": 48,
        "dtype": "float16", "device": "cuda", "batch_seeds": [93, 100], "batch_index": 1}
    assert first["selection"] == {"candidates": 2, "chosen": 1, "score": 6.0, "anchor_similarity": None,
                                  "selection_score": None}
    assert first["consistency"] is None and first["stock_diffusers"] is True
    assert prompts["mean_score"] == pytest.approx(6.5) and prompts["passes"] is True

    card = (out / "README.md").read_text(encoding="utf-8")
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["frameworks"] == ["Pytorch"] and front["license"] == "apache-2.0"
    assert front["tasks"] == ["text-to-image-synthesis"]
    assert front["base_model"] == ["Kwai-Kolors/Kolors-diffusers"]
    assert "# Ink 水墨 LoRA" in card and "水墨画" in card
    assert "KolorsPipeline.from_pretrained(" in card
    assert f'load_lora_weights(lora_dir, weight_name="{LORA_WEIGHT_NAME}", adapter_name="style")' in card
    assert 'adapter_weights=[panel["lora_scale"]]' in card and 'manual_seed(seed) for seed in seeds' in card
    assert 'prompts.json' in card and 'if s["id"] == "s0"' in card
    assert "![story](story.png)" in card
    assert "| s1 | ![s1](panels/s1.png) | 古风，水墨画，scene \\| 1 | 101 | euler | 20 | 4.5 | 0.8 | 32x48 | - | 6.500 |" in card
    assert "**6.500**" in card and "it passes the threshold 6" in card


def test_usage_snippet_is_valid_python(tmp_path: Path, tiny_kolors: Path):
    card = (bundle(tmp_path / "b", make_inputs(tmp_path / "in")) / "README.md").read_text(encoding="utf-8")
    snippet = card.split("```python\n")[1].split("```")[0]
    compile(snippet, "usage", "exec")
    assert 'variant="fp16"' in snippet
    local = make_inputs(tmp_path / "in2")
    out = build_bundle(tmp_path / "c", card=ModelCard("t", str(tiny_kolors), "", "demo"), **local)
    snippet = (out / "README.md").read_text(encoding="utf-8").split("```python\n")[1].split("```")[0]
    compile(snippet, "usage", "exec")
    # The local tiny Kolors is laid out as the real one: fp16 files only, so the stock loader needs the variant.
    assert f'base_dir = "{tiny_kolors}"' in snippet and 'variant="fp16"' in snippet


def test_anchor_panels_carry_their_anchor_recipes_and_the_card_says_how_to_render_them(tmp_path: Path):
    sharing = ConsistencyRecipe(strength=1.5, steps_fraction=0.6, selection_weight=2.0, anchors=(GIRL,))
    inputs = make_inputs(tmp_path / "in", n=2, consistency=sharing)
    inputs["records"][1] = make_record("s1", "古风，水墨画，山水", 101)  # no character: stock diffusers
    out = bundle(tmp_path / "b", inputs)
    rows = json.loads((out / "prompts.json").read_text(encoding="utf-8"))["scenes"]
    assert rows[0]["stock_diffusers"] is False and rows[1]["stock_diffusers"] is True
    assert rows[0]["consistency"]["strength"] == 1.5 and rows[0]["consistency"]["anchors"] == [
        {"id": "girl", "prompt": "水墨画，少女", "negative_prompt": "模糊", "seed": 0, "width": 32, "height": 32,
         "sampler": "euler", "steps": 20, "guidance_scale": 5.0, "lora_scale": 0.8, "steps_fraction": 0.6,
         "max_tokens": 256, "runtime": asdict(RUNTIME)}]
    card = (out / "README.md").read_text(encoding="utf-8")
    assert 'if s["id"] == "s1"' in card and "shares attention" not in card  # the stock-reproducible one
    assert "| s0 |" in card and "| girl | 5.500 |" in card and "kolors-story-reproduce <this folder>" in card
    only_anchored = bundle(tmp_path / "c", make_inputs(tmp_path / "in2", n=1, consistency=sharing))
    card = (only_anchored / "README.md").read_text(encoding="utf-8")
    assert "shares attention with character anchors" in card and 'if s["id"] == "s0"' in card


@pytest.mark.parametrize("sampler, scheduler", [("euler", "EulerDiscreteScheduler.from_config"),
                                                ("dpmpp_2m", "DPMSolverMultistepScheduler.from_config"),
                                                ("ddim", "DiffSynthDDIMScheduler.from_scheduler_config")])
def test_usage_snippet_names_each_sampler(tmp_path: Path, sampler: str, scheduler: str):
    inputs = make_inputs(tmp_path / "in", n=1)
    inputs["records"] = [make_record("s0", "水墨画", 100, sampler=sampler)]
    snippet = (bundle(tmp_path / "b", inputs) / "README.md").read_text(encoding="utf-8").split("```python\n")[1]
    snippet = snippet.split("```")[0]
    compile(snippet, "usage", "exec")
    assert f"pipe.scheduler = {scheduler}(" in snippet  # as make_scheduler builds it
    assert ("from kolors_story.render.diffsynth_ddim import DiffSynthDDIMScheduler" in snippet) == (sampler == "ddim")


def test_card_names_the_oldest_diffusers_that_loads_the_lora(tmp_path: Path):
    from kolors_story.outputs.publishing import MIN_DIFFUSERS

    card = (bundle(tmp_path / "b", make_inputs(tmp_path / "in")) / "README.md").read_text(encoding="utf-8")
    # KolorsPipeline's first release (0.30.0); the folded scale needs no metadata reader (0.34.0)
    assert MIN_DIFFUSERS == "0.30.0"
    assert "`KolorsPipeline.load_lora_weights` in diffusers >= 0.30.0" in card
    assert "lora_alpha = rank" in card


def test_rebuild_replaces_old_bundle(tmp_path: Path):
    out = tmp_path / "bundle"
    bundle(out, make_inputs(tmp_path / "a", n=3))
    (out / "stale.txt").write_text("old")
    inputs = make_inputs(tmp_path / "b", n=2)
    inputs["scores"]["mean"] = 5.0
    bundle(out, inputs)
    assert sorted(p.name for p in (out / "panels").iterdir()) == ["s0.png", "s1.png"]
    assert not (out / "stale.txt").exists()
    assert "does not pass the threshold 6" in (out / "README.md").read_text(encoding="utf-8")
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp folders left


def test_bundle_input_errors(tmp_path: Path):
    inputs = make_inputs(tmp_path / "in")
    missing = dict(inputs, panels=[tmp_path / "gone.png"], records=inputs["records"][:1])
    with pytest.raises(UserError, match="gone.png"):
        bundle(tmp_path / "x", missing)
    dup = dict(inputs, panels=inputs["panels"][:1] * 2, records=inputs["records"][:1] * 2)
    with pytest.raises(UserError, match="story.scenes"):
        bundle(tmp_path / "x", dup)
    with pytest.raises(UserError, match="LoRA"):
        bundle(tmp_path / "x", dict(inputs, lora_file=tmp_path / "no.safetensors"))
    assert not (tmp_path / "x").exists()


def test_token_only_from_env(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("MODELSCOPE_API_TOKEN", raising=False)
    with pytest.raises(UserError, match="export MODELSCOPE_API_TOKEN"):
        modelscope_token()
    monkeypatch.setenv("MODELSCOPE_API_TOKEN", f"  {FAKE_TOKEN}\n")
    assert modelscope_token() == FAKE_TOKEN


def test_upload_checks_arguments_before_network(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("MODELSCOPE_API_TOKEN", FAKE_TOKEN)
    out = bundle(tmp_path / "bundle", make_inputs(tmp_path / "in"))
    with pytest.raises(UserError, match="upload.repo_id"):
        upload_bundle(out, "no-slash")
    with pytest.raises(UserError, match="upload.visibility"):
        upload_bundle(out, "me/repo", visibility="secret")
    with pytest.raises(UserError, match="build the bundle"):
        upload_bundle(tmp_path / "empty", "me/repo")


UPLOAD_SCRIPT = """
import sys
from kolors_story.errors import UserError
from kolors_story.outputs.hub_upload import upload_bundle
try:
    upload_bundle(sys.argv[1], "someone/kolors-test")
except UserError as err:
    print("USERERROR:", err)
    print("CAUSE:", repr(err.__cause__), "CONTEXT:", repr(err.__context__))
    sys.exit(3)
"""


def test_upload_failure_is_user_error_without_token(tmp_path: Path):
    """A real hub call against a closed local port: a UserError naming the repo, token nowhere."""
    out = bundle(tmp_path / "bundle", make_inputs(tmp_path / "in"))
    env = dict(os.environ, MODELSCOPE_API_TOKEN=FAKE_TOKEN, MODELSCOPE_ENDPOINT="http://127.0.0.1:9",
               MODELSCOPE_API_MAX_RETRIES="1",  # default 5 retries back off for ~15 s
               MODELSCOPE_HOME=str(tmp_path / "mshome"), MODELSCOPE_CACHE=str(tmp_path / "mscache"))
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", UPLOAD_SCRIPT, str(out)], env=env,
                          capture_output=True, text=True, timeout=120)
    elapsed = time.monotonic() - start
    output = proc.stdout + proc.stderr
    assert proc.returncode == 3, output
    assert "USERERROR:" in proc.stdout and "someone/kolors-test" in proc.stdout
    assert "CAUSE: None CONTEXT: None" in proc.stdout
    assert FAKE_TOKEN not in output
    assert elapsed < 60
