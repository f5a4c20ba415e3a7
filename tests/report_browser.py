"""Open a self-contained `snakemake --report report.html` page in Debian's chromium (headless,
through Playwright; no browser is ever downloaded) and check what a reader would see.

How the report (snakemake 9.27.1's html_reporter, a React app in one file) is navigated:
- the sidebar (the first <nav>; the second is the breadcrumb bar inside it) lists "Workflow",
  "Statistics", "About", then under "Results" one link per category, sorted. With exactly one
  category the link is labelled "Results", not with the category's name;
- a category link calls app.showCategory(name): a category with one subcategory (also the
  default "Other") opens its results table at once, one with several lists the subcategories as
  links;
- the results table has one row per result; the row's first button (an "eye") shows an image,
  HTML or PDF result in the content pane (`<img src=data:...>` or an iframe), or, for any other
  file type, is a download link (an `a` with a `download` attribute) that is not followed here.
The breadcrumb bar's first link (the home icon) returns to the sidebar menu.

`inspect_report` returns what it found; `report_problems` turns that into messages for an assert.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

CHROMIUM = Path("/usr/bin/chromium")
INSTALL_HINT = "apt-get install -y chromium fonts-noto-cjk"
VIEWPORT = {"width": 1400, "height": 1000}
TIMEOUT_MS = 20_000
CJK_PAIR = ("山", "水")  # two common Han characters: real glyphs differ, tofu boxes do not
NO_GLYPH = "\ue000"  # private use: no font has it, so it draws the missing-glyph box (tofu)

# Chromium draws each text with the page's font stack at 40 px and returns the pixels' alpha.
_CANVAS_JS = """([chars, fontFamily]) => {
  const canvas = document.createElement("canvas");
  canvas.width = 64; canvas.height = 64;
  const ctx = canvas.getContext("2d", {willReadFrequently: true});
  return chars.map((ch) => {
    ctx.clearRect(0, 0, 64, 64);
    ctx.font = `40px ${fontFamily}`;
    ctx.fillStyle = "#000";
    ctx.textBaseline = "top";
    ctx.fillText(ch, 8, 8);
    const data = ctx.getImageData(0, 0, 64, 64).data;
    const alpha = [];
    for (let i = 3; i < data.length; i += 4) alpha.push(data[i]);
    return alpha;
  });
}"""
_BROKEN_IMAGES_JS = """() => Array.from(document.images)
  .filter((img) => img.complete && img.naturalWidth === 0)
  .map((img) => img.currentSrc.startsWith("data:") ? img.currentSrc.slice(0, 60) + "..." : img.currentSrc)"""


def browser_missing_reason() -> str | None:
    """Why the check cannot run here (no chromium, no Playwright), or None."""
    if not CHROMIUM.is_file():
        return f"chromium not installed: {INSTALL_HINT}"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "Playwright for Python not installed: pip install -r requirements.txt -c constraints.txt"
    return None


def cjk_system_fonts() -> list[str]:
    """`fc-list :lang=zh family`: the installed fonts that cover Chinese (what chromium falls back to)."""
    if shutil.which("fc-list") is None:
        return []
    out = subprocess.run(["fc-list", ":lang=zh", "family"], capture_output=True, text=True, check=False)
    return sorted({line.strip() for line in out.stdout.splitlines() if line.strip()})


def _wait_for_images(page: Any) -> list[str]:
    """Broken images of the current view, once every image has finished loading or failing."""
    page.wait_for_function("() => Array.from(document.images).every((img) => img.complete)", timeout=TIMEOUT_MS)
    return page.evaluate(_BROKEN_IMAGES_JS)


def _sidebar(page: Any) -> Any:
    return page.locator("#app nav").first


def _go_home(page: Any) -> None:
    page.locator("#app nav nav a").first.click()  # the breadcrumb bar's home icon
    page.wait_for_function("() => app.state.navbarMode === 'menu'", timeout=TIMEOUT_MS)


def _open_category(page: Any, category: str, single: bool) -> None:
    label = "Results" if single else category  # one category: the menu names it "Results"
    _sidebar(page).get_by_role("link", name=label, exact=True).click()
    page.wait_for_function("(c) => app.state.category === c", arg=category, timeout=TIMEOUT_MS)


def _view_results(page: Any, category: str, subcategory: str, found: dict) -> None:
    """Show every viewable result of the open results table; note broken images after each."""
    rows = page.locator("#app nav table tbody tr")  # sorted by label, not in `categories` order
    for i in range(rows.count()):
        eye = rows.nth(i).locator("div[role=group] a").first
        if (name := eye.get_attribute("download")) is not None:  # not an image/HTML/PDF: a download link
            found["downloads"].append(f"{category}/{subcategory}: {name}")
            continue
        trigger = page.evaluate("() => app.state.renderTrigger")  # changes whenever a result is shown
        eye.click()
        page.wait_for_function("(t) => app.state.renderTrigger !== t", arg=trigger, timeout=TIMEOUT_MS)
        path = page.evaluate("() => app.state.resultPath")
        found["viewed"].append(path)
        found["broken_images"] += [f"{path}: {src}" for src in _wait_for_images(page)]


def _visit_category(page: Any, category: str, found: dict) -> None:
    names = page.evaluate("() => Object.keys(categories)")
    if category not in names:
        raise LookupError(f"category {category!r} is not in the report; it has {sorted(names)}")
    subcategories = page.evaluate("(c) => Object.keys(categories[c]).sort((a, b) => a.localeCompare(b))", category)
    found["subcategories"] = subcategories
    for subcategory in subcategories:
        _go_home(page)
        _open_category(page, category, single=len(names) == 1)
        if len(subcategories) > 1:  # a list of subcategory links first
            _sidebar(page).get_by_role("link", name=subcategory, exact=True).click()
            page.wait_for_function("(s) => app.state.subcategory === s", arg=subcategory, timeout=TIMEOUT_MS)
        page.locator("#app nav table").wait_for(timeout=TIMEOUT_MS)
        _view_results(page, category, subcategory, found)


def glyph_alpha(page: Any, chars: list[str], family: str) -> list[list[int]]:
    """Each of `chars` drawn by chromium at 40 px in `family` (a CSS font stack): its alpha pixels."""
    return page.evaluate(_CANVAS_JS, [chars, family])


def _cjk_rendering(page: Any) -> dict:
    """Draw CJK_PAIR and NO_GLYPH with the page's own font stack: real glyphs have ink and differ
    from each other and from the missing-glyph box."""
    family = page.evaluate("() => getComputedStyle(document.body).fontFamily")
    lang = page.evaluate("() => document.documentElement.lang")  # steers chromium's font fallback
    first, second, tofu = glyph_alpha(page, [*CJK_PAIR, NO_GLYPH], family)
    return {
        "font_family": family,
        "lang": lang,
        "ink": bool(any(first) and any(second)),
        "glyphs_differ": first != second,
        "not_tofu": first != tofu and second != tofu,
        "platform_fonts": _platform_fonts(page.context, family, lang),
    }


def _platform_fonts(context: Any, family: str, lang: str) -> list[str]:
    """The fonts chromium really uses for CJK text in the report's font stack and language
    (DevTools CSS.getPlatformFontsForNode). On a page of its own: enabling the CSS agent on the
    report logs a file:// security error that is no fault of the report."""
    page = context.new_page()
    try:
        page.set_content(f'<html lang="{lang}"><body><span id="cjk-probe"></span></body></html>')
        page.evaluate("([t, f]) => { const s = document.getElementById('cjk-probe'); s.textContent = t;"
                      " s.style.fontFamily = f; }", ["".join(CJK_PAIR), family])
        cdp = context.new_cdp_session(page)
        cdp.send("DOM.enable")
        cdp.send("CSS.enable")
        fonts: list[str] = []
        for _ in range(5):  # on a busy machine the first layout may not have picked its fonts yet
            page.evaluate("async () => { await document.fonts.ready;"
                          " return document.getElementById('cjk-probe').getBoundingClientRect().width; }")
            root = cdp.send("DOM.getDocument")["root"]["nodeId"]
            node = cdp.send("DOM.querySelector", {"nodeId": root, "selector": "#cjk-probe"})["nodeId"]
            fonts = [f["familyName"] for f in cdp.send("CSS.getPlatformFontsForNode", {"nodeId": node})["fonts"]]
            if fonts:
                break
            page.wait_for_timeout(500)
        return fonts
    finally:
        page.close()


def inspect_report(html: Path, screenshot: Path, category: str) -> dict:
    """Open `html` in headless chromium, open every result of `category`, screenshot that view
    (its first result shown) to `screenshot`, and return what was found: console and page
    errors, broken images, requests that left the file, viewed results, the CJK check."""
    from playwright.sync_api import sync_playwright

    if reason := browser_missing_reason():
        raise RuntimeError(reason)
    html, screenshot = Path(html).resolve(), Path(screenshot)
    if not html.is_file():
        raise FileNotFoundError(f"report {html} does not exist; make it with `snakemake --report {html.name}`")
    found: dict = {"console_errors": [], "page_errors": [], "external_requests": [], "broken_images": [],
                   "viewed": [], "downloads": [], "category": category}
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        try:
            page = browser.new_context(viewport=VIEWPORT).new_page()
            page.on("console", lambda m: m.type == "error" and found["console_errors"].append(m.text))
            page.on("pageerror", lambda exc: found["page_errors"].append(str(exc)))
            # Self-contained means nothing is fetched: record and refuse any network request.
            page.route(re.compile(r"^(https?|wss?)://"), lambda route: _refuse(route, found))
            page.goto(html.as_uri(), wait_until="load")
            page.wait_for_function("() => typeof app !== 'undefined' && document.querySelector('#app nav')",
                                   timeout=TIMEOUT_MS)
            found["broken_images"] += [f"menu: {src}" for src in _wait_for_images(page)]
            _visit_category(page, category, found)
            _show_first(page, category, found)
            screenshot.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(screenshot), full_page=False)
            found["cjk"] = _cjk_rendering(page)
        finally:
            browser.close()
    found["screenshot"] = str(screenshot)
    found["cjk_system_fonts"] = cjk_system_fonts()
    return found


def _refuse(route: Any, found: dict) -> None:
    found["external_requests"].append(route.request.url)
    route.abort()


def _show_first(page: Any, category: str, found: dict) -> None:
    """Back to the category with its first viewable result shown (subcategories in menu order)."""
    single = len(page.evaluate("() => Object.keys(categories)")) == 1
    for subcategory in found["subcategories"]:
        _go_home(page)
        _open_category(page, category, single)
        if len(found["subcategories"]) > 1:
            _sidebar(page).get_by_role("link", name=subcategory, exact=True).click()
        page.locator("#app nav table").wait_for(timeout=TIMEOUT_MS)
        eye = page.locator("#app nav table tbody tr div[role=group] a:first-child:not([download])").first
        if eye.count():
            trigger = page.evaluate("() => app.state.renderTrigger")
            eye.click()
            page.wait_for_function("(t) => app.state.renderTrigger !== t", arg=trigger, timeout=TIMEOUT_MS)
            _wait_for_images(page)
            return


def report_problems(found: dict) -> list[str]:
    """What `inspect_report` found wrong, one message each (empty: the report looks right)."""
    problems = [f"console error: {m}" for m in found["console_errors"]]
    problems += [f"page error: {m}" for m in found["page_errors"]]
    problems += [f"broken image: {m}" for m in found["broken_images"]]
    problems += [f"request outside the file: {u}" for u in found["external_requests"]]
    if not found["viewed"] and not found["downloads"]:
        problems.append(f"category {found['category']!r} shows no results")
    cjk = found.get("cjk", {})
    if not (cjk.get("ink") and cjk.get("glyphs_differ") and cjk.get("not_tofu")):
        problems.append(f"CJK text draws as missing-glyph boxes in {cjk.get('font_family')!r} "
                        f"(fonts used: {cjk.get('platform_fonts')}); install fonts: {INSTALL_HINT}")
    if not found.get("cjk_system_fonts"):
        problems.append(f"fc-list :lang=zh finds no font; install one: {INSTALL_HINT}")
    return problems
