"""Every notebook: committed clean (no outputs, a ``parameters`` cell, no def/class/lambda) and
executable end to end with its small (CI) parameters, two at a time, through the report pipeline.
"""

from __future__ import annotations

import ast
import json
import re

import nbformat
import pytest

from klsym.paths import NOTEBOOKS_DIR
from klsym.report.build import (
    NOTEBOOK_PATTERN,
    SMALL_PARAMETERS_FILE,
    build_report,
    default_parameters,
    discover_notebooks,
    find_external_references,
    parameters_cell,
)

NOTEBOOKS = discover_notebooks(NOTEBOOKS_DIR)
IDS = [path.stem for path in NOTEBOOKS]


def code_without_magics(source: str) -> str:
    """IPython magics and shell escapes are not Python; blank them so that ``ast`` can parse."""
    return "\n".join("" if line.lstrip().startswith(("%", "!")) else line for line in source.splitlines())


def small_report_dir(tmp_path_factory):
    """One small-parameter report per test session, shared with tests/test_browser.py."""
    return tmp_path_factory.getbasetemp() / "small-report"


def test_every_notebook_file_follows_the_naming_convention():
    names = sorted(path.name for path in NOTEBOOKS_DIR.glob("*.ipynb"))
    assert names, "no notebooks committed"
    assert [name for name in names if not NOTEBOOK_PATTERN.match(name)] == []


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_committed_without_outputs_or_execution_counts(path):
    notebook = json.loads(path.read_text())
    dirty = [
        index
        for index, cell in enumerate(notebook["cells"])
        if cell["cell_type"] == "code" and (cell.get("outputs") or cell.get("execution_count") is not None)
    ]
    assert dirty == [], f"cells {dirty} carry outputs or execution counts: strip them before committing"
    assert "papermill" not in notebook["metadata"], "executed by papermill and committed"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_title_then_parameters_cell_of_literals(path):
    notebook = nbformat.read(path, as_version=4)
    assert notebook.metadata.get("kernelspec", {}).get("name") == "python3"
    title, parameters = notebook.cells[0], notebook.cells[1]
    assert title.cell_type == "markdown" and re.match(r"# \S", title.source), "first cell: a Markdown title"
    assert len(title.source.strip().splitlines()) > 1, "the title cell also states what the notebook shows"
    assert parameters is parameters_cell(notebook), "second cell: the code cell tagged 'parameters'"
    values = default_parameters(notebook)  # raises on anything but literal assignments
    assert values, "the parameters cell assigns nothing"
    assert not [c for c in notebook.cells if "injected-parameters" in c.metadata.get("tags", [])]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_no_function_class_or_lambda_definitions(path):
    notebook = nbformat.read(path, as_version=4)
    found = []
    for index, cell in enumerate(notebook.cells):
        if cell.cell_type != "code":
            continue
        tree = ast.parse(code_without_magics(cell.source))
        found += [
            f"cell {index}: {type(node).__name__} at line {node.lineno}"
            for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda))
        ]
    assert found == [], "notebooks stay thin: move logic into klsym"


LOOPS = (ast.For, ast.AsyncFor, ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_no_for_loops_or_comprehensions(path):
    """Tables are built by library functions (klsym.report.compare), not by loops in code cells."""
    notebook = nbformat.read(path, as_version=4)
    found = [
        f"cell {index}: {type(node).__name__} at line {node.lineno}"
        for index, cell in enumerate(notebook.cells)
        if cell.cell_type == "code"
        for node in ast.walk(ast.parse(code_without_magics(cell.source)))
        if isinstance(node, LOOPS)
    ]
    assert found == [], "no for-loops or comprehensions in notebooks: put the loop in klsym (e.g. klsym.report.compare)"


def test_loop_rule_catches_loops_and_comprehensions_only():
    caught = [
        source
        for source in (
            "for x in y: pass",
            "[x for x in y]",
            "{x for x in y}",
            "{x: 1 for x in y}",
            "sum(x for x in y)",
            "async def f():\n    async for x in y: pass",
        )
        if any(isinstance(node, LOOPS) for node in ast.walk(ast.parse(source)))
    ]
    assert len(caught) == 6
    assert not any(isinstance(node, LOOPS) for node in ast.walk(ast.parse("table = compare(names, q, p)\nf(x)[0]")))


def test_small_parameters_name_existing_notebooks_and_parameters():
    small = json.loads((NOTEBOOKS_DIR / SMALL_PARAMETERS_FILE).read_text())
    by_stem = {path.stem: path for path in NOTEBOOKS}
    assert sorted(set(small) - set(by_stem)) == [], "small parameters for notebooks that do not exist"
    for stem, overrides in small.items():
        defaults = default_parameters(nbformat.read(by_stem[stem], as_version=4))
        unknown = sorted(set(overrides) - set(defaults))
        assert unknown == [], f"{stem}: small parameters {unknown} are not in its parameters cell"
        wrong_type = [
            k
            for k, v in overrides.items()
            if type(v) is not type(defaults[k])
            and not (isinstance(v, (int, float)) and isinstance(defaults[k], (int, float)))
        ]
        assert wrong_type == [], f"{stem}: small parameters {wrong_type} change type"


@pytest.fixture(scope="session")
def small_report(tmp_path_factory):
    return build_report(small_report_dir(tmp_path_factory), small=True, jobs=2, log=lambda *_: None)


def test_every_notebook_runs_with_small_parameters(small_report):
    """papermill runs each notebook (2 workers); a failure raises NotebookFailure naming notebook and cell."""
    assert [page.name for page in small_report.pages] == [path.name for path in NOTEBOOKS]
    small = json.loads((NOTEBOOKS_DIR / SMALL_PARAMETERS_FILE).read_text())
    for page in small_report.pages:
        assert page.overrides == small.get(page.name.removesuffix(".ipynb"), {})
        executed = nbformat.read(small_report.output / "executed" / page.name, as_version=4)
        errors = [o for cell in executed.cells for o in cell.get("outputs", []) if o.get("output_type") == "error"]
        assert errors == []


def test_small_report_pages_are_offline(small_report):
    for page in [*small_report.output.glob("*.html")]:
        assert find_external_references(page.read_text()) == [], page.name


def test_index_lists_every_notebook_and_the_derivation_table(small_report):
    index = (small_report.output / "index.html").read_text()
    for path in NOTEBOOKS:
        assert f'href="{path.stem}.html"' in index
    assert "Derivation tables unavailable" not in index, "klsym.derive.symbolic.write_derivations missing or failed"
    assert "<table" in index.split('id="derivations"', 1)[1]
