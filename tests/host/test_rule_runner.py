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

rule full:
    output: "full.txt"
    log: "logs/full.log"
    script: "full.py"

rule interrupt:
    output: "interrupt.txt"
    log: "logs/interrupt.log"
    script: "interrupt.py"

rule make:
    output: "made/lora.safetensors"
    log: "logs/make.log"
    script: "make.py"

rule use:
    input: "made/lora.safetensors"
    output: "used.txt"
    log: "logs/use.log"
    script: "use.py"
"""
SCRIPTS = {
    # torch.save's zip writer on a full disk says nothing about space
    "full.py": 'raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 40763 vs 40720")',
    # Ctrl-C as a terminal sends it; Python's own handler set again, since a suite started in the
    # background (`cmd &` without job control) inherits SIGINT ignored and the kill would do nothing
    "interrupt.py": ("import os, signal\n    signal.signal(signal.SIGINT, signal.default_int_handler)\n"
                     "    open(snakemake.output[0], 'w').write('half')\n    os.kill(os.getpid(), signal.SIGINT)"),
    "make.py": "import torch; from safetensors.torch import save_file\n    save_file({'w': torch.ones(64)}, snakemake.output[0])",
    "use.py": "open(snakemake.output[0], 'w').write('ok')",
}
SCRIPT = """
from kolors_story.host.rule_runner import run_rule

def main(snakemake):
    {body}

run_rule(main, snakemake)
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
    for name, body in SCRIPTS.items():
        (root / name).write_text(SCRIPT.format(body=body))
    return root


def run(root: Path, target: str, fails: bool = True, *args: str) -> str:
    proc = subprocess.run([SNAKEMAKE, "--cores", "1", target, *args], cwd=root, capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert (proc.returncode != 0) == fails, proc.stdout + proc.stderr
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


def test_a_full_disk_is_one_line_naming_the_filesystem_and_its_free_space(workflow):
    console = run(workflow, "full.txt")
    log = (workflow / "logs/full.log").read_text(encoding="utf-8")
    for text in (console, log):
        assert "rule full failed: no space left on /" in text and " free; free some space there" in text
    assert "Traceback" not in log and "Traceback (most recent call last)" not in console


def test_ctrl_c_is_one_line_and_the_half_output_is_removed(workflow):
    console = run(workflow, "interrupt.txt")
    assert "rule interrupt interrupted; its unfinished outputs are removed" in console
    assert "KeyboardInterrupt" not in console and "Traceback" not in console
    assert not (workflow / "interrupt.txt").exists()


def test_a_damaged_input_stops_its_consumer_naming_the_file_and_the_fix(workflow):
    run(workflow, "used.txt", fails=False)
    lora = workflow / "made/lora.safetensors"
    # seals mirror the outputs under their top folder (made/.seals/), or sit in .seals/ beside them
    assert (workflow / "made/.seals/lora.safetensors.seal.json").is_file()
    assert (workflow / ".seals/used.txt.seal.json").is_file()
    size = lora.stat().st_size
    lora.write_bytes(lora.read_bytes()[:100])  # cut after its job: Snakemake sees a newer input
    console = run(workflow, "used.txt")
    line = (f"made/lora.safetensors: truncated: 100 of {size} bytes; remake it (made by rule make): "
            "snakemake -R made/lora.safetensors")
    assert line in console and line in (workflow / "logs/use.log").read_text(encoding="utf-8")
    assert not (workflow / "used.txt").exists()
    run(workflow, "used.txt", False, "-R", "made/lora.safetensors")  # the command the message names
    assert lora.stat().st_size == size and (workflow / "used.txt").read_text() == "ok"
