"""The demo DAG run for real with snakemake in a temp dir, its outputs, and what reruns after an edit.

One complete run of the demo sweep (`make demo`: the demo plus a half-strength variant, about 4
minutes on 2 cores) is shared by the module; the caching tests are dry runs against it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from challenge_reference import reference_evaluate
from result_files import differing, result_files

pytestmark = pytest.mark.workflow

ROOT = Path(__file__).resolve().parents[1]
SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))
WORKFLOW_FILES = ["Snakefile", "config.yaml", "rules", "scripts", "schemas", "demo", "profiles", "envs", "report"]
DEMO_SWEEP = ("demo/config.yaml", "demo/sweep.yaml")  # what `make demo` runs
SCENES = ["s1_class", "s2_sleepy", "s3_dream", "s4_prince", "s5_talk", "s6_ride", "s7_awake", "s8_study"]
DEMO_VARIANTS = ("demo", "demo-scale0.5", "demo-outline", "demo-captions", "demo-compile")  # demo/sweep.yaml


def snakemake(workdir: Path, *args: str, check: bool = True, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`snakemake ARGS` in `workdir`, offline, without the caller's ModelScope token (`env` adds to it)."""
    env = {**{k: v for k, v in os.environ.items() if k != "MODELSCOPE_API_TOKEN"}, **(env or {})}
    env["HF_HUB_OFFLINE"] = "1"
    proc = subprocess.run([SNAKEMAKE, *args], cwd=workdir, env=env, capture_output=True, text=True, timeout=900)
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    return proc


def job_table(out: str) -> dict[str, int]:
    if "Nothing to be done" in out:
        return {}
    table = out.split("Job stats:")[1]
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+)\s+(\d+)$", table, re.M) if m.group(1) != "total"}


def planned_jobs(workdir: Path, *configfiles: str, base: str = "demo/config.yaml") -> dict[str, int]:
    """Rule -> job count of a dry run with the demo config plus overrides."""
    proc = snakemake(workdir, "-n", "--cores", "2", "--configfile", base, *configfiles)
    return job_table(proc.stdout + proc.stderr)


def copy_workflow(workdir: Path) -> Path:
    workdir.mkdir(parents=True, exist_ok=True)
    for name in WORKFLOW_FILES:
        src = ROOT / name
        (shutil.copytree if src.is_dir() else shutil.copy2)(src, workdir / name)
    return workdir


def shared_dir(workdir: Path, run: str, stage: str) -> Path:
    """A run's keyed job folder under results/shared/, found through its manifest."""
    jobs = json.loads((workdir / "results" / run / "manifest.json").read_text(encoding="utf-8"))["jobs"]
    return workdir / "results/shared" / ("data" if stage == "filter" else stage) / jobs[stage]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory) -> Path:
    workdir = copy_workflow(tmp_path_factory.mktemp("workflow"))
    snakemake(workdir, "--cores", "2", "--configfile", *DEMO_SWEEP)
    return workdir


def override(workdir: Path, name: str, values: dict) -> str:
    path = workdir / f"{name}.yaml"
    # in the order given, as a user edits one value: the resolved config (the manifest's param)
    # keeps the order the user wrote, so reordering the keys of a variant reruns its manifest
    path.write_text(yaml.safe_dump(values, allow_unicode=True, sort_keys=False), encoding="utf-8")
    return path.name


def demo_story(workdir: Path) -> dict:
    return yaml.safe_load((workdir / "demo/config.yaml").read_text(encoding="utf-8"))["story"]


def demo_scenes(workdir: Path) -> list[dict]:
    return demo_story(workdir)["scenes"]


# ---------------------------------------------------------------- outputs
def test_demo_writes_every_output(demo_run):
    out = demo_run / "results" / "demo"
    for name in ["story.png", "contact_sheet.png", "lora/diffsynth_lora.ckpt", "scores.csv", "scores.json", "lora/pytorch_lora_weights.safetensors",
                 "lora/loss.csv", "lora/loss.png", "bundle/README.md", "manifest.json", "config.yaml",
                 "data/filter_stats.json", "data/dropped.png", "timings.png", "lora/comfyui_lora.safetensors",
                 "bundle/pytorch_lora_weights.safetensors", "bundle/diffsynth_lora.ckpt", "bundle/demo_comfyui.safetensors"]:
        assert (out / name).is_file(), name
    assert (shared_dir(demo_run, "demo", "filter") / "dataset/train/metadata.csv").is_file()
    assert sorted(p.stem for p in (out / "scenes").glob("*.png")) == sorted(SCENES)


def test_the_outline_variant_is_written_by_the_local_tiny_qwen_and_rendered(demo_run):
    """demo-outline: its scene prompts written in the run by the prompt writer's local backend
    (resources/tiny/qwen: random weights, the real Qwen tokenizer), offline, then rendered."""
    run = demo_run / "results/demo-outline"
    text = (run / "prompts.yaml").read_text(encoding="utf-8")
    scenes = yaml.safe_load(text)["scenes"]
    assert [s["id"] for s in scenes] == ["o1_garden", "o2_bridge", "o3_home"] and all(s["prompt"] for s in scenes)
    assert scenes[2]["prompt"] == "ink style，古风，水墨画，书院的小院，黄昏"  # written by hand: kept, not sent
    assert "resources/tiny/qwen (run locally through transformers)" in text
    turns = [json.loads(line) for line in (run / "prompt_writer.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(turns) == 1 and turns[0]["request"]["settings"]["backend"] == "local" and not turns[0]["problems"]
    assert "o3_home" not in turns[0]["request"]["messages"][1]["content"]
    resolved = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8"))["story"]
    assert "outline" not in resolved and [s["prompt"] for s in resolved["scenes"]] == [s["prompt"] for s in scenes]
    assert sorted(p.stem for p in (run / "scenes").glob("*.png")) == ["o1_garden", "o2_bridge", "o3_home"]
    assert (run / "story.png").is_file() and json.loads((run / "scores.json").read_text(encoding="utf-8"))["mean"] > 0
    # prompt_writer.variants 2: best-of-N over 2 prompts x 3 seeds; the bundle's recipe holds the winner
    from kolors_story.render.candidates_file import read_record

    record = read_record(run / "candidates/o1_garden")
    assert [c.prompt for c in record.candidates] == [None] * 3 + scenes[0]["alternatives"] * 3
    assert record.recipe().prompt in (scenes[0]["prompt"], *scenes[0]["alternatives"])
    rows = json.loads((run / "bundle/prompts.json").read_text(encoding="utf-8"))["scenes"]
    assert next(r for r in rows if r["id"] == "o1_garden")["prompt"] == record.recipe().prompt
    assert len(read_record(run / "candidates/o3_home").candidates) == 3  # written by hand: one prompt


def test_story_page_and_best_of_three_candidates(demo_run):
    from PIL import Image

    out = demo_run / "results/demo"
    page = Image.open(out / "story.png")
    assert page.width > 2 * 64 and page.height > 4 * 64  # title, captions and margins around panels
    sheet = Image.open(out / "contact_sheet.png")
    assert sheet.width > 3 * 64 and sheet.height > 8 * 64
    from kolors_story.render.candidates_file import read_record

    for scene in SCENES:
        record = read_record(out / "candidates" / scene)
        assert len(record.files) == 3 and record.chosen == int(np.argmax([c.selection_score for c in record.candidates]))
        assert all(c.anchor_similarity is not None for c in record.candidates)  # demo: selection_weight 2
        chosen = np.asarray(Image.open(out / "candidates" / scene / record.files[record.chosen]))
        assert np.array_equal(np.asarray(Image.open(out / "scenes" / f"{scene}.png")), chosen)


def test_filter_stats_show_the_demo_defects_dropped(demo_run):
    stats = json.loads((demo_run / "results/demo/data/filter_stats.json").read_text(encoding="utf-8"))
    ops = {op["op"]: op for op in stats["ops"]}
    assert set(ops) >= {"integrity_check", "image_shape_filter", "image_aspect_ratio_filter", "image_deduplicator"}
    for name, op in ops.items():
        assert op["rows_out"] < op["rows_in"], f"{name} dropped nothing"
    assert len(stats["dropped"]) == stats["rows_in"] - stats["rows_out"]
    kept = (shared_dir(demo_run, "demo", "filter") / "filtered.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(kept) == stats["rows_out"] > 0
    # the variant's copy points at the dropped images from where it lies
    assert all((demo_run / "results/demo/data" / d["image"]).is_file() for d in stats["dropped"]
               if d["op"] != "integrity_check")


def test_scores_match_the_challenge_reference_evaluate(demo_run):
    summary = json.loads((demo_run / "results/demo/scores.json").read_text(encoding="utf-8"))
    reference = reference_evaluate(str(demo_run / "resources/tiny/aesthetic"), str(demo_run / "results/demo/scenes"))
    assert summary["mean"] == pytest.approx(reference, abs=1e-5)
    assert summary["threshold"] == 6.0 and summary["passes"] == (summary["mean"] >= 6.0)
    consistency = summary["consistency"]
    assert set(consistency["characters"]) == {"girl", "prince"}
    assert {"s5_talk.png", "s6_ride.png"} <= {p["a"] for p in consistency["pairs"]} | {p["b"] for p in consistency["pairs"]}
    assert all(-1.0 <= p["similarity"] <= 1.0 for p in consistency["pairs"])
    comparison = summary["consistency_comparison"]  # demo: generate.consistency.compare
    assert len(comparison["pairs"]) == len(consistency["pairs"])
    assert comparison["mean_with"] == pytest.approx(consistency["mean"])
    assert comparison["gain"] == pytest.approx(comparison["mean_with"] - comparison["mean_without"])
    rows = (demo_run / "results/demo/scores.csv").read_text(encoding="utf-8").splitlines()
    assert rows[0] == "image,score" and len(rows) == 1 + len(SCENES)


def test_run_lora_loads_in_a_fresh_stock_pipeline_and_changes_its_output(demo_run):
    import torch
    from diffusers import KolorsPipeline

    # The stock loader on the real layout: Kolors-diffusers ships fp16 files only.
    pipe = KolorsPipeline.from_pretrained(str(demo_run / "resources/tiny/kolors"), variant="fp16")
    kwargs = dict(prompt="古风，水墨画", width=64, height=64, num_inference_steps=3, output_type="np")
    base = pipe(generator=torch.Generator().manual_seed(0), **kwargs).images[0]
    pipe.load_lora_weights(str(demo_run / "results/demo/lora"), weight_name="pytorch_lora_weights.safetensors")
    styled = pipe(generator=torch.Generator().manual_seed(0), **kwargs).images[0]
    assert np.abs(styled - base).max() > 1e-4


def test_bundle_and_manifest_describe_the_run(demo_run):
    out = demo_run / "results/demo"
    card = (out / "bundle/README.md").read_text(encoding="utf-8")
    assert "resources/tiny/kolors" in card and demo_scenes(demo_run)[0]["action"] in card
    assert (out / "bundle/pytorch_lora_weights.safetensors").read_bytes() == \
        (out / "lora/pytorch_lora_weights.safetensors").read_bytes()
    assert "shares attention with character anchors" in card  # every demo scene shows a character
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    assert set(manifest["panels"]) == set(SCENES)
    assert manifest["panels"]["s2_sleepy"]["recipe"]["seed"] == manifest["seeds"]["s2_sleepy_panel"]
    assert set(manifest["models"]) == {"kolors", "aesthetic"}
    assert manifest["cut_texts"] == {"config": [], "captions": []}  # the demo's texts fit ChatGLM
    assert manifest["models"]["kolors"].endswith("resources/tiny/kolors")
    assert manifest["config"]["run"] == "demo" and manifest["seeds"]["s2_sleepy"] == 1
    assert manifest["seeds"]["s2_sleepy_panel"] in {1 + k * 100_003 for k in range(3)}
    assert "MODELSCOPE_API_TOKEN" not in (out / "manifest.json").read_text(encoding="utf-8")


def test_a_demo_panel_renders_again_bit_for_bit_from_its_bundle(demo_run):
    """Two characters' anchors recorded again from their recipes in prompts.json, then the panel's
    batch with attention sharing: the bundle's LoRA, prompts.json and the tiny Kolors only."""
    import torch
    from PIL import Image

    from kolors_story.tools.reproduce import rerender_panel

    bundle = demo_run / "results/demo/bundle"
    rows = {r["id"]: r for r in json.loads((bundle / "prompts.json").read_text(encoding="utf-8"))["scenes"]}
    assert set(rows) == set(SCENES)
    recipe = rows["s5_talk"]
    assert [a["id"] for a in recipe["consistency"]["anchors"]] == ["girl", "prince"]
    assert recipe["batch_seeds"][recipe["batch_index"]] == recipe["seed"] and len(recipe["batch_seeds"]) == 3
    image = rerender_panel(demo_run / "resources/tiny/kolors", bundle, "s5_talk", torch.device("cpu"))
    with Image.open(bundle / "panels/s5_talk.png") as published:
        assert np.array_equal(np.asarray(image), np.asarray(published))


def test_the_resolved_config_in_a_fresh_folder_gives_byte_identical_relocatable_results(demo_run, tmp_path):
    """results/demo/config.yaml rerun in another folder (another depth too) reproduces every output
    (the run's folder and the shared jobs it used) byte for byte but logs and timings, and no
    output holds the folder's absolute path."""
    fresh = copy_workflow(tmp_path / "elsewhere" / "clone")
    shutil.copy2(demo_run / "results/demo/config.yaml", fresh / "resolved.yaml")
    snakemake(fresh, "--cores", "2", "--configfile", "resolved.yaml")
    first, second = demo_run / "results", fresh / "results"
    files = result_files(second)
    for run in ("demo/", ".seals/demo/"):  # the run's outputs and their seals
        assert [f for f in result_files(first) if f.startswith(run)] == [f for f in files if f.startswith(run)]
    assert {f.split("/")[0] for f in files} == {"demo", "shared", ".seals"}
    assert {f.split("/")[1] for f in files if f.startswith(".seals/")} == {"demo", "shared"}
    # The fresh run's shared jobs: a subset of the sweep's, byte for byte; but the one encode job's
    # file holds the texts of the variants of its call (the sweep's: demo-outline's prompts too):
    # there, every text of the fresh file is in the sweep's, bit for bit.
    embeddings = [f for f in files if f.startswith(("shared/embeddings/", ".seals/shared/embeddings/"))]
    assert differing(first, second, [f for f in files if f not in embeddings]) == []
    assert same_embeddings(second, first)
    for root in (first, second):
        holders = [rel for rel in result_files(root)
                   if str(root.parents[0]).encode() in (root / rel).read_bytes() or b"/tmp/" in (root / rel).read_bytes()]
        assert holders == [], f"absolute paths in {holders}"


def same_embeddings(subset: Path, superset: Path) -> bool:
    """Every text of the encode job's file under `subset` (a results/ folder) is in the one under
    `superset` with bitwise-equal tensors."""
    from safetensors import safe_open

    (small,), (large,) = (list(root.glob("shared/embeddings/*/embeddings.safetensors")) for root in (subset, superset))
    with safe_open(str(small), framework="pt") as a, safe_open(str(large), framework="pt") as b:
        return set(a.keys()) < set(b.keys()) and all(a.get_tensor(k).equal(b.get_tensor(k)) for k in a.keys())


def test_the_readme_report_command_works_as_written(demo_run):
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "`snakemake --report report.html`" in readme
    snakemake(demo_run, "--report", "report.html", "--configfile", "demo/config.yaml")
    assert (demo_run / "report.html").stat().st_size > 100_000


# ---------------------------------------------------------------- caching
def test_rerun_does_nothing(demo_run):
    assert planned_jobs(demo_run, *DEMO_SWEEP[1:]) == {}


def test_resolved_config_reproduces_the_run_without_new_jobs(demo_run):
    """results/<run>/config.yaml of a sweep's variant, run in the sweep's folder: the one encode job
    encodes the texts of the variants of its call, so it runs again for this variant's alone (from
    its cache, without ChatGLM); nothing it feeds reruns (they take its file as ancient())."""
    for run in ("demo", "demo-outline", "demo-captions"):  # no writer, no captioner: their words are in results/
        proc = snakemake(demo_run, "-n", "--cores", "1", "--configfile", f"results/{run}/config.yaml")
        assert job_table(proc.stdout + proc.stderr) == {"encode_texts": 1}, run


def test_changing_one_scene_reruns_that_scene_only(demo_run):
    scenes = demo_scenes(demo_run)
    scenes[2] = {**scenes[2], "setting": scenes[2]["setting"] + "，月夜"}
    jobs = planned_jobs(demo_run, override(demo_run, "scene", {"story": {"scenes": scenes}}))
    assert jobs.get("generate_scene") == 1
    assert {"compose_story", "score_images", "bundle", "manifest"} <= set(jobs)
    assert not {"train_lora", "filter_dataset", "build_metadata"} & set(jobs)


def test_editing_one_scene_prompt_encodes_once_and_renders_that_scene_only(demo_run):
    """One encode_texts job per model and precision encodes every text of the run; the scene,
    anchor and training jobs take its file as ancient(): an edited prompt reruns that job and the
    edited scene, not the training, the anchors or any other scene."""
    embeddings = sorted((demo_run / "results/shared/embeddings").iterdir())
    assert len(embeddings) == 1 and (embeddings[0] / "embeddings.safetensors").is_file()  # one job for the sweep
    scenes = demo_scenes(demo_run)
    scenes[4] = {**scenes[4], "action": scenes[4]["action"] + "，手持折扇"}
    jobs = planned_jobs(demo_run, override(demo_run, "prompt", {"story": {"scenes": scenes}}))
    assert jobs.get("encode_texts") == 1 and jobs.get("generate_scene") == 1
    assert not {"train_lora", "render_anchor", "build_metadata"} & set(jobs)


def test_a_prompt_edited_with_another_setting_plans_every_job_either_one_needs(demo_run):
    """The encode job reruns and every job behind its ancient() file still gets its own look
    (src/kolors_story/host/snakemake_ancient.py): unpatched, Snakemake 9 plans the edited scene alone."""
    scenes = demo_scenes(demo_run)
    scenes[4] = {**scenes[4], "action": scenes[4]["action"] + "，手持团扇"}
    both = override(demo_run, "prompt_and_scale", {"story": {"scenes": scenes}, "generate": {"lora_scale": 0.7}})
    jobs = planned_jobs(demo_run, both)
    assert jobs.get("encode_texts") == 1 and jobs.get("generate_scene") == len(SCENES)
    assert jobs.get("render_anchor") == 2 and "train_lora" not in jobs


def test_changing_one_scene_seed_or_size_reruns_that_scene_only(demo_run):
    scenes = demo_scenes(demo_run)
    scenes[5] = {**scenes[5], "seed": 99, "width": 48}
    jobs = planned_jobs(demo_run, override(demo_run, "seed", {"story": {"scenes": scenes}}))
    assert jobs.get("generate_scene") == 1 and "train_lora" not in jobs


def test_changing_a_training_setting_reruns_training_and_every_scene(demo_run):
    jobs = planned_jobs(demo_run, override(demo_run, "train", {"train": {"steps": 41}}))
    assert jobs.get("train_lora") == 1 and jobs.get("generate_scene") == len(SCENES)
    assert "filter_dataset" not in jobs


def test_changing_a_filter_setting_reruns_from_filtering(demo_run):
    ops = [{"image_shape_filter": {"min_width": 70, "min_height": 64}},
           {"image_aspect_ratio_filter": {"min_ratio": 0.5, "max_ratio": 2.0}},
           {"image_deduplicator": {"method": "phash"}}]
    jobs = planned_jobs(demo_run, override(demo_run, "filter", {"filter": {"ops": ops}}))
    assert {"filter_dataset", "build_metadata", "train_lora"} <= set(jobs)
    assert jobs["generate_scene"] == len(SCENES) and "download_dataset" not in jobs


def test_consistency_anchors_are_rendered_once_per_character(demo_run):
    keys = json.loads((demo_run / "results/demo/manifest.json").read_text(encoding="utf-8"))["jobs"]["anchors"]
    anchors = demo_run / "results/shared/anchors"
    for character, key in keys.items():
        assert sorted(p.name for p in (anchors / character).glob(f"{key}.*")) == [f"{key}.png", f"{key}.safetensors"]
    assert sorted(keys) == ["girl", "prince"]
    jobs = planned_jobs(demo_run, override(demo_run, "strength", {"generate": {"consistency": {"strength": 0.5}}}))
    assert "render_anchor" not in jobs and jobs["generate_scene"] == len(SCENES)  # all scenes show someone


def test_changing_a_caption_rerenders_no_scene(demo_run):
    scenes = demo_scenes(demo_run)
    scenes[0] = {**scenes[0], "caption": "第一幕"}
    jobs = planned_jobs(demo_run, override(demo_run, "caption", {"story": {"scenes": scenes}}))
    assert "compose_story" in jobs and "generate_scene" not in jobs


def test_changing_a_character_reruns_exactly_the_scenes_that_show_it(demo_run):
    story = demo_story(demo_run)
    story["characters"]["prince"] += "，黑色披风"
    jobs = planned_jobs(demo_run, override(demo_run, "prince", {"story": story}))
    shows_prince = sum("prince" in s.get("characters", []) for s in story["scenes"])
    assert jobs.get("generate_scene") == shows_prince == 3 and "train_lora" not in jobs


# ---------------------------------------------------------------- refusals at parse time
def test_invalid_config_is_refused_naming_the_key(demo_run):
    bad = override(demo_run, "bad", {"train": {"steps": -1}})
    proc = snakemake(demo_run, "-n", "--configfile", "demo/config.yaml", bad, check=False)
    assert proc.returncode != 0 and "train.steps" in proc.stdout + proc.stderr


def test_missing_model_folder_is_refused_naming_the_key(demo_run):
    bad = override(demo_run, "nomodel", {"models": {"kolors": "/nonexistent/kolors"}})
    proc = snakemake(demo_run, "-n", "--configfile", "demo/config.yaml", bad, check=False)
    assert proc.returncode != 0 and "models.kolors" in proc.stdout + proc.stderr


def test_upload_without_token_fails_before_any_job(demo_run):
    up = override(demo_run, "upload", {"upload": {"enabled": True, "repo_id": "me/ink-lora"}})
    proc = snakemake(demo_run, "--cores", "1", "--configfile", "demo/config.yaml", up, check=False)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "MODELSCOPE_API_TOKEN" in output
    assert "rule " not in output  # nothing was scheduled


# ---------------------------------------------------------------- LoRA interop
def test_run_exports_a_diffsynth_lora_that_imports_back_as_the_same_lora(demo_run):
    from safetensors.torch import load_file

    out = demo_run / "results/demo/lora"
    assert (out / "diffsynth_lora.ckpt").is_file()
    # our own export has its scale folded in: scale 1 (diffsynth_alpha null) imports it as it is
    use = override(demo_run, "use", {"run": "imported", "train": {"use_lora": str(out / "diffsynth_lora.ckpt"),
                                                                  "diffsynth_alpha": None}})
    jobs = planned_jobs(demo_run, use)  # no validation texts now: encode_texts reruns, the import is still planned
    assert jobs.get("import_lora") == 1 and "train_lora" not in jobs
    snakemake(demo_run, "results/imported/lora/pytorch_lora_weights.safetensors", "--cores", "1",
              "--configfile", "demo/config.yaml", use)
    imported = load_file(demo_run / "results/imported/lora/pytorch_lora_weights.safetensors")
    trained = load_file(out / "pytorch_lora_weights.safetensors")
    assert imported.keys() == trained.keys()
    assert all(np.allclose(imported[k].numpy(), trained[k].numpy(), rtol=0, atol=1e-7) for k in trained)


# ---------------------------------------------------------------- sweeps
def test_the_demo_sweep_shares_one_data_chain_and_one_training(demo_run):
    """demo, demo-scale0.5, demo-outline and demo-compile differ after training: one filter, one
    LoRA. The captioned variant shares the filter and trains on its own captions."""
    manifests = {v: json.loads((demo_run / f"results/{v}/manifest.json").read_text(encoding="utf-8"))
                 for v in DEMO_VARIANTS}
    jobs = {v: m["jobs"] for v, m in manifests.items()}
    assert len({j["filter"] for j in jobs.values()}) == 1
    assert len({jobs[v]["lora"] for v in ("demo", "demo-scale0.5", "demo-outline", "demo-compile")}) == 1
    assert jobs["demo-captions"]["lora"] != jobs["demo"]["lora"] and jobs["demo-captions"]["captions"]
    assert "captions" not in jobs["demo"]  # caption.backend none: the job plan of before
    assert set(jobs["demo"]["scenes"].values()).isdisjoint(jobs["demo-scale0.5"]["scenes"].values())
    assert len(list((demo_run / "results/shared/lora").iterdir())) == 2
    assert (demo_run / "results/demo/lora/pytorch_lora_weights.safetensors").read_bytes() == \
        (demo_run / "results/demo-scale0.5/lora/pytorch_lora_weights.safetensors").read_bytes()
    assert manifests["demo-scale0.5"]["config"]["generate"]["lora_scale"] == 0.5


def test_the_compiled_variant_renders_the_demo_panels(demo_run):
    """demo-compile: the demo's first scene, its LoRA and anchor recipe, the UNet of the anchor and
    scene jobs through torch.compile (aot_eager): the demo's eager panel, within one uint8 level per
    pixel (tests/render/test_compile.py's tolerance), from jobs of its own."""
    jobs = {v: json.loads((demo_run / f"results/{v}/manifest.json").read_text(encoding="utf-8"))["jobs"]
            for v in ("demo", "demo-compile")}
    assert set(jobs["demo-compile"]["scenes"]) == {"s1_class"}
    assert jobs["demo-compile"]["scenes"]["s1_class"] != jobs["demo"]["scenes"]["s1_class"]
    assert jobs["demo-compile"]["anchors"]["girl"] != jobs["demo"]["anchors"]["girl"]
    compiled, eager = (np.asarray(Image.open(demo_run / f"results/{v}/scenes/s1_class.png")).astype(int)
                       for v in ("demo-compile", "demo"))
    assert compiled.shape == eager.shape and np.abs(compiled - eager).max() <= 1
    logs = list((demo_run / "results/shared/logs/generate_scene").rglob("*.log"))
    assert any("torch.compile of the UNet (aot_eager)" in log.read_text(encoding="utf-8") for log in logs)


def test_leaderboard_ranks_every_variant_by_its_scores(demo_run):
    import csv

    with open(demo_run / "results/leaderboard.csv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    means = {v: json.loads((demo_run / f"results/{v}/scores.json").read_text(encoding="utf-8"))["mean"]
             for v in DEMO_VARIANTS}
    assert [r["variant"] for r in rows] == sorted(means, key=lambda v: -means[v])
    assert [float(r["mean_score"]) for r in rows] == sorted(means.values(), reverse=True)
    assert [r["best"] for r in rows] == ["True"] + ["False"] * 4
    assert [r["rank"] for r in rows] == ["1", "2", "3", "4", "5"]
    assert {r["variant"]: r["generate.lora_scale"] for r in rows} == {
        "demo": "1.0", "demo-scale0.5": "0.5", "demo-outline": "1.0", "demo-captions": "1.0", "demo-compile": "1.0"}
    assert all(r["passes"] == str(float(r["mean_score"]) >= 6.0) for r in rows)
    from PIL import Image

    with Image.open(demo_run / "results/leaderboard.png") as picture:
        assert picture.height > 3 * 200  # a row with a story thumbnail per variant


def test_a_generation_only_grid_of_four_plans_one_training(tmp_path):
    workdir = copy_workflow(tmp_path / "fresh")
    grid = override(workdir, "grid", {"sweep": [{"grid": {"generate.lora_scale": [0.5, 1.0],
                                                          "generate.guidance_scale": [3.0, 5.0]}}]})
    jobs = planned_jobs(workdir, grid)
    assert jobs["train_lora"] == 1 and jobs["filter_dataset"] == 1 and jobs["download_dataset"] == 1
    assert jobs["compose_story"] == 4 and jobs["compare_runs"] == 1 and jobs["generate_scene"] == 4 * len(SCENES)
    rank = override(workdir, "rank", {"sweep": [{"grid": {"train.rank": [8, 16, 32]}}]})
    jobs = planned_jobs(workdir, rank)
    assert jobs["train_lora"] == 3 and jobs["filter_dataset"] == 1 and jobs["build_metadata"] == 1


def planned_outputs(workdir: Path, *configfiles: str) -> list[str]:
    """Every output file a dry run plans."""
    proc = snakemake(workdir, "-n", "--cores", "2", "--configfile", *configfiles)
    return [f.strip() for line in re.findall(r"^\s+output: (.*)$", proc.stdout, re.M) for f in line.split(",")]


def test_editing_one_variant_reruns_that_variant_only(demo_run):
    sweep = yaml.safe_load((demo_run / "demo/sweep.yaml").read_text(encoding="utf-8"))["sweep"]
    sweep = [{**v, "generate": {"lora_scale": 0.6}} if v["name"] == "demo-scale0.5" else v for v in sweep]
    edited = override(demo_run, "edited", {"sweep": sweep})
    outputs = planned_outputs(demo_run, "demo/config.yaml", edited)
    assert outputs and not [f for f in outputs if f.startswith("results/demo/")]
    assert {f.split("/")[1] for f in outputs} == {"demo-scale0.5", "shared", "leaderboard.csv", "leaderboard.png"}
    shared = {f.split("/")[2] for f in outputs if f.startswith("results/shared/")}
    assert shared == {"anchors", "scenes"}  # no data, no training: only the edited variant's images
    jobs = planned_jobs(demo_run, edited)
    assert jobs["generate_scene"] == len(SCENES) and "train_lora" not in jobs and jobs["compare_runs"] == 1


def test_a_bad_variant_is_refused_at_parse_time_naming_it_and_the_key(demo_run):
    bad = override(demo_run, "badvariant", {"sweep": [{"name": "big", "train": {"rank": 0}}]})
    proc = snakemake(demo_run, "-n", "--configfile", "demo/config.yaml", bad, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "sweep variant 'big'" in out and "train.rank" in out


def test_the_sweep_report_opens_in_a_browser_with_its_leaderboard_first(demo_run):
    from report_browser import browser_missing_reason, inspect_report, report_problems

    snakemake(demo_run, "--report", "report.html", "--configfile", *DEMO_SWEEP)
    if reason := browser_missing_reason():
        pytest.skip(reason)
    shot = demo_run / "results/report_leaderboard.png"
    for category in ("demo-scale0.5", "★ Leaderboard"):  # the screenshot kept is the leaderboard's
        found = inspect_report(demo_run / "report.html", shot, category)
        assert report_problems(found) == [], category
    assert shot.is_file() and shot.stat().st_size > 10_000


# ---------------------------------------------------------------- benchmarks that need the demo
def test_job_fixed_cost_benchmark_splits_a_scene_job_into_fixed_and_work(demo_run, tmp_path):
    """bench/job_fixed_cost.py --smoke on a copy of the demo (it forces a scene job again)."""
    work = tmp_path / "demo"
    shutil.copytree(demo_run, work, symlinks=True)
    out = tmp_path / "job_fixed_cost.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench/job_fixed_cost.py"), "--smoke", "--workdir", str(work),
                           "--out", str(out)], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    scene = json.loads(out.read_text(encoding="utf-8"))["generate_scene"]
    assert scene["fixed"] > 0 and scene["work"] > 0 and scene["first_call"]
    assert "goal: a demo scene job's fixed cost" in proc.stdout


# ---------------------------------------------------------------- damaged artifacts never travel on
def damaged_rerun(work: Path, *targets: str) -> str:
    proc = snakemake(work, *targets, "--cores", "2", "--configfile", *DEMO_SWEEP, check=False)
    assert proc.returncode != 0, proc.stdout[-2000:]
    return proc.stdout + proc.stderr


def test_a_damaged_artifact_stops_its_consumer_naming_the_file_and_the_remake(demo_run, tmp_path):
    work = tmp_path / "demo"
    shutil.copytree(demo_run, work, symlinks=True)
    # the run's LoRA cut in half: the bundle refuses it (and its old folder is gone, not shipped)
    lora = "results/demo/lora/pytorch_lora_weights.safetensors"
    good = (work / lora).read_bytes()
    (work / lora).write_bytes(good[: len(good) // 2])
    out = damaged_rerun(work, "results/demo/bundle")
    assert f"{lora}: truncated: {len(good) // 2} of {len(good)} bytes" in out
    assert f"remake it (made by rule copy_lora): snakemake -R {lora}" in out
    assert not (work / "results/demo/bundle").exists()
    snakemake(work, "results/demo/bundle", "-R", lora, "--cores", "2", "--configfile", *DEMO_SWEEP)
    assert (work / "results/demo/bundle/pytorch_lora_weights.safetensors").read_bytes() == good
    # a shared anchor with one flipped bit: the scene jobs that share its attention refuse it
    anchor = next((work / "results/shared/anchors/prince").glob("*.safetensors"))
    raw = bytearray(anchor.read_bytes())
    raw[-3] ^= 0x01
    anchor.write_bytes(bytes(raw))
    out = damaged_rerun(work, "results/demo/scenes/s4_prince.png")
    assert f"{anchor.relative_to(work)}: changed since its job: its sha256 is not the one recorded" in out
    assert "made by rule render_anchor" in out
    # a shared panel replaced by another picture: its variant copy refuses it
    s1, s2 = (next((work / f"results/shared/scenes/{s}").glob("*/panel.png")) for s in ("s1_class", "s2_sleepy"))
    shutil.copyfile(s2, s1)
    out = damaged_rerun(work, "results/demo/scenes/s1_class.png", "results/demo-scale0.5/scenes/s1_class.png")
    assert f"{s1.relative_to(work)}: " in out and "made by rule generate_scene" in out
    # the shared LoRA cut: the variant copy refuses it, naming the training that remakes it
    shared_lora = next((work / "results/shared/lora").glob("*/pytorch_lora_weights.safetensors"))
    shared_lora.write_bytes(good[: len(good) // 3])
    out = damaged_rerun(work, "results/demo-scale0.5/lora/pytorch_lora_weights.safetensors")
    assert f"{shared_lora.relative_to(work)}: truncated" in out and "made by rule train_lora" in out
    # the prompt writer's scenes edited behind its back: refused when the workflow is parsed
    written = next((work / "results/shared/prompts").glob("*/scenes.yaml"))
    same_size = written.read_text(encoding="utf-8").replace("o2_bridge", "o2_bridgE")  # one changed byte
    written.write_text(same_size, encoding="utf-8")
    proc = snakemake(work, "-n", "--configfile", *DEMO_SWEEP, check=False)
    assert proc.returncode != 0 and f"{written.relative_to(work)}: changed since its job" in proc.stdout + proc.stderr


# ---------------------------------------------------------------- scenes written from an outline
LLM_KEY = "sk-kolors-test-0123456789-never-written"
OUTLINE = [{"id": "s1_class", "description": "坐在书院教室里认真听讲，上半身", "characters": ["girl"]},
           {"id": "s5_talk", "description": "站在桃花小路旁微笑交谈，上半身", "characters": ["girl", "prince"]}]


def outline_override(work: Path, url: str, outline: list[dict]) -> str:
    """The demo as a two-line outline (story.scenes: null turns the base's scenes off), written by
    the local OpenAI-compatible server at `url` with the key in KOLORS_TEST_LLM_KEY."""
    return override(work, "outline", {"run": "outlined", "story": {"scenes": None, "outline": outline},
                                      "prompt_writer": {"base_url": url, "api_key_env": "KOLORS_TEST_LLM_KEY"}})


def test_an_outline_is_written_into_scenes_inside_the_dag_and_an_edited_line_renders_its_scene_only(
        demo_run, tmp_path, httpserver, monkeypatch):
    from llm_stub import answer

    work = tmp_path / "demo"
    shutil.copytree(demo_run, work, symlinks=True)
    monkeypatch.setenv("KOLORS_TEST_LLM_KEY", LLM_KEY)
    httpserver.expect_request("/v1/chat/completions", method="POST").respond_with_handler(answer)
    url = httpserver.url_for("/v1")
    outline = outline_override(work, url, OUTLINE)
    snakemake(work, "--cores", "2", "--configfile", "demo/config.yaml", outline)
    run = work / "results/outlined"
    written = yaml.safe_load((run / "prompts.yaml").read_text(encoding="utf-8"))["scenes"]
    assert [s["id"] for s in written] == ["s1_class", "s5_talk"] and len(httpserver.log) == 1
    assert "一个黑色长发少女" in written[1]["prompt"] and "一位身穿银色盔甲的年轻王子" in written[1]["prompt"]
    resolved = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8"))["story"]
    assert "outline" not in resolved and [s["prompt"] for s in resolved["scenes"]] == [s["prompt"] for s in written]
    assert sorted(p.stem for p in (run / "scenes").glob("*.png")) == ["s1_class", "s5_talk"]
    assert len((run / "prompt_writer.jsonl").read_text(encoding="utf-8").splitlines()) == 1
    # the key comes from the environment only: no file of the run, its logs, caches or report holds it
    snakemake(work, "--report", "report.html", "--configfile", "demo/config.yaml", outline)
    assert (work / "report.html").is_file()
    assert [p for p in work.rglob("*") if p.is_file() and LLM_KEY.encode() in p.read_bytes()] == []
    # unchanged: nothing planned; reproduced from results/: nothing planned, the writer not even needed
    assert planned_jobs(work, outline) == {}
    proc = snakemake(work, "-n", "--cores", "1", "--configfile", "results/outlined/config.yaml")
    assert "Nothing to be done" in proc.stdout + proc.stderr and len(httpserver.log) == 1
    # one outline line edited: the writer asks once more, and only that scene renders again
    outline = outline_override(work, url, [OUTLINE[0], {**OUTLINE[1], "description": "站在桃花小路旁手持折扇，上半身"}])
    snakemake(work, "--cores", "2", "--configfile", "demo/config.yaml", outline, "--until", "write_prompts")
    assert len(httpserver.log) == 2
    jobs = planned_jobs(work, outline)
    assert jobs.get("generate_scene") == 1 and jobs.get("encode_texts") == 1
    assert not {"write_prompts", "train_lora", "render_anchor", "build_metadata"} & set(jobs)


# ---------------------------------------------------------------- captions written in the DAG
def caption_logs(work: Path) -> dict[str, str]:
    return {p.stem: p.read_text(encoding="utf-8") for p in (work / "results/shared/logs/caption_images").glob("*.log")}


def captions_variant(**changes) -> dict:
    """demo/sweep.yaml's demo-captions variant, with `changes` merged into it."""
    sweep = yaml.safe_load((ROOT / "demo/sweep.yaml").read_text(encoding="utf-8"))["sweep"]
    variant = next(v for v in sweep if v["name"] == "demo-captions")
    return {**variant, **{k: {**variant.get(k, {}), **v} for k, v in changes.items()}}


def test_captions_land_in_metadata_and_only_what_changed_is_captioned_again(demo_run, tmp_path):
    """demo-captions: the tiny BLIP through Data-Juicer's op in rule caption_images; the captions are
    the training texts; a template edit rebuilds the training folder from the cache; a dataset with
    one more image sends that one image."""
    run = demo_run / "results/demo-captions"
    records = [json.loads(line) for line in (run / "data/captions.jsonl").read_text(encoding="utf-8").splitlines()]
    generated = [r for r in records if r["source"] != "user"]
    assert generated and all(r["model"] == "resources/tiny/blip" and r["text"].startswith("ink style") for r in generated)
    assert {r["source"] for r in records} <= {"user", "generated", "fallback"} and len(records) > len(generated)
    page = (run / "data/captions.html").read_text(encoding="utf-8")
    assert page.count("data:image/jpeg;base64,") == len(records) and generated[0]["image"] in page
    jobs = json.loads((run / "manifest.json").read_text(encoding="utf-8"))["jobs"]
    import csv

    with open(demo_run / f"results/shared/data/{jobs['captions']}/dataset/train/metadata.csv", encoding="utf-8") as f:
        assert {r["file_name"]: r["text"] for r in csv.DictReader(f)} == {f"{r['id']}.jpg": r["text"] for r in records}
    assert "1 image(s) sent to the captioner" in caption_logs(demo_run)[jobs["captions"]]
    report = tmp_path / "report.html"  # the captions page is in the run's report
    snakemake(demo_run, "--report", str(report), "--configfile", *DEMO_SWEEP)
    assert "captions.html" in report.read_text(encoding="utf-8", errors="replace")

    work = tmp_path / "demo"
    shutil.copytree(demo_run, work, symlinks=True)
    # the template edited: a new caption job answered from the cache, the training folder rebuilt
    edited = override(work, "template", {"sweep": [captions_variant(caption={"template": "{caption}，{trigger}"})]})
    planned = planned_jobs(work, edited)
    assert planned.get("caption_images") == 1 and planned.get("build_metadata") == 1 and planned.get("train_lora") == 1
    assert not {"download_dataset", "filter_dataset", "build_tiny_captioner"} & set(planned)
    before = set(caption_logs(work))
    snakemake(work, "--cores", "2", "--configfile", "demo/config.yaml", edited, "--until", "build_metadata")
    (new,) = set(caption_logs(work)) - before
    assert "0 image(s) sent to the captioner" in caption_logs(work)[new]
    # the same images in a folder of the user's, and one more: that one image is captioned
    shutil.copytree(work / "resources/demo/dataset", work / "mine")
    Image.fromarray(np.random.default_rng(7).integers(0, 255, (96, 128, 3), dtype=np.uint8)).save(work / "mine/new.png")
    mine = override(work, "mine", {"sweep": [captions_variant(dataset={"path": "mine"})]})
    before = set(caption_logs(work))
    snakemake(work, "--cores", "2", "--configfile", "demo/config.yaml", mine, "--until", "caption_images")
    (new,) = set(caption_logs(work)) - before
    assert "1 image(s) sent to the captioner" in caption_logs(work)[new]
    assert planned_jobs(work, mine, "--until", "caption_images") == {}


# ---------------------------------------------------------------- the upload, last (see its docstring)
def test_the_upload_rule_sends_the_bundle_byte_for_byte_to_a_hub_double(demo_run, tmp_path):
    """The upload rule with the real modelscope client against the hub double (tests/modelscope_double.py):
    every bundle file arrives as it is, the token is in no log, and a rerun uploads nothing again.
    Last in this file: a run of one variant rewrites the shared encode job's texts (its param), so
    the sweep's plans that earlier tests check would change after it."""
    from modelscope_double import HubState, start_hub

    token = "ms-workflow-0123456789abcdef-secret"
    state = HubState(tokens={token: ("alice", {"alice"})})
    server, endpoint = start_hub(state)
    env = {"MODELSCOPE_API_TOKEN": token, "MODELSCOPE_ENDPOINT": endpoint,
           "MODELSCOPE_HOME": str(tmp_path / "mshome"), "MODELSCOPE_CACHE": str(tmp_path / "mscache")}
    up = override(demo_run, "uploaded", {"run": "uploaded", "upload": {"enabled": True, "repo_id": "alice/ink"}})
    try:
        snakemake(demo_run, "results/uploaded/upload.json", "--cores", "1", "--configfile", "demo/config.yaml", up, env=env)
        bundle = demo_run / "results/uploaded/bundle"
        sent = {p.relative_to(bundle).as_posix(): p.read_bytes() for p in sorted(bundle.rglob("*")) if p.is_file()}
        assert state.repos["alice/ink"] == sent and "pytorch_lora_weights.safetensors" in sent
        for log in (demo_run / "results/uploaded/logs").glob("*.log"):
            assert token not in log.read_text(encoding="utf-8"), log
        commits = len(state.commits)
        again = snakemake(demo_run, "results/uploaded/upload.json", "--cores", "1", "--configfile", "demo/config.yaml",
                          up, env=env)
        assert "Nothing to be done" in again.stdout + again.stderr and len(state.commits) == commits
    finally:
        server.shutdown()
        server.server_close()
