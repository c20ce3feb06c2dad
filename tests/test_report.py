"""The report pipeline on tiny throw-away notebooks: incremental builds, failures, offline HTML.

The real notebooks are executed in tests/test_notebooks.py; here each kernel run costs ~2 s, so the
notebooks are one-liners and the build is exercised, not the science.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

from klsym import __version__
from klsym.paths import ROOT
from klsym.report.build import (
    NotebookFailure,
    build_report,
    default_parameters,
    discover_notebooks,
    find_external_references,
    notebook_title,
    select_notebooks,
    strip_external_references,
)


def write_notebook(path, body: str, parameters: str = "seed = 3\nscale = 2.0", title: str = "A tiny notebook"):
    notebook = new_notebook(
        cells=[new_markdown_cell(f"# {title}\nInline math $x^2$."), new_code_cell(parameters), new_code_cell(body)]
    )
    notebook.cells[1].metadata["tags"] = ["parameters"]
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(notebook, path)
    return path


# ----------------------------------------------------------------------------- pure functions
@pytest.mark.parametrize(
    "html, expected",
    [
        ('<script src="https://cdn.example.org/require.js"></script>', ["https://cdn.example.org/require.js"]),
        ("<script src='//cdn.example.org/a.js'></script>", ["//cdn.example.org/a.js"]),
        ('<link rel="stylesheet" href="http://fonts.example.org/x.css">', ["http://fonts.example.org/x.css"]),
        ('<img src="https://example.org/a.png">', ["https://example.org/a.png"]),
        ('const m = await import("https://cdn.example.org/mermaid.mjs");', ["https://cdn.example.org/mermaid.mjs"]),
        ("@font-face { src: url('https://example.org/f.woff') }", ["https://example.org/f.woff"]),
        ('<script src="static/mathjax/MathJax.js"></script><img src="data:image/png;base64,AAAA">', []),
        ('<a href="https://example.org/paper">a link is not a fetch</a>', []),
    ],
)
def test_find_external_references(html, expected):
    assert find_external_references(html) == expected


def test_strip_external_references_removes_cdn_tags_and_keeps_local_ones():
    html = (
        '<head><script src="https://cdnjs.example/require.min.js"></script>'
        '<link rel="stylesheet" href="https://cdn.example/x.css"/>'
        '<script src="static/mathjax/MathJax.js"></script></head>'
    )
    stripped = strip_external_references(html)
    assert find_external_references(stripped) == []
    assert '<script src="static/mathjax/MathJax.js"></script>' in stripped


@pytest.mark.parametrize(
    "source, message",
    [
        ("seed = 1\nprint(seed)", "only assign literals"),
        ("seed = 1 + rng", "not a literal"),
        ("a, b = 1, 2", "only assign literals"),
    ],
)
def test_default_parameters_rejects_non_literal_cells(source, message):
    notebook = {"cells": [{"cell_type": "code", "metadata": {"tags": ["parameters"]}, "source": source}]}
    with pytest.raises(ValueError, match=message):
        default_parameters(notebook)


def test_notebook_title_is_the_first_heading():
    notebook = {"cells": [{"cell_type": "markdown", "source": "Intro\n## Second level\n# Later"}]}
    assert notebook_title(notebook, "fallback") == "Second level"
    assert notebook_title({"cells": []}, "fallback") == "fallback"


def test_discovery_and_selection(tmp_path):
    for name in ("01-first.ipynb", "02-second-one.ipynb", "scratch.ipynb", "3-bad.ipynb", "04-Bad.ipynb"):
        (tmp_path / name).write_text("{}")
    found = discover_notebooks(tmp_path)
    assert [p.name for p in found] == ["01-first.ipynb", "02-second-one.ipynb"]
    assert [p.name for p in select_notebooks(found, ["02"])] == ["02-second-one.ipynb"]
    assert [p.name for p in select_notebooks(found, ["01-first", "02-second-one.ipynb"])] == [
        "01-first.ipynb",
        "02-second-one.ipynb",
    ]
    with pytest.raises(ValueError, match="no notebook matches '07'; available: 01-first, 02-second-one"):
        select_notebooks(found, ["07"])


def test_cli_rejects_unknown_notebook_in_one_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "klsym", "report", "--only", "99-missing", "--output", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert result.returncode == 2
    assert result.stderr.startswith("klsym: error: no notebook matches '99-missing'")
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_cli_rejects_zero_jobs(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "klsym", "report", "--jobs", "0", "--output", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert result.returncode == 2
    assert result.stderr.strip() == "klsym: error: --jobs must be at least 1, got 0"


# ----------------------------------------------------------------------------- builds
@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A first build of two tiny notebooks (both executed, 2 workers)."""
    root = tmp_path_factory.mktemp("tiny")
    notebooks, output = root / "notebooks", root / "reports"
    notebooks.mkdir()
    write_notebook(
        notebooks / "01-alpha.ipynb",
        "import matplotlib.pyplot as plt\nplt.plot([0, 1], [0, scale]); plt.show()\nprint('alpha seed', seed)",
        title="Alpha",
    )
    write_notebook(notebooks / "02-beta.ipynb", "print('beta scale', scale)", title="Beta")
    (notebooks / "small_parameters.json").write_text(json.dumps({"02-beta": {"scale": 0.5}}))
    result = build_report(output, notebooks_dir=notebooks, jobs=2, log=lambda *_: None)
    return result, notebooks, output


def test_first_build_executes_every_notebook_and_links_them(built):
    result, _, output = built
    assert result.executed == ["01-alpha.ipynb", "02-beta.ipynb"]
    index = (output / "index.html").read_text()
    for page in ("01-alpha.html", "02-beta.html"):
        assert f'href="{page}"' in index
        assert (output / page).exists()
        assert (output / "executed" / page.replace(".html", ".ipynb")).exists()
    assert (output / "static" / "mathjax" / "MathJax.js").exists()
    assert not list(output.parent.glob(".reports.*")), "temporary build folders left behind"


def test_pages_record_version_commit_parameters_and_seed(built):
    _, _, output = built
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    page = (output / "01-alpha.html").read_text()
    cells = dict(re.findall(r"<tr><th>([^<]+)</th><td>(.*?)</td></tr>", page))
    assert cells["klsym version"] == __version__
    assert commit and commit in cells["git commit"]
    assert cells["seed"] == "3"
    assert cells["parameters"] == "<code>seed=3, scale=2.0</code>"
    executed = nbformat.read(output / "executed" / "01-alpha.ipynb", as_version=4)
    assert "alpha seed 3" in "".join(o.get("text", "") for o in executed.cells[-1].outputs)


def test_pages_are_offline_with_embedded_images(built):
    _, _, output = built
    for page in output.glob("*.html"):
        html = page.read_text()
        assert find_external_references(html) == [], page.name
        assert 'src="static/mathjax/MathJax.js' in html
    assert re.search(r'<img[^>]+src="data:image/png;base64,', (output / "01-alpha.html").read_text())


def test_unchanged_inputs_are_not_re_executed(built):
    result, notebooks, output = built
    before = (output / "executed" / "01-alpha.ipynb").read_bytes()
    again = build_report(output, notebooks_dir=notebooks, jobs=2, log=lambda *_: None)
    assert again.executed == []
    assert (output / "executed" / "01-alpha.ipynb").read_bytes() == before
    assert [p.seconds for p in again.pages] == [p.seconds for p in result.pages]


def test_small_parameters_change_the_hash_and_reach_the_kernel(built):
    _, notebooks, output = built
    small = build_report(output, notebooks_dir=notebooks, small=True, only=["02"], log=lambda *_: None)
    assert small.executed == ["02-beta.ipynb"]  # 01 has no small parameters: its page is kept
    assert [p.name for p in small.pages] == ["01-alpha.ipynb", "02-beta.ipynb"]
    executed = nbformat.read(output / "executed" / "02-beta.ipynb", as_version=4)
    assert "beta scale 0.5" in "".join(o.get("text", "") for o in executed.cells[-1].outputs)


def test_failing_notebook_stops_the_build_and_keeps_the_previous_report(built):
    _, notebooks, output = built
    index_before = (output / "index.html").read_bytes()
    state_before = (output / "build-state.json").read_bytes()
    write_notebook(notebooks / "03-broken.ipynb", "value = 1\nraise ZeroDivisionError('deliberate')", title="Broken")
    try:
        with pytest.raises(NotebookFailure) as caught:
            build_report(output, notebooks_dir=notebooks, only=["03"], log=lambda *_: None)
    finally:
        (notebooks / "03-broken.ipynb").unlink()
    failure = caught.value
    assert failure.notebook == "03-broken.ipynb"
    assert failure.ename == "ZeroDivisionError"
    assert failure.cell_index == 2  # title, parameters, then the failing cell of the source notebook
    assert str(failure).startswith(
        "notebook 03-broken.ipynb failed in cell 2 (In [2], 'value = 1'): ZeroDivisionError: deliberate"
    )
    assert failure.executed_copy == output / "failed" / "03-broken.ipynb"
    executed = nbformat.read(failure.executed_copy, as_version=4)
    errors = [
        cell.source for cell in executed.cells if any(o.get("output_type") == "error" for o in cell.get("outputs", []))
    ]
    assert errors == ["value = 1\nraise ZeroDivisionError('deliberate')"]
    assert (output / "index.html").read_bytes() == index_before
    assert (output / "build-state.json").read_bytes() == state_before
    assert not list(output.parent.glob(".reports.*")), "temporary build folders left behind"


def test_fixed_notebook_replaces_its_failed_copy(built):
    _, notebooks, output = built
    assert (output / "failed" / "03-broken.ipynb").exists()  # left by the previous test
    write_notebook(notebooks / "03-broken.ipynb", "value = 1", title="Fixed")
    try:
        result = build_report(output, notebooks_dir=notebooks, only=["03"], log=lambda *_: None)
    finally:
        (notebooks / "03-broken.ipynb").unlink()
    assert result.executed == ["03-broken.ipynb"]
    assert not (output / "failed").exists()
    assert (output / "03-broken.html").exists()


def test_cli_reports_a_failing_notebook_on_first_build(tmp_path):
    notebooks = tmp_path / "notebooks"
    notebooks.mkdir()
    write_notebook(notebooks / "01-broken.ipynb", "raise KeyError('missing')")
    result = subprocess.run(
        [sys.executable, "-m", "klsym", "report", "--notebooks", str(notebooks), "--output", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("klsym: error:")]
    assert len(errors) == 1 and re.match(
        r"klsym: error: notebook 01-broken.ipynb failed in cell \d+ .*KeyError", errors[0]
    )
    assert "Traceback" not in result.stderr
    assert (tmp_path / "out" / "failed" / "01-broken.ipynb").exists()
    assert not (tmp_path / "out" / "index.html").exists()


# ----------------------------------------------------------------------------- key findings
def test_record_payload_validates_and_round_trips_non_finite_values():
    from klsym.report.findings import RECORD_MIME, read_records, record_payload

    with pytest.raises(ValueError, match="identifier"):
        record_payload("not a name", 1.0)
    with pytest.raises(ValueError, match="cannot be written as JSON"):
        record_payload("x", object())
    payload = record_payload("spike", {"ratio": float("inf"), "n": 3})
    assert payload[RECORD_MIME]["value"] == {"ratio": "inf", "n": 3}
    notebook = {
        "cells": [
            {"cell_type": "markdown", "source": "# Title\n## 1. First"},
            {"cell_type": "code", "outputs": [{"output_type": "display_data", "data": payload, "metadata": {}}]},
            {"cell_type": "markdown", "source": "## 2. Second"},
            {
                "cell_type": "code",
                "outputs": [
                    {
                        "output_type": "display_data",
                        "metadata": {},
                        "data": record_payload("other", 0.5, section="Elsewhere"),
                    }
                ],
            },
        ]
    }
    records = read_records(notebook, "01-x")
    assert records["spike"].value == {"ratio": float("inf"), "n": 3}
    assert records["spike"].section == "1. First"  # the nearest heading above the recording cell
    assert records["other"].section == "Elsewhere"  # an explicit section wins


def test_every_registered_finding_names_a_notebook_and_formats():
    from klsym.report.findings import FINDINGS

    assert 8 <= len(FINDINGS) <= 12
    for finding in FINDINGS.values():
        assert NOTEBOOK_NAME.match(finding.notebook + ".ipynb"), finding.name
        assert "{value" in finding.template, finding.name


NOTEBOOK_NAME = re.compile(r"^\d{2}-[a-z0-9][a-z0-9-]*\.ipynb$")


def write_sectioned_notebook(path, body: str, title: str):
    notebook = new_notebook(
        cells=[
            new_markdown_cell(f"# {title}\nWhat it shows."),
            new_code_cell("seed = 1"),
            new_markdown_cell("## 2. The $k_3$ section"),
            new_code_cell(body),
        ]
    )
    notebook.cells[1].metadata["tags"] = ["parameters"]
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(notebook, path)


@pytest.fixture(scope="module")
def with_findings(tmp_path_factory):
    from klsym.report.findings import Finding

    root = tmp_path_factory.mktemp("findings")
    notebooks, output = root / "notebooks", root / "reports"
    notebooks.mkdir()
    write_sectioned_notebook(
        notebooks / "01-alpha.ipynb",
        "from klsym.report.findings import record\nrecord('alpha_share', seed / 4)\nprint('shown result')",
        "Alpha",
    )
    write_sectioned_notebook(notebooks / "02-beta.ipynb", "print('beta records nothing')", "Beta")
    registry = {
        "alpha_share": Finding(
            "alpha_share", "01-alpha", "2. The $k_3$ section", "Alpha's share is {value:.0%} of `k3`."
        ),
        "absent": Finding("absent", "07-not-written", "", "Never shown: {value}."),
    }
    result = build_report(output, notebooks_dir=notebooks, jobs=2, log=lambda *_: None, findings=registry)
    return result, notebooks, output, registry


def test_findings_open_the_index_with_computed_values_and_section_links(with_findings):
    result, _, output, _ = with_findings
    assert [f.name for f in result.findings] == ["alpha_share"]
    assert result.skipped_findings == ["absent"]  # its notebook does not exist: skipped, not an error
    index = (output / "index.html").read_text()
    assert index.index('id="key-findings"') < index.index('id="notebooks"') < index.index('id="cite"')
    item = re.search(r'<li class="finding" id="finding-alpha_share">(.*?)</li>', index, re.S).group(1)
    assert "Alpha's share is 25% of <code>k3</code>." in item
    href = re.search(r'href="([^"]+)"', item).group(1)
    page, anchor = href.split("#")
    assert page == "01-alpha.html"
    assert f'id="{anchor}"' in (output / page).read_text(), "the link must land on the section heading"
    assert "vnd.klsym.record" not in (output / page).read_text()  # recorded values are not shown as outputs


def test_registered_finding_missing_from_an_executed_notebook_fails_the_build(with_findings):
    from klsym.report.findings import Finding, MissingRecord

    _, notebooks, output, registry = with_findings
    index_before = (output / "index.html").read_bytes()
    strict = {**registry, "beta_value": Finding("beta_value", "02-beta", "", "Beta is {value}.")}
    with pytest.raises(MissingRecord, match=r"beta_value \(notebook 02-beta.ipynb\)") as caught:
        build_report(output, notebooks_dir=notebooks, log=lambda *_: None, findings=strict)
    assert (output / "index.html").read_bytes() == index_before
    assert caught.value.notebooks == ("02-beta.ipynb",)
    assert (output / "failed" / "02-beta.ipynb").exists()  # kept for inspection, as for a failing notebook
    (output / "failed" / "02-beta.ipynb").unlink()
    (output / "failed").rmdir()


def test_index_has_closed_forms_and_cite_sections(with_findings):
    _, _, output, _ = with_findings
    index = (output / "index.html").read_text()
    assert 'href="closed_forms.tex"' in index and (output / "closed_forms.tex").exists()
    assert r"\begin{align*}" in (output / "closed_forms.tex").read_text()
    cite = index.split('id="cite"', 1)[1]
    assert "@software{klsym," in cite and "A Comedy of Estimators" in cite and "Rémi" in cite
    assert (output / "references.bib").exists() and (output / "CITATION.cff").exists()


def test_notebook_pages_fold_code_behind_a_toggle(with_findings):
    _, _, output, _ = with_findings
    page = (output / "01-alpha.html").read_text()
    assert 'classList.add("klsym-hide-code")' in page
    assert "html.klsym-hide-code .jp-CodeCell > .jp-Cell-inputWrapper { display: none; }" in page
    assert 'id="klsym-code-toggle"' in page and ">show code</button>" in page


def test_check_report(with_findings):
    from klsym.report.build import check_report

    _, notebooks, output, _ = with_findings
    assert check_report(output, notebooks, min_findings=1) == []
    assert check_report(output, notebooks, min_findings=2) == ["index.html shows 1 key findings; at least 2 expected"]
    assert "does not exist" in check_report(output / "nowhere", notebooks)[0]
    stray = output / "stray.html"
    stray.write_text('<script src="https://cdn.example.org/x.js"></script>')
    try:
        assert check_report(output, notebooks, min_findings=1) == [
            "stray.html fetches external URLs: https://cdn.example.org/x.js"
        ]
    finally:
        stray.unlink()
    write_sectioned_notebook(notebooks / "03-gamma.ipynb", "print(1)", "Gamma")  # never built
    try:
        problems = check_report(output, notebooks, min_findings=1)
        assert problems == [f"03-gamma.ipynb: no page or executed copy in {output}"]
    finally:
        (notebooks / "03-gamma.ipynb").unlink()


def test_cli_prints_only_its_own_progress(tmp_path):
    """No kernel chatter (TCP-without-encryption warnings, KeyboardInterrupt at shutdown) on either stream."""
    notebooks = tmp_path / "notebooks"
    notebooks.mkdir()
    write_notebook(notebooks / "01-one.ipynb", "print('one')")
    write_notebook(notebooks / "02-two.ipynb", "print('two')")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "klsym",
            "report",
            "--notebooks",
            str(notebooks),
            "--output",
            str(tmp_path / "out"),
            "--jobs",
            "2",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    own = re.compile(
        r"^(klsym report: |  \d{2}-[a-z-]+\.ipynb: [\d.]+ s$|notebook |-+ |"
        r"\d{2}-[a-z-]+\.ipynb |report: )"
    )
    assert [line for line in result.stdout.splitlines() if not own.match(line)] == []
