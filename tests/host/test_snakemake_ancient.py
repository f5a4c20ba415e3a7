"""src/kolors_story/host/snakemake_ancient.py on the real Snakemake, on a two-rule workflow shaped like
ours: `encode` feeds `render` through an ancient() input, and both change in one edit."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))

WORKFLOW = '''
{fix}

rule all:
    input: "render.txt"

rule encode:
    output: "encode.txt"
    params: texts=config["texts"]
    run:
        Path(output[0]).write_text(str(params.texts))

rule render:
    input: ancient("encode.txt")
    output: "render.txt"
    params: scale=config["scale"]
    run:
        Path(output[0]).write_text(str(params.scale))
'''
FIX = "from kolors_story.host import snakemake_ancient\nsnakemake_ancient.apply()"


def planned(workdir: Path, **config: str) -> set[str]:
    args = [f"{k}={v}" for k, v in config.items()]
    proc = subprocess.run([SNAKEMAKE, "-n", "--cores", "1", "--config", *args], cwd=workdir,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {rule for rule in ("encode", "render") if f"rule {rule}:" in proc.stdout + proc.stderr}


def workflow(tmp_path: Path, fix: bool) -> Path:
    (tmp_path / "Snakefile").write_text("from pathlib import Path\n" + WORKFLOW.format(fix=FIX if fix else ""),
                                        encoding="utf-8")
    subprocess.run([SNAKEMAKE, "--cores", "1", "--config", "texts=a", "scale=1"], cwd=tmp_path,
                   check=True, capture_output=True, timeout=300)
    return tmp_path


@pytest.mark.parametrize("fix", [True, False], ids=["fixed", "snakemake-as-is"])
def test_a_job_behind_an_ancient_input_is_planned_when_its_producer_reruns(tmp_path, fix):
    work = workflow(tmp_path, fix)
    assert planned(work, texts="a", scale="1") == set()  # no-op
    assert planned(work, texts="a", scale="2") == {"render"}
    assert planned(work, texts="b", scale="1") == {"encode"}  # ancient(): encode's rerun reruns no reader
    both = planned(work, texts="b", scale="2")
    if fix:
        assert both == {"encode", "render"}
    else:  # the upstream defect the fix is for; when this fails, Snakemake fixed it: drop the fix
        assert both == {"encode"}


def test_the_fix_applies_to_the_installed_snakemake():
    from kolors_story.host import snakemake_ancient

    assert snakemake_ancient.apply() and snakemake_ancient.apply()  # idempotent
