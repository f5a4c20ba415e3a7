"""Every failure of a rule's script reaches the rule's log, run by real Snakemake: an unexpected
exception leaves its full traceback in the log and one line on the console; a UserError stays a
message without a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))
SNAKEFILE = """
rule crash:
    output: "crash.txt"
    log: "logs/crash.log"
    script: "crash.py"

rule refuse:
    output: "refuse.txt"
    log: "logs/refuse.log"
    script: "refuse.py"
"""
CRASH = """
from kolors_story.host.rule_runner import run_rule

def main(snakemake):
    open("captions.txt", "wb").write("水墨画".encode("gbk"))
    open("captions.txt", encoding="utf-8").read()  # the raw error of a GBK caption file

run_rule(main, snakemake)
"""
REFUSE = """
from kolors_story.errors import UserError
from kolors_story.host.rule_runner import run_rule

def main(snakemake):
    raise UserError("dataset.path: folder ./nope does not exist; set dataset.path to your images")

run_rule(main, snakemake)
"""


@pytest.fixture(scope="module")
def workflow(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("rule_runner")
    (root / "Snakefile").write_text(SNAKEFILE)
    (root / "crash.py").write_text(CRASH)
    (root / "refuse.py").write_text(REFUSE)
    return root


def run(root: Path, target: str) -> str:
    proc = subprocess.run([SNAKEMAKE, "--cores", "1", target], cwd=root, capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert proc.returncode != 0
    return proc.stdout + proc.stderr


def test_an_unexpected_exception_puts_its_traceback_in_the_log_and_one_line_on_the_console(workflow):
    console = run(workflow, "crash.txt")
    log = (workflow / "logs/crash.log").read_text(encoding="utf-8")
    assert "Traceback (most recent call last)" in log and "UnicodeDecodeError" in log
    assert 'crash.py", line' in log  # the frame that raised
    line = "rule crash failed: UnicodeDecodeError: 'utf-8' codec can't decode byte"
    assert line in console and "(full traceback in logs/crash.log)" in console
    assert "Traceback (most recent call last)" not in console


def test_a_user_error_is_a_message_without_a_traceback(workflow):
    console = run(workflow, "refuse.txt")
    log = (workflow / "logs/refuse.log").read_text(encoding="utf-8")
    assert "dataset.path: folder ./nope does not exist" in log and "dataset.path" in console
    assert "Traceback" not in log and "Traceback (most recent call last)" not in console
