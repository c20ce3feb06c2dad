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
from klsym.report.build import (NotebookFailure, build_report, default_parameters, discover_notebooks,
                          find_external_references, notebook_title, select_notebooks,
                          strip_external_references)


def write_notebook(path, body: str, parameters: str = "seed = 3\nscale = 2.0", title: str = "A tiny notebook"):
    notebook = new_notebook(cells=[new_markdown_cell(f"# {title}\nInline math $x^2$."),
                                   new_code_cell(parameters), new_code_cell(body)])
    notebook.cells[1].metadata["tags"] = ["parameters"]
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(notebook, path)
    return path


# ----------------------------------------------------------------------------- pure functions
@pytest.mark.parametrize("html, expected", [
    ('<script src="https://cdn.example.org/require.js"></script>', ["https://cdn.example.org/require.js"]),
    ("<script src='//cdn.example.org/a.js'></script>", ["//cdn.example.org/a.js"]),
    ('<link rel="stylesheet" href="http://fonts.example.org/x.css">', ["http://fonts.example.org/x.css"]),
    ('<img src="https://example.org/a.png">', ["https://example.org/a.png"]),
    ('const m = await import("https://cdn.example.org/mermaid.mjs");', ["https://cdn.example.org/mermaid.mjs"]),
    ("@font-face { src: url('https://example.org/f.woff') }", ["https://example.org/f.woff"]),
    ('<script src="static/mathjax/MathJax.js"></script><img src="data:image/png;base64,AAAA">', []),
    ('<a href="https://example.org/paper">a link is not a fetch</a>', []),
])
def test_find_external_references(html, expected):
    assert find_external_references(html) == expected


def test_strip_external_references_removes_cdn_tags_and_keeps_local_ones():
    html = ('<head><script src="https://cdnjs.example/require.min.js"></script>'
            '<link rel="stylesheet" href="https://cdn.example/x.css"/>'
            '<script src="static/mathjax/MathJax.js"></script></head>')
    stripped = strip_external_references(html)
    assert find_external_references(stripped) == []
    assert '<script src="static/mathjax/MathJax.js"></script>' in stripped


@pytest.mark.parametrize("source, message", [
    ("seed = 1\nprint(seed)", "only assign literals"),
    ("seed = 1 + rng", "not a literal"),
    ("a, b = 1, 2", "only assign literals"),
])
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
        "01-first.ipynb", "02-second-one.ipynb"]
    with pytest.raises(ValueError, match="no notebook matches '07'; available: 01-first, 02-second-one"):
        select_notebooks(found, ["07"])


def test_cli_rejects_unknown_notebook_in_one_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "klsym", "report", "--only", "99-missing",
                             "--output", str(tmp_path / "out")], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 2
    assert result.stderr.startswith("klsym: error: no notebook matches '99-missing'")
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_cli_rejects_zero_jobs(tmp_path):
    result = subprocess.run([sys.executable, "-m", "klsym", "report", "--jobs", "0",
                             "--output", str(tmp_path / "out")], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 2
    assert result.stderr.strip() == "klsym: error: --jobs must be at least 1, got 0"


# ----------------------------------------------------------------------------- builds
@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A first build of two tiny notebooks (both executed, 2 workers)."""
    root = tmp_path_factory.mktemp("tiny")
    notebooks, output = root / "notebooks", root / "reports"
    notebooks.mkdir()
    write_notebook(notebooks / "01-alpha.ipynb", "import matplotlib.pyplot as plt\n"
                   "plt.plot([0, 1], [0, scale]); plt.show()\nprint('alpha seed', seed)", title="Alpha")
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
    assert str(failure).startswith("notebook 03-broken.ipynb failed in cell 2 (In [2], 'value = 1'): "
                                   "ZeroDivisionError: deliberate")
    assert failure.executed_copy == output / "failed" / "03-broken.ipynb"
    executed = nbformat.read(failure.executed_copy, as_version=4)
    errors = [cell.source for cell in executed.cells
              if any(o.get("output_type") == "error" for o in cell.get("outputs", []))]
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
    result = subprocess.run([sys.executable, "-m", "klsym", "report", "--notebooks", str(notebooks),
                             "--output", str(tmp_path / "out")], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("klsym: error:")]
    assert len(errors) == 1 and re.match(r"klsym: error: notebook 01-broken.ipynb failed in cell \d+ .*KeyError",
                                          errors[0])
    assert "Traceback" not in result.stderr
    assert (tmp_path / "out" / "failed" / "01-broken.ipynb").exists()
    assert not (tmp_path / "out" / "index.html").exists()
