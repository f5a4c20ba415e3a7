"""The library's command-line tools as installed commands (pyproject.toml's [project.scripts]):
the table names every module with a `__main__` that a user runs, each installed command prints
its usage, a wheel (a non-editable install) carries the commands and the GPU check's reference
figures, and every command the README, docs/ and the Makefile show exists."""

from __future__ import annotations

import ast
import importlib.util
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from importlib import metadata
from pathlib import Path

import pytest

from kolors_story.host.moved import MOVED

ROOT = Path(__file__).resolve().parents[2]
PKG = ROOT / "src" / "kolors_story"
SCRIPTS: dict[str, str] = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["scripts"]
BIN = Path(sys.executable).parent  # .venv/bin, where pip put the commands

# Modules with a __main__ that are no user's command, and why.
NOT_TOOLS = {
    "kolors_story.training": "the train job's own process: accelerate launch needs it as `-m`, its flags are the job's",
    "kolors_story.models.random_qwen": "make env's one-off step: fetches the Qwen tokenizer's ranks for the demo",
}


def _runs_as_main(path: Path) -> bool:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return path.name == "__main__.py" or any(
        isinstance(node, ast.If) and ast.unparse(node.test) == "__name__ == '__main__'" for node in tree.body)


def modules_with_a_main() -> set[str]:
    found = set()
    for path in PKG.rglob("*.py"):
        if _runs_as_main(path):
            parts = path.relative_to(PKG.parent).with_suffix("").parts
            found.add(".".join(parts[:-1] if path.name == "__main__.py" else parts))
    return found


def test_every_module_with_a_main_is_a_command_or_said_why_not():
    mains = modules_with_a_main()
    assert set(NOT_TOOLS) <= mains, "NOT_TOOLS names a module that no longer has a __main__"
    commands = {target.split(":")[0] for target in SCRIPTS.values()}
    assert commands == mains - set(NOT_TOOLS), (
        "a module with a __main__ that pyproject.toml's [project.scripts] lacks (add it, or say in NOT_TOOLS why it "
        f"is no user's command): {sorted(mains - set(NOT_TOOLS) - commands)}; named there without a __main__: "
        f"{sorted(commands - mains)}")
    assert all(target.endswith(":main") and name.startswith("kolors-story-") for name, target in SCRIPTS.items())


def test_the_installed_commands_are_pyproject_s():
    installed = {ep.name: ep.value for ep in metadata.entry_points(group="console_scripts")
                 if ep.dist is not None and ep.dist.name == "kolors-story"}
    assert installed == SCRIPTS, "the environment's commands are stale: .venv/bin/pip install --no-deps -e . (make env)"


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_each_installed_command_prints_its_usage(name):
    proc = subprocess.run([str(BIN / name), "--help"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith(f"usage: {name}"), proc.stdout[:500]


def test_a_wheel_carries_the_commands_and_the_gpu_check_s_figures(tmp_path):
    """A non-editable install: pip builds the wheel from pyproject.toml and src/ alone, and the GPU
    check finds its reference figures inside the installed package, with no checkout around."""
    project = tmp_path / "project"
    shutil.copytree(PKG.parent, project / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    shutil.copy(ROOT / "pyproject.toml", project / "pyproject.toml")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                    "-w", str(tmp_path / "dist"), str(project)], check=True, capture_output=True, timeout=300)
    [wheel] = (tmp_path / "dist").glob("*.whl")
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(tmp_path / "site")
        entry_points = next(n for n in archive.namelist() if n.endswith(".dist-info/entry_points.txt"))
        scripts = dict(line.split(" = ") for line in archive.read(entry_points).decode().splitlines()[1:] if line)
    assert scripts == SCRIPTS
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from kolors_story.tools.gpu_check_report import ESTIMATES; "
            "print(ESTIMATES.is_file(), ESTIMATES)")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "site")], capture_output=True, text=True,
                          cwd=tmp_path, timeout=300)
    packaged = tmp_path / "site" / "kolors_story" / "tools" / "gpu_memory_estimate.json"
    assert proc.stdout.strip() == f"True {packaged}", proc.stderr


PAGES = [ROOT / "README.md", ROOT / "Makefile", *sorted((ROOT / "docs").glob("*.md"))]
MODULE_RUN = re.compile(r"-m (kolors_story(?:\.\w+)*)")
COMMAND = re.compile(r"(?<![\w/.-])kolors-story-[a-z][a-z-]*[a-z]")
MOVED_MODULES = {f"kolors_story.host.{tool}" for tool in MOVED}


def test_every_command_the_pages_show_exists():
    """`python -m kolors_story...` names a module that runs (not one that only says where it went),
    and a `kolors-story-*` command is one pyproject.toml installs."""
    wrong = []
    for page in PAGES:
        for number, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1):
            wrong += [f"{page.relative_to(ROOT)}:{number}: python -m {module}" for module in MODULE_RUN.findall(line)
                      if module in MOVED_MODULES or importlib.util.find_spec(module) is None]
            wrong += [f"{page.relative_to(ROOT)}:{number}: {command}" for command in COMMAND.findall(line)
                      if command not in SCRIPTS]
    assert wrong == [], "commands that do not run:\n" + "\n".join(wrong)
