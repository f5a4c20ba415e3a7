"""The Snakemake report as a reader sees it, in Debian's headless chromium (tests/report_browser.py).

- The demo's report: set KOLORS_REPORT_HTML to a `snakemake --report report.html` of the demo
  (and KOLORS_REPORT_CATEGORY to a category, default "demo"); skipped when unset, so that the
  suite does not run the 3-minute demo a second time (the workflow test calls inspect_report on
  its own demo run).
- A small real workflow's report (seconds): categories with and without subcategories, a single
  category, a CSV (a download, not a view), a broken PNG the check must catch.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from report_browser import (
    CHROMIUM,
    CJK_PAIR,
    NO_GLYPH,
    browser_missing_reason,
    glyph_alpha,
    inspect_report,
    report_problems,
)

pytestmark = pytest.mark.skipif(browser_missing_reason() is not None, reason=browser_missing_reason() or "")
SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))

SNAKEFILE = '''
from PIL import Image

SINGLE = bool(config.get("single"))


def where(category, subcategory):
    """Every result in one category when single=1 (the menu then names it "Results")."""
    return {"category": "Only", "subcategory": "Other"} if SINGLE else {"category": category, "subcategory": subcategory}


rule all:
    input: "results/demo/story.png", "results/demo/timings.png", "results/demo/scores.csv", "results/broken.png"

rule story:
    output:
        story=report("results/demo/story.png", caption="caption.rst", **where("demo", "Story")),
        timings=report("results/demo/timings.png", caption="caption.rst", **where("demo", "Timings")),
    run:
        Image.new("RGB", (120, 80), (200, 30, 30)).save(output.story)
        Image.new("RGB", (90, 60), (30, 30, 200)).save(output.timings)

rule scores:
    output: report("results/demo/scores.csv", caption="caption.rst", **where("demo", "Scores"))
    shell: "printf 'image,score\\\\ns1.png,5.5\\\\n' > {output}"

rule broken:
    output: report("results/broken.png", caption="caption.rst", **where("Broken", "Other"))
    shell: "printf 'not a png' > {output}"
'''


def _snakemake(workdir: Path, *args: str) -> None:
    proc = subprocess.run([SNAKEMAKE, *args], cwd=workdir, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, f"snakemake {' '.join(args)} failed:\n{proc.stderr[-4000:]}"


@pytest.fixture(scope="module")
def small_reports(tmp_path_factory) -> dict[str, Path]:
    """report.html (categories demo, with three subcategories, and Broken) and single.html (one)."""
    workdir = tmp_path_factory.mktemp("report")
    (workdir / "Snakefile").write_text(SNAKEFILE, encoding="utf-8")
    (workdir / "caption.rst").write_text("古风少女的桃花梦: a caption in Chinese.\n", encoding="utf-8")
    _snakemake(workdir, "--cores", "1", "--quiet")
    _snakemake(workdir, "--report", "report.html")
    _snakemake(workdir, "--report", "single.html", "--config", "single=1")
    return {"many": workdir / "report.html", "single": workdir / "single.html"}


def test_the_canvas_check_tells_real_glyphs_from_tofu():
    """Two CJK characters draw differently; two characters no font has draw the same box."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        try:
            page = browser.new_page()
            first, second, tofu, other_tofu = glyph_alpha(page, [*CJK_PAIR, NO_GLYPH, "\ue001"], "sans-serif")
        finally:
            browser.close()
    assert first != second and any(first) and first != tofu
    assert tofu == other_tofu  # what the check relies on: missing glyphs are indistinguishable


def test_a_category_with_subcategories_is_opened_result_by_result(small_reports, tmp_path):
    found = inspect_report(small_reports["many"], tmp_path / "demo.png", "demo")
    assert report_problems(found) == []
    assert found["subcategories"] == ["Scores", "Story", "Timings"]
    assert sorted(found["viewed"]) == ["results/demo/story.png", "results/demo/timings.png"]
    assert found["downloads"] == ["demo/Scores: scores.csv"]  # not an image: a download link
    assert found["cjk"]["platform_fonts"] and found["cjk_system_fonts"]
    with Image.open(tmp_path / "demo.png") as shot:  # Scores has nothing to view: Story's first result
        assert shot.size == (1400, 1000)
        assert (200, 30, 30) in {colour for _, colour in shot.convert("RGB").getcolors(1_000_000)}


def test_a_broken_image_is_found(small_reports, tmp_path):
    found = inspect_report(small_reports["many"], tmp_path / "broken.png", "Broken")
    assert found["viewed"] == ["results/broken.png"]
    assert [p.split(":")[0] for p in found["broken_images"]] == ["results/broken.png"]
    assert [p for p in report_problems(found) if p.startswith("broken image")]


def test_a_single_category_is_opened_from_the_results_link(small_reports, tmp_path):
    found = inspect_report(small_reports["single"], tmp_path / "single.png", "Only")
    assert found["subcategories"] == ["Other"]
    assert sorted(found["viewed"]) == ["results/broken.png", "results/demo/story.png", "results/demo/timings.png"]
    assert found["downloads"] == ["Only/Other: scores.csv"]
    assert [p.split(":")[0] for p in found["broken_images"]] == ["results/broken.png"]


def test_an_unknown_category_names_the_ones_there_are(small_reports, tmp_path):
    with pytest.raises(LookupError, match=r"'Nope' is not in the report; it has \['Broken', 'demo'\]"):
        inspect_report(small_reports["many"], tmp_path / "x.png", "Nope")


@pytest.mark.skipif("KOLORS_REPORT_HTML" not in os.environ,
                    reason="set KOLORS_REPORT_HTML to a `snakemake --report report.html` of the demo run")
def test_the_demo_report_reads_right(tmp_path):
    category = os.environ.get("KOLORS_REPORT_CATEGORY", "demo")
    found = inspect_report(Path(os.environ["KOLORS_REPORT_HTML"]), tmp_path / "report.png", category)
    assert report_problems(found) == []
    assert found["viewed"], f"category {category!r} has no image to view"
    assert (tmp_path / "report.png").stat().st_size > 10_000
