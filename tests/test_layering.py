"""The library's layering (src/kolors_story/*/__init__.py say it in words): every import of one of
its modules, at module level or inside a function, points down or stays in its own package."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "src" / "kolors_story"
SHARED = {"errors", "files", "dotted", "seals", "modelscope_endpoint", "chatglm_tokens", "run_files"}  # the package root's modules: anyone may use them; they use nothing
EVERYTHING = {"models", "data", "render", "training", "outputs", "writing", "plan", "host", "tools"}
MAY_IMPORT = {
    "models": {"models"},
    "data": {"data"},
    "render": {"render", "models", "data"},
    "training": {"training", "models", "data"},
    "outputs": {"outputs", "render", "models", "data"},
    "writing": {"writing"},
    "plan": EVERYTHING - {"tools"},
    "host": EVERYTHING - {"tools"},
    "tools": EVERYTHING,  # the command-line tools: on top, nothing of the library imports them
}


def imported(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, the first name under kolors_story) of every import of the library in a module."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name.split(".")[1]) for a in node.names if a.name.startswith("kolors_story.")]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            parts = node.module.split(".")
            if parts[0] == "kolors_story":
                found += [(node.lineno, parts[1])] if len(parts) > 1 else [(node.lineno, a.name) for a in node.names]
    return found


def test_every_module_lives_in_a_package_of_the_layering():
    top = {p.stem for p in PKG.glob("*.py")} - {"__init__"}
    packages = {p.parent.name for p in PKG.glob("*/__init__.py")}
    assert top == SHARED and packages == EVERYTHING


def test_imports_point_down():
    wrong = []
    for path in sorted(PKG.rglob("*.py")):
        where = path.relative_to(PKG).parts
        if len(where) == 1:  # the root: __init__ and the shared modules
            allowed = SHARED
        else:
            allowed = MAY_IMPORT[where[0]] | SHARED
        for line, target in imported(ast.parse(path.read_text(encoding="utf-8"))):
            if target not in allowed and target != "__version__":
                wrong.append(f"{path.relative_to(PKG)}:{line} imports kolors_story.{target}")
    assert wrong == [], "imports against the layering:\n" + "\n".join(wrong)


def test_no_library_function_is_longer_than_a_screen():
    long = []
    for path in sorted(PKG.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 60:
                long.append(f"{path.relative_to(PKG)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)")
    assert long == [], "functions over 60 lines; split them:\n" + "\n".join(long)
