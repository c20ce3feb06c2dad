r"""Build the HTML report: execute every ``notebooks/NN-*.ipynb`` with papermill, convert it to HTML
and write ``index.html`` with the derivation tables.

The report works offline: MathJax 2 is copied from the ``jupyter-server-mathjax`` package into
``static/mathjax/`` and every page points at that copy (a custom nbconvert template drops the
CDN scripts: require.js, widgets, mermaid); any external ``<script src>``/``<link href>`` left is
stripped. Figures are PNG data URIs.

A build is incremental: a notebook is re-executed only when the hash of its inputs changed
(notebook JSON, parameters, klsym's source files, ``data/``), see :func:`input_hash`. It builds
into a temporary directory next to the output and swaps it in with renames, so a failing
notebook leaves the previous report untouched; the failing executed copy is kept under
``failed/`` and :class:`NotebookFailure` names the notebook and the cell.

>>> notebook_key("02")
'02'
>>> find_external_references('<script src="https://cdn.example/x.js"></script><img src="data:image/png;base64,AA">')
['https://cdn.example/x.js']
"""
from __future__ import annotations

import ast
import base64
import datetime as _dt
import hashlib
import json
import os
import re
import shutil
import subprocess
import time
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from klsym import __version__
from klsym.paths import DATA_DIR, NOTEBOOKS_DIR, PACKAGE_DIR, REPORTS_DIR, ROOT

#: Notebook file names the report picks up: two digits, a dash, kebab-case.
NOTEBOOK_PATTERN = re.compile(r"^(\d{2})-[a-z0-9][a-z0-9-]*\.ipynb$")
SMALL_PARAMETERS_FILE = "small_parameters.json"
TEMPLATE_DIR = PACKAGE_DIR / "report" / "templates"
TEMPLATE_NAME = "klsym"
STATE_FILE = "build-state.json"
MATHJAX_DIR = Path("static") / "mathjax"
#: Subfolders of a previous report that a new build keeps (artifacts written by tests).
PRESERVED_DIRS = ("screenshots", "failed")
KERNEL_NAME = "python3"
WEB_FONT = "STIX-Web"

_EXTERNAL_URL = r"(?:https?:)?//[^\"'\s>)]+"
_EXTERNAL_PATTERNS = [
    re.compile(r"<script\b[^>]*\bsrc\s*=\s*[\"']?(" + _EXTERNAL_URL + ")", re.I),
    re.compile(r"<link\b[^>]*\bhref\s*=\s*[\"']?(" + _EXTERNAL_URL + ")", re.I),
    re.compile(r"<(?:img|iframe|source|video|audio|embed)\b[^>]*\bsrc\s*=\s*[\"']?(" + _EXTERNAL_URL + ")", re.I),
    re.compile(r"\bimport\s*\(\s*[\"'](" + _EXTERNAL_URL + ")", re.I),
    re.compile(r"@import\s+(?:url\()?[\"']?(" + _EXTERNAL_URL + ")", re.I),
    re.compile(r"url\(\s*[\"']?(" + _EXTERNAL_URL + ")", re.I),
]
_EXTERNAL_TAGS = [
    re.compile(r"<script\b[^>]*\bsrc\s*=\s*[\"']?" + _EXTERNAL_URL + r"[^>]*>\s*</script>", re.I),
    re.compile(r"<link\b[^>]*\bhref\s*=\s*[\"']?" + _EXTERNAL_URL + r"[^>]*/?>", re.I),
]


class NotebookFailure(RuntimeError):
    """A notebook raised while executing; the report build stopped.

    ``cell_index`` is the failing cell's index in the source notebook (0-based, as in the
    ``.ipynb`` file), ``exec_count`` its ``In [n]`` number in the executed copy.
    """

    def __init__(self, notebook: str, cell_index: int | None, ename: str, evalue: str,
                 executed_copy: Path | None, source: str = "", exec_count: int | None = None):
        self.notebook, self.cell_index, self.ename, self.evalue = notebook, cell_index, ename, evalue
        self.executed_copy, self.source, self.exec_count = executed_copy, source, exec_count
        first_line = source.strip().splitlines()[0] if source.strip() else ""
        where = f"cell {cell_index}" if cell_index is not None else "an unknown cell"
        details = [f"In [{exec_count}]"] if exec_count is not None else []
        details += [repr(first_line[:80])] if first_line else []
        message = f"notebook {notebook} failed in {where}" + (f" ({', '.join(details)})" if details else "")
        message += f": {ename}: {evalue}"
        if executed_copy is not None:
            message += f"; executed copy kept at {executed_copy}"
        super().__init__(message)


@dataclass
class PageRecord:
    """One notebook page of the report."""

    name: str
    title: str
    parameters: dict[str, Any]
    overrides: dict[str, Any]
    input_hash: str
    seconds: float
    executed: bool
    executed_at: str

    @property
    def html(self) -> str:
        return Path(self.name).with_suffix(".html").name

    @property
    def seed(self) -> Any:
        return self.parameters.get("seed")

    @property
    def parameters_text(self) -> str:
        return ", ".join(f"{key}={value!r}" for key, value in self.parameters.items())

    def state(self) -> dict[str, Any]:
        return {"hash": self.input_hash, "seconds": self.seconds, "executed_at": self.executed_at,
                "title": self.title, "parameters": self.parameters, "overrides": self.overrides}


@dataclass
class BuildResult:
    """What :func:`build_report` did: the pages (in notebook order) and where the report is."""

    output: Path
    pages: list[PageRecord] = field(default_factory=list)
    derivation_rows: list | None = None

    @property
    def executed(self) -> list[str]:
        return [page.name for page in self.pages if page.executed]


# ----------------------------------------------------------------------------- discovery
def discover_notebooks(notebooks_dir: Path = NOTEBOOKS_DIR) -> list[Path]:
    """The report's notebooks: ``NN-kebab-name.ipynb`` files in ``notebooks_dir``, sorted."""
    return sorted(path for path in Path(notebooks_dir).glob("*.ipynb") if NOTEBOOK_PATTERN.match(path.name))


def notebook_key(name: str) -> str:
    """The ``NN`` prefix of a notebook name (``"02-value-estimators.ipynb"`` -> ``"02"``)."""
    return Path(name).name.split("-", 1)[0].removesuffix(".ipynb")


def select_notebooks(notebooks: list[Path], only: Iterable[str] | None) -> list[Path]:
    """Filter by ``--only`` names: ``02``, ``02-value-estimators`` or the file name.

    Raises
    ------
    ValueError
        Naming any selector that matches no notebook, with the available names.
    """
    if not only:
        return list(notebooks)
    chosen, unknown = [], []
    for selector in only:
        stem = Path(selector).name.removesuffix(".ipynb")
        matches = [nb for nb in notebooks if stem in (nb.stem, notebook_key(nb.name))]
        if not matches:
            unknown.append(selector)
        chosen += [nb for nb in matches if nb not in chosen]
    if unknown:
        available = ", ".join(nb.stem for nb in notebooks) or "(none)"
        raise ValueError(f"no notebook matches {', '.join(map(repr, unknown))}; available: {available}")
    return sorted(chosen)


def load_small_parameters(notebooks_dir: Path = NOTEBOOKS_DIR) -> dict[str, dict[str, Any]]:
    """``notebooks/small_parameters.json``: ``{notebook stem: {parameter: value}}`` ({} if absent)."""
    path = Path(notebooks_dir) / SMALL_PARAMETERS_FILE
    if not path.exists():
        return {}
    data = json.loads(path.read_text())
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise ValueError(f"{path} must map notebook names to objects of parameters")
    return data


def parameters_cell(notebook: dict) -> dict | None:
    """The code cell tagged ``parameters`` (None if there is none)."""
    for cell in notebook.get("cells", []):
        if cell.get("cell_type") == "code" and "parameters" in cell.get("metadata", {}).get("tags", []):
            return cell
    return None


def cell_source(cell: dict) -> str:
    source = cell.get("source", "")
    return "".join(source) if isinstance(source, list) else source


def default_parameters(notebook: dict) -> dict[str, Any]:
    """The literal assignments of the ``parameters`` cell, in order.

    Raises
    ------
    ValueError
        If the cell holds anything but ``name = literal`` statements.

    >>> default_parameters({"cells": [{"cell_type": "code", "metadata": {"tags": ["parameters"]},
    ...                                "source": "seed = 0\\nn = 10_000  # samples"}]})
    {'seed': 0, 'n': 10000}
    """
    cell = parameters_cell(notebook)
    if cell is None:
        return {}
    values = {}
    for statement in ast.parse(cell_source(cell)).body:
        if not (isinstance(statement, ast.Assign) and len(statement.targets) == 1
                and isinstance(statement.targets[0], ast.Name)):
            raise ValueError(f"parameters cell may only assign literals to names, got {ast.unparse(statement)!r}")
        try:
            values[statement.targets[0].id] = ast.literal_eval(statement.value)
        except ValueError:
            raise ValueError(f"parameters cell: {ast.unparse(statement)!r} is not a literal") from None
    return values


def notebook_title(notebook: dict, fallback: str) -> str:
    """The first Markdown heading of the notebook (``fallback`` if none)."""
    for cell in notebook.get("cells", []):
        if cell.get("cell_type") == "markdown":
            for line in cell_source(cell).splitlines():
                if line.startswith("#"):
                    return line.lstrip("#").strip()
    return fallback


# ----------------------------------------------------------------------------- provenance
def git_commit(root: Path = ROOT) -> tuple[str, bool | None]:
    """``(commit, dirty)`` of the repository at ``root``; ``("unknown", None)`` outside git."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                check=True, timeout=10).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                capture_output=True, text=True, check=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown", None
    return commit or "unknown", bool(status.strip())


def _hash_files(digest: "hashlib._Hash", paths: Iterable[Path]) -> None:
    for path in sorted(Path(p).resolve() for p in paths):
        label = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
        digest.update(label.as_posix().encode() + b"\0" + path.read_bytes() + b"\0")


def source_files(package_dir: Path = PACKAGE_DIR) -> list[Path]:
    """klsym's Python sources and report templates (inputs of every notebook)."""
    return [path for path in Path(package_dir).rglob("*")
            if path.is_file() and path.suffix in {".py", ".j2", ".json"} and "__pycache__" not in path.parts]


def data_files(data_dir: Path = DATA_DIR) -> list[Path]:
    return [path for path in Path(data_dir).rglob("*") if path.is_file()] if Path(data_dir).exists() else []


def input_hash(notebook_path: Path, overrides: dict, sources: list[Path], data: list[Path]) -> str:
    """SHA-256 of everything a notebook's output depends on.

    Notebook JSON, the parameter overrides, klsym's source files and ``data/`` files (each
    with its relative path, so renames count), plus the klsym version.
    """
    digest = hashlib.sha256()
    digest.update(Path(notebook_path).read_bytes() + b"\0")
    digest.update(json.dumps(overrides, sort_keys=True).encode() + b"\0")
    digest.update(__version__.encode() + b"\0")
    _hash_files(digest, [*sources, *data])
    return digest.hexdigest()


# ----------------------------------------------------------------------------- offline HTML
def find_external_references(html: str) -> list[str]:
    """URLs a page would fetch from the network (scripts, stylesheets, images, imports, CSS url())."""
    found = []
    for pattern in _EXTERNAL_PATTERNS:
        found += [match.group(1) for match in pattern.finditer(html)]
    return sorted(set(found))


def strip_external_references(html: str) -> str:
    """Drop ``<script src=...>`` and ``<link href=...>`` tags that point at http(s) URLs."""
    for pattern in _EXTERNAL_TAGS:
        html = pattern.sub("", html)
    return html


def copy_mathjax(destination: Path) -> Path:
    """Copy MathJax 2 from ``jupyter-server-mathjax`` into ``destination``.

    Kept: the loader, the combined ``TeX-AMS-MML_HTMLorMML-full`` configuration, extensions,
    the HTML-CSS output with its STIX-Web fonts, English messages; plus ``klsym-webfonts.js``,
    the same fonts as data: URIs. Left out: other languages
    and the SVG fonts (the package ships no SVG output jax).
    """
    import jupyter_server_mathjax

    source = Path(jupyter_server_mathjax.__file__).parent / "static"
    destination = Path(destination)
    skipped = {source / "localization", source / "jax" / "output" / "SVG"}

    def ignore(folder: str, names: list[str]) -> list[str]:
        return [name for name in names if Path(folder, name) in skipped]

    shutil.copytree(source, destination, ignore=ignore, dirs_exist_ok=True)
    shutil.copytree(source / "localization" / "en", destination / "localization" / "en", dirs_exist_ok=True)
    # Fonts as data: URIs: browsers block @font-face loads from file: pages (see offline_mathjax.html.j2).
    fonts = {path.stem: "data:font/woff;base64," + base64.b64encode(path.read_bytes()).decode("ascii")
             for path in sorted((source / "fonts" / "HTML-CSS" / WEB_FONT / "woff").glob("*.woff"))}
    (destination / "klsym-webfonts.js").write_text(f"window.klsymWebFonts = {json.dumps(fonts)};\n")
    return destination


def _exporter():
    from nbconvert import HTMLExporter

    exporter = HTMLExporter(template_name=TEMPLATE_NAME, extra_template_basedirs=[str(TEMPLATE_DIR)])
    exporter.embed_images = True
    return exporter


def notebook_to_html(executed_path: Path, html_path: Path, provenance: dict[str, Any]) -> None:
    """Convert an executed notebook to an offline HTML page with a provenance table."""
    import nbformat

    notebook = nbformat.read(executed_path, as_version=4)
    resources = {"klsym": {"mathjax_root": MATHJAX_DIR.as_posix(), "provenance": provenance}}
    html, _ = _exporter().from_notebook_node(notebook, resources=resources)
    Path(html_path).write_text(strip_external_references(html), encoding="utf-8")


def _template_environment():
    import jinja2

    return jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATE_DIR / TEMPLATE_NAME)),
                              autoescape=jinja2.select_autoescape(["html", "j2"]))


def write_derivation_tables(outdir: Path) -> tuple[list | None, str, str]:
    """Call :func:`klsym.derive.symbolic.write_derivations`; return ``(rows, html, error)``.

    The Markdown table is rendered with nbconvert's math-aware Markdown filter so that the
    LaTeX formulas reach MathJax intact.
    """
    from nbconvert.filters.markdown_mistune import markdown2html_mistune

    try:
        from klsym.derive.symbolic import write_derivations
    except ImportError as err:  # the lead's module has not landed yet
        return None, "", f"klsym.derive.symbolic.write_derivations is not available ({err})"
    rows = write_derivations(Path(outdir))
    markdown_path = Path(outdir) / "derivations.md"
    html = markdown2html_mistune(markdown_path.read_text(encoding="utf-8")) if markdown_path.exists() else ""
    return rows, html, "" if html else f"write_derivations did not write {markdown_path.name}"


# ----------------------------------------------------------------------------- execution
def execute_notebook(source: Path, executed: Path, overrides: dict[str, Any], cwd: Path,
                     failed_dir: Path) -> float:
    """Run one notebook with papermill; return its wall time in seconds.

    Raises
    ------
    NotebookFailure
        If a cell raises; the executed copy (with the traceback) is kept in ``failed_dir``.
    """
    import papermill
    from papermill.exceptions import PapermillExecutionError

    start = time.perf_counter()
    try:
        papermill.execute_notebook(str(source), str(executed), parameters=overrides, kernel_name=KERNEL_NAME,
                                   cwd=str(cwd), progress_bar=False, log_output=False)
    except PapermillExecutionError as err:
        kept = _keep_failed(executed, failed_dir, source.name)
        # papermill counts cells of the executed copy (with its injected-parameters cell): map back
        # to the source notebook by the cell's text
        sources = [cell_source(cell) for cell in json.loads(Path(source).read_text())["cells"]]
        index = sources.index(err.source) if err.source in sources else None
        raise NotebookFailure(source.name, index, err.ename, err.evalue, kept, err.source, err.exec_count) from None
    except Exception as err:  # kernel died, bad parameters... still one clear message
        kept = _keep_failed(executed, failed_dir, source.name)
        raise NotebookFailure(source.name, None, type(err).__name__, str(err), kept) from None
    return time.perf_counter() - start


def _keep_failed(executed: Path, failed_dir: Path, name: str) -> Path | None:
    if not Path(executed).exists():
        return None
    failed_dir.mkdir(parents=True, exist_ok=True)
    return Path(shutil.copy2(executed, failed_dir / name))


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _read_state(output: Path) -> dict[str, Any]:
    path = output / STATE_FILE
    try:
        return json.loads(path.read_text())["pages"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def _swap_in(build_dir: Path, output: Path) -> None:
    """Replace ``output`` by ``build_dir`` with two renames (keeping preserved artifact folders)."""
    old = output.with_name(f".{output.name}.old-{os.getpid()}")
    if output.exists():
        for name in PRESERVED_DIRS:
            if (output / name).exists() and not (build_dir / name).exists():
                shutil.copytree(output / name, build_dir / name)
        os.replace(output, old)
    os.replace(build_dir, output)
    shutil.rmtree(old, ignore_errors=True)


def build_report(output: Path = REPORTS_DIR, *, small: bool = False, jobs: int = 2,
                 only: Iterable[str] | None = None, notebooks_dir: Path = NOTEBOOKS_DIR,
                 log=print) -> BuildResult:
    """Execute the notebooks (only those whose inputs changed), convert them, write ``index.html``.

    Parameters
    ----------
    output : Path
        Report folder; replaced as a whole at the end of a successful build.
    small : bool
        Use the CI parameters from ``notebooks/small_parameters.json``.
    jobs : int
        Notebooks executed in parallel (each in its own kernel).
    only : iterable of str, optional
        Build only these notebooks (``02``, ``02-value-estimators``); pages of other notebooks
        from the previous report are kept if still up to date.
    notebooks_dir : Path
        Where the ``NN-*.ipynb`` notebooks are.
    log : callable
        Progress messages (``print`` by default).

    Raises
    ------
    NotebookFailure
        A notebook raised; the previous report is left as it was.
    ValueError
        Bad ``jobs`` or an ``only`` name that matches nothing.
    """
    import nbformat

    if jobs < 1:
        raise ValueError(f"--jobs must be at least 1, got {jobs}")
    output, notebooks_dir = Path(output).resolve(), Path(notebooks_dir).resolve()
    notebooks = discover_notebooks(notebooks_dir)
    if not notebooks:
        raise ValueError(f"no notebooks named NN-name.ipynb in {notebooks_dir}")
    selected = select_notebooks(notebooks, only)
    small_parameters = load_small_parameters(notebooks_dir) if small else {}
    sources, data = source_files(), data_files()
    previous = _read_state(output)
    commit, dirty = git_commit()

    output.parent.mkdir(parents=True, exist_ok=True)
    build_dir = output.with_name(f".{output.name}.build-{os.getpid()}")
    shutil.rmtree(build_dir, ignore_errors=True)
    (build_dir / "executed").mkdir(parents=True)
    try:
        pages: dict[str, PageRecord] = {}
        to_run: list[tuple[Path, PageRecord]] = []
        for path in notebooks:
            overrides = dict(small_parameters.get(path.stem, {}))
            digest = input_hash(path, overrides, sources, data)
            old = previous.get(path.name)
            reusable = (old and old.get("hash") == digest and (output / Path(path.name).with_suffix(".html")).exists()
                        and (output / "executed" / path.name).exists())
            if path not in selected and not reusable:
                continue  # not asked for and no up-to-date page to keep
            notebook = nbformat.read(path, as_version=4)
            parameters = {**default_parameters(notebook), **overrides}
            record = PageRecord(path.name, notebook_title(notebook, path.stem), parameters, overrides, digest,
                                seconds=old["seconds"] if reusable else 0.0, executed=not reusable,
                                executed_at=old.get("executed_at", "") if reusable else "")
            pages[path.name] = record
            if reusable:
                shutil.copy2(output / record.html, build_dir / record.html)
                shutil.copy2(output / "executed" / path.name, build_dir / "executed" / path.name)
            else:
                to_run.append((path, record))

        log(f"klsym report: {len(to_run)} notebook(s) to execute, {len(pages) - len(to_run)} unchanged "
            f"({'small' if small else 'default'} parameters, {jobs} worker(s))")

        def run_one(path: Path, record: PageRecord) -> PageRecord:
            executed = build_dir / "executed" / path.name
            record.seconds = execute_notebook(path, executed, record.overrides, notebooks_dir, output / "failed")
            record.executed_at = _now()
            provenance = {"version": __version__, "commit": commit, "dirty": dirty, "parameters": record.parameters,
                          "parameters_text": record.parameters_text, "seed": record.seed, "small": small,
                          "executed_at": record.executed_at}
            notebook_to_html(executed, build_dir / record.html, provenance)
            log(f"  {path.name}: {record.seconds:.1f} s")
            return record

        with ThreadPoolExecutor(max_workers=jobs) as pool:
            futures = [pool.submit(run_one, path, record) for path, record in to_run]
            _, pending = wait(futures, return_when=FIRST_EXCEPTION)
            for future in pending:
                future.cancel()
        for future in futures:  # first failure in notebook order
            if future.done() and not future.cancelled() and future.exception() is not None:
                raise future.exception()

        copy_mathjax(build_dir / MATHJAX_DIR)
        rows, derivations_html, derivations_error = write_derivation_tables(build_dir)
        if derivations_error:
            log(f"klsym report: warning: {derivations_error}")
        ordered = [pages[name] for name in sorted(pages)]
        _write_index(build_dir, ordered, derivations_html, derivations_error, commit, dirty, small)
        (build_dir / STATE_FILE).write_text(json.dumps(
            {"klsym_version": __version__, "commit": commit, "small": small,
             "pages": {page.name: page.state() for page in ordered}}, indent=2, sort_keys=True))
        _swap_in(build_dir, output)
    finally:
        shutil.rmtree(build_dir, ignore_errors=True)
    for page in ordered:  # a notebook that now ran cleanly supersedes its old failed copy
        if page.executed:
            (output / "failed" / page.name).unlink(missing_ok=True)
    if (output / "failed").is_dir() and not any((output / "failed").iterdir()):
        (output / "failed").rmdir()
    return BuildResult(output, ordered, rows)


def _write_index(build_dir: Path, pages: list[PageRecord], derivations_html: str, derivations_error: str,
                 commit: str, dirty: bool | None, small: bool) -> None:
    from markupsafe import Markup

    provenance = {"version": __version__, "commit": commit, "dirty": dirty, "executed_at": _now(),
                  "small": small}
    derivation_files = sorted(p.name for p in build_dir.glob("derivations.*"))
    html = _template_environment().get_template("report_index.html.j2").render(
        pages=pages, provenance=provenance, mathjax_root=MATHJAX_DIR.as_posix(),
        derivations_html=Markup(derivations_html), derivations_error=derivations_error,
        derivation_files=derivation_files)
    (build_dir / "index.html").write_text(strip_external_references(html), encoding="utf-8")


__all__ = ["NotebookFailure", "PageRecord", "BuildResult", "discover_notebooks", "select_notebooks",
           "notebook_key", "load_small_parameters", "parameters_cell", "default_parameters", "notebook_title",
           "git_commit", "input_hash", "find_external_references", "strip_external_references", "copy_mathjax",
           "notebook_to_html", "write_derivation_tables", "execute_notebook", "build_report"]
