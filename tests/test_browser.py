"""Open the built report in headless Chromium with the network off (window 1400 px wide).

Checks, on index.html and one notebook page: MathJax typeset the math (output elements present, no raw
``$$`` or ``\\(`` left in rendered text, no TeX errors), every image decoded (naturalWidth > 0), and no
request left the machine (every URL in Chrome's network log is file: or data:, or about:blank, which
MathJax uses as a blank font). Also: no horizontal overflow, the index opens with its key findings whose
links land on notebook sections, and code inputs stay folded until "show code". Screenshots go to
reports/screenshots/.

Skipped only when chromium/chromedriver are not installed; .ci/run installs them, so CI runs it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from klsym.paths import NOTEBOOKS_DIR, REPORTS_DIR
from klsym.report.build import build_report, discover_notebooks

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER),
    reason="chromium and chromium-driver are not installed "
    "(apt-get install chromium chromium-driver; .ci/run does this)",
)
# chrome:// and chrome-untrusted:// are the browser's own pages (its new-tab page loads them): not the network.
LOCAL_SCHEMES = ("file:", "data:", "about:blank", "chrome://", "chrome-untrusted://")
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--host-resolver-rules=MAP * ~NOTFOUND",
    "--window-size=1400,2400",
]

WAIT_FOR_MATHJAX = """
const done = arguments[arguments.length - 1];
if (!window.MathJax || !MathJax.Hub) { done("MathJax did not load"); return; }
MathJax.Hub.Queue(function () { done("typeset"); });
"""
# Rendered prose only: code inputs (<pre>) legitimately contain dollars and backslashes.
PAGE_FACTS = """
const prose = Array.from(document.querySelectorAll(
    ".jp-RenderedMarkdown, .jp-RenderedLatex, .jp-RenderedHTMLCommon, body > p, body > div, body > table, h1, h2"))
  .map(function (node) {
    const copy = node.cloneNode(true);
    copy.querySelectorAll("pre, code, script, .MathJax_Preview, .MJX_Assistive_MathML")
      .forEach(function (n) { n.remove(); });
    return copy.textContent;
  }).join("\\n");
return {
  mathjax: document.querySelectorAll(".MathJax, .MathJax_Display, .MathJax_SVG, mjx-container").length,
  errors: window.klsymMathErrors || ["klsymMathErrors missing"],
  raw: ["$$", "\\\\(", "\\\\["].filter(function (s) { return prose.indexOf(s) >= 0; }),
  images: Array.from(document.images).map(function (img) {
    return {src: img.src.slice(0, 40), complete: img.complete, width: img.naturalWidth};
  })
};
"""


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """The session's small report (shared with test_notebooks.py; built here if that did not run)."""
    first = discover_notebooks(NOTEBOOKS_DIR)[0]
    output = tmp_path_factory.getbasetemp() / "small-report"
    result = build_report(output, small=True, only=[first.stem], log=lambda *_: None)
    return result, first


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS + [f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"]:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_script_timeout(60)
    driver.execute_cdp_cmd("Network.enable", {})
    driver.execute_cdp_cmd(
        "Network.emulateNetworkConditions",
        {"offline": True, "latency": 0, "downloadThroughput": -1, "uploadThroughput": -1},
    )
    driver.get_log("performance")  # drop the start page's internal chrome:// traffic
    yield driver
    driver.quit()


def requested_urls(driver) -> list[str]:
    urls = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            urls.append(message["params"]["request"]["url"])
    return urls


def wait_for_page(driver, uri: str) -> None:
    """Wait until ``uri`` (fragment aside) is the current, fully loaded document: chromedriver can return
    from a file: navigation before the new document is current."""
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, 30).until(
        lambda d: d.execute_script(
            "return location.href.split('#')[0] === arguments[0] && document.readyState === 'complete';",
            uri.split("#")[0],
        )
    )


def open_page(driver, path: Path, screenshot: str) -> tuple[dict, list[str]]:
    driver.get(path.as_uri())
    wait_for_page(driver, path.as_uri())
    assert driver.execute_async_script(WAIT_FOR_MATHJAX) == "typeset"
    facts = driver.execute_script(PAGE_FACTS)
    (REPORTS_DIR / "screenshots").mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(REPORTS_DIR / "screenshots" / screenshot))
    return facts, requested_urls(driver)


@pytest.mark.parametrize("page", ["index", "notebook"])
def test_page_renders_offline(report, browser, page):
    result, first = report
    path = result.output / ("index.html" if page == "index" else f"{first.stem}.html")
    facts, urls = open_page(browser, path, f"{path.stem}.png")
    assert facts["errors"] == [], "MathJax reported TeX errors"
    assert facts["mathjax"] > 0, "no MathJax output elements: math was not typeset"
    assert facts["raw"] == [], "raw TeX delimiters left in rendered text"
    assert all(image["complete"] and image["width"] > 0 for image in facts["images"]), facts["images"]
    if page == "notebook":
        assert facts["images"], "the notebook page shows no figure"
    assert urls, "Chrome's network log recorded nothing: the check would be vacuous"
    assert path.as_uri() in urls
    assert [url for url in urls if not url.startswith(LOCAL_SCHEMES)] == []


OVERFLOW = """
const root = document.documentElement;
const wide = Array.from(document.querySelectorAll("body *")).filter(function (node) {
  const box = node.getBoundingClientRect();
  return box.width > 0 && box.right > root.clientWidth + 1;
}).slice(0, 5).map(function (node) { return node.tagName + "." + node.className; });
return {scrollWidth: root.scrollWidth, clientWidth: root.clientWidth, innerWidth: window.innerWidth, wide: wide};
"""
CODE_INPUTS = """
const inputs = Array.from(document.querySelectorAll(".jp-CodeCell > .jp-Cell-inputWrapper"));
return {total: inputs.length, visible: inputs.filter(function (n) { return n.offsetParent !== null; }).length};
"""


@pytest.mark.parametrize("page", ["index", "notebook"])
def test_no_horizontal_overflow_at_1400px(report, browser, page):
    result, first = report
    path = result.output / ("index.html" if page == "index" else f"{first.stem}.html")
    open_page(browser, path, f"{path.stem}-width.png")
    facts = browser.execute_script(OVERFLOW)
    assert 1300 <= facts["innerWidth"] <= 1400, facts  # the window the check is about
    assert facts["scrollWidth"] <= facts["clientWidth"], f"horizontal overflow: {facts}"


def test_index_opens_with_key_findings_that_link_to_their_sections(report, browser):
    from klsym.report.findings import FINDINGS

    result, first = report
    open_page(browser, result.output / "index.html", "index-findings.png")
    headings = browser.execute_script("return Array.from(document.querySelectorAll('h2')).map(h => h.id);")
    assert headings[0] == "key-findings", headings
    links = browser.execute_script(
        "return Array.from(document.querySelectorAll('li.finding a.finding-link')).map(a => a.href);"
    )
    expected = [f for f in FINDINGS.values() if f.notebook == first.stem]
    assert len(links) == len(expected) and len(result.findings) == len(expected)
    for href in links:
        browser.get(href)
        wait_for_page(browser, href)
        target = browser.execute_script(
            "return document.getElementById(decodeURIComponent(location.hash.slice(1))) !== null;"
        )
        assert target, f"{href} does not land on a section"


def test_code_is_folded_until_show_code(report, browser):
    result, first = report
    open_page(browser, result.output / f"{first.stem}.html", "notebook-folded.png")
    folded = browser.execute_script(CODE_INPUTS)
    assert folded["total"] > 0 and folded["visible"] == 0, folded
    toggle = browser.find_element("id", "klsym-code-toggle")
    assert toggle.text == "show code"
    toggle.click()
    shown = browser.execute_script(CODE_INPUTS)
    assert shown["visible"] == shown["total"], shown
    assert toggle.text == "hide code"
    toggle.click()
    assert browser.execute_script(CODE_INPUTS)["visible"] == 0
