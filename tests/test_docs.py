"""The README is a front page and docs/ hold the rest: the key reference is generated from the
schema and current, every relative link resolves, and every config key the pages name exists."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def test_the_key_reference_is_generated_from_the_current_schema():
    sys.path.insert(0, str(ROOT / "docs"))
    try:
        import make_config_reference as ref
    finally:
        sys.path.pop(0)
    assert (ROOT / "docs/config-reference.md").read_text(encoding="utf-8") == ref.page(), \
        "docs/config-reference.md is stale: run python docs/make_config_reference.py"
    assert ref.main(["--check"]) == 0


def test_every_relative_link_of_the_readme_and_docs_resolves():
    broken = [f"{page.relative_to(ROOT)} -> {target}" for page in PAGES for target in LINK.findall(page.read_text(encoding="utf-8"))
              if "://" not in target and not (page.parent / target).exists()]
    assert broken == []


def test_the_readme_is_a_front_page_that_links_every_docs_page():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= 130
    linked = set(LINK.findall(readme))
    assert {f"docs/{p.name}" for p in (ROOT / "docs").glob("*.md")} <= linked
    assert "make test" in readme and "make demo" in readme


def test_every_config_key_the_pages_name_exists_in_the_schema():
    spec = importlib.util.spec_from_file_location("settings_truth", ROOT / "tests/plan/test_settings_truth.py")
    truth = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(truth)
    FILE_SUFFIXES, KEY, schema_at = truth.FILE_SUFFIXES, truth.KEY, truth.schema_at

    named = [(page, i, key) for page in PAGES for i, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1)
             for key in KEY.findall(line) if key.rsplit(".", 1)[-1] not in FILE_SUFFIXES]
    assert len(named) > 50  # the pages do name keys
    unknown = [f"{page.relative_to(ROOT)}:{i}: {key}" for page, i, key in named if schema_at(key) is None]
    assert unknown == [], "keys the schema lacks:\n" + "\n".join(unknown)
