"""The tools that left kolors_story.host (kolors_story.host.moved): their old `python -m` commands
exit 2 naming the command that replaced them, and importing an old module says the same."""

from __future__ import annotations

import importlib
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from kolors_story.host.moved import MOVED

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("tool", sorted(MOVED))
def test_the_old_command_names_the_new_one(tool):
    proc = subprocess.run([sys.executable, "-m", f"kolors_story.host.{tool}", "--help"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == (f"kolors_story.host.{tool} moved: run `{MOVED[tool]}` (or `python -m "
                           f"kolors_story.tools.{tool}`) with the same arguments\n")


@pytest.mark.parametrize("tool", sorted(MOVED))
def test_importing_the_old_module_names_the_new_one(tool):
    sys.modules.pop(f"kolors_story.host.{tool}", None)
    with pytest.raises(ImportError, match=f"kolors_story.tools.{tool}"):
        importlib.import_module(f"kolors_story.host.{tool}")
    assert importlib.util.find_spec(f"kolors_story.tools.{tool}") is not None


def test_each_new_command_is_installed_by_pyproject():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["scripts"]
    assert {MOVED[tool]: f"kolors_story.tools.{tool}:main" for tool in MOVED}.items() <= scripts.items()
