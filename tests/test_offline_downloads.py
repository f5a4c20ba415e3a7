"""A host without network: the real run (default config.yaml, `--cores 1 --resources gpu=1`) fails
once, in seconds, naming every hub download it still needs, with its folder and config key, the same
list whichever download job fails first (issue 30). The real modelscope client fails against a
closed port, so no test can start a 17 GB download on a host that does have network."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import yaml
from closed_endpoint import CLOSED_ENDPOINT
from workflow_copy import copy_workflow

from kolors_story.modelscope_endpoint import HubDownload, StillNeeded

SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))
KOLORS, SCORER = "Kwai-Kolors/Kolors-diffusers", "AI-ModelScope/aesthetics-predictor-v2-sac-logos-ava1-l14-linearMSE"
DEFAULT_NEEDS = {  # id -> (folder, config key)
    KOLORS: (f"resources/modelscope/{KOLORS}", "models.kolors"),
    SCORER: (f"resources/modelscope/{SCORER}", "models.aesthetic"),
    "AI-ModelScope/lowres_anime": ("resources/datasets/AI-ModelScope/lowres_anime", "dataset.path"),
}


def offline_run(folder: Path, *args: str) -> tuple[subprocess.CompletedProcess, float]:
    """The user's command in a copy of the workflow, offline; (the process, its seconds)."""
    copy_workflow(folder)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MODELSCOPE_ENDPOINT": CLOSED_ENDPOINT,
           "MODELSCOPE_CACHE": str(folder / "mscache")}
    started = time.monotonic()
    proc = subprocess.run([SNAKEMAKE, "--cores", "1", "--resources", "gpu=1", *args], cwd=folder, env=env,
                          capture_output=True, text=True, timeout=120)
    return proc, time.monotonic() - started


def needed_lines(out: str) -> list[str]:
    """The list's lines of the first failure's message."""
    lines = []
    for line in out[out.index("This run still needs"):].splitlines()[1:]:
        if not line.startswith("  - "):
            return lines
        lines.append(line[4:])
    return lines


def assert_names_every_download(proc: subprocess.CompletedProcess, seconds: float, needs: dict) -> list[str]:
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and seconds < 20, (seconds, out[-3000:])
    assert len(re.findall(r"^Error in rule download_", out, re.M)) == 1, out[-3000:]  # failed once, no retry
    assert f"cannot connect to {CLOSED_ENDPOINT}" in out
    lines = needed_lines(out)
    assert f"This run still needs {len(needs)} download(s)" in out and len(lines) == len(needs), lines
    for repo_id, (folder, key) in needs.items():
        line = next(line for line in lines if f" {repo_id} -> {folder} " in line)
        kind = "dataset" if key.startswith("dataset.") else "model"
        assert line.startswith(kind) and key in line, line
        assert line.endswith(f"modelscope download{' --repo-type dataset' if kind == 'dataset' else ''} "
                             f"{repo_id} --local-dir {folder}"), line
    return lines


def test_the_default_run_offline_fails_once_naming_every_download_whichever_job_fails_first(tmp_path):
    first, seconds = offline_run(tmp_path)
    lines = assert_names_every_download(first, seconds, DEFAULT_NEEDS)
    dataset_first, seconds = offline_run(tmp_path, "--until", "download_dataset")
    assert "Error in rule download_dataset" in dataset_first.stdout + dataset_first.stderr
    assert assert_names_every_download(dataset_first, seconds, DEFAULT_NEEDS) == lines


def test_a_captioner_and_a_local_prompt_writer_are_named_with_their_keys(tmp_path):
    (tmp_path / "extra.yaml").write_text(yaml.safe_dump({
        "caption": {"backend": "data_juicer", "model": "Salesforce/blip-image-captioning-base"},
        "prompt_writer": {"backend": "local", "model": "Qwen/Qwen2.5-1.5B-Instruct"},
        "story": {"scenes": None, "outline": [{"id": "o1_garden", "description": "在桃花园中读书的少女"},
                                              {"id": "o2_bridge", "description": "黄昏时的小桥流水"}]},
    }, allow_unicode=True), encoding="utf-8")
    proc, seconds = offline_run(tmp_path, "--configfile", "config.yaml", "extra.yaml")
    assert_names_every_download(proc, seconds, {
        **DEFAULT_NEEDS,
        "Salesforce/blip-image-captioning-base": ("resources/modelscope/Salesforce/blip-image-captioning-base", "caption.model"),
        "Qwen/Qwen2.5-1.5B-Instruct": ("resources/modelscope/Qwen/Qwen2.5-1.5B-Instruct", "prompt_writer.model"),
    })


def test_what_is_there_is_not_named_and_the_list_is_no_rerun_trigger(tmp_path):
    """A model folder carried over is left out; the list is a param Snakemake does not compare, so
    a download finished since reruns no job that carried it (persistence._serialize_param)."""
    from snakemake.persistence import UNREPRESENTABLE, PersistenceBase

    (tmp_path / f"resources/modelscope/{SCORER}").mkdir(parents=True)
    proc, seconds = offline_run(tmp_path, "--until", "download_dataset")  # not prepare_model's check of it
    assert_names_every_download(proc, seconds, {k: v for k, v in DEFAULT_NEEDS.items() if k != SCORER})
    needed = StillNeeded([HubDownload("model", KOLORS, f"resources/modelscope/{KOLORS}", "models.kolors")])
    assert PersistenceBase._serialize_param_builtin(None, needed) is UNREPRESENTABLE


def test_a_dataset_counts_as_downloaded_by_the_key_its_download_job_writes_under():
    """rules/common.smk leaves the dataset off the list once results/shared/download/<download_key>/rows.jsonl is there."""
    from kolors_story.plan.config import load_schema, validate_config
    from kolors_story.plan.job_plan import download_key, plan_jobs

    root = Path(__file__).resolve().parents[1]
    config = validate_config(yaml.safe_load((root / "config.yaml").read_text(encoding="utf-8")),
                             load_schema(root / "schemas/config.schema.yaml"))
    assert download_key(config) == plan_jobs({"run": config}).variants["run"].download
