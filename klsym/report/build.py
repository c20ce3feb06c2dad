r"""Build the HTML report: execute every ``notebooks/NN-*.ipynb`` with papermill, convert it to HTML
and write ``index.html`` with the derivation tables.

The report works offline: MathJax 2 is copied from the ``jupyter-server-mathjax`` package into
``static/mathjax/`` and every page points at that copy (a custom nbconvert template drops the
CDN scripts: require.js, widgets, mermaid); any external ``<script src>``/``<link href>`` left is
stripped. Figures are PNG data URIs.

``index.html`` opens with the key findings: values the notebooks recorded with
:func:`klsym.report.findings.record`, filled into the sentences of :data:`klsym.report.findings.FINDINGS`
(a registered value missing from an executed notebook stops the build). It also carries the derivation
tables, ``closed_forms.tex`` and a Cite section. Notebook pages show results first: code is folded
behind a "show code" button. Kernels talk over IPC, so the build prints only its own progress.
:func:`check_report` (``python -m klsym.report.build --check``) is what CI runs on the result.

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
import threading
import time
from collections.abc import Iterable
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from klsym import __version__
from klsym.paths import DATA_DIR, NOTEBOOKS_DIR, PACKAGE_DIR, REPORTS_DIR, ROOT
from klsym.report.findings import MissingRecord, resolve_findings

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
CITATION_FILE = "CITATION.cff"
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

    def __init__(
        self,
        notebook: str,
        cell_index: int | None,
        ename: str,
        evalue: str,
        executed_copy: Path | None,
        source: str = "",
        exec_count: int | None = None,
    ):
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
        return {
            "hash": self.input_hash,
            "seconds": self.seconds,
            "executed_at": self.executed_at,
            "title": self.title,
            "parameters": self.parameters,
            "overrides": self.overrides,
        }


@dataclass
class BuildResult:
    """What :func:`build_report` did: the pages (in notebook order) and where the report is."""

    output: Path
    pages: list[PageRecord] = field(default_factory=list)
    derivation_rows: list | None = None
    findings: list = field(default_factory=list)
    skipped_findings: list[str] = field(default_factory=list)

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
        if not (
            isinstance(statement, ast.Assign)
            and len(statement.targets) == 1
            and isinstance(statement.targets[0], ast.Name)
        ):
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
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown", None
    return commit or "unknown", bool(status.strip())


def _hash_files(digest: hashlib._Hash, paths: Iterable[Path]) -> None:
    for path in sorted(Path(p).resolve() for p in paths):
        label = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
        digest.update(label.as_posix().encode() + b"\0" + path.read_bytes() + b"\0")


def source_files(package_dir: Path = PACKAGE_DIR) -> list[Path]:
    """klsym's Python sources and report templates (inputs of every notebook)."""
    return [
        path
        for path in Path(package_dir).rglob("*")
        if path.is_file() and path.suffix in {".py", ".j2", ".json"} and "__pycache__" not in path.parts
    ]


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
    fonts = {
        path.stem: "data:font/woff;base64," + base64.b64encode(path.read_bytes()).decode("ascii")
        for path in sorted((source / "fonts" / "HTML-CSS" / WEB_FONT / "woff").glob("*.woff"))
    }
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

    from klsym.report.findings import RECORD_MIME

    notebook = nbformat.read(executed_path, as_version=4)
    for cell in notebook.cells:  # recorded values feed the findings; the page shows the notebook's own output
        if cell.get("cell_type") == "code":
            cell.outputs = [o for o in cell.get("outputs", []) if RECORD_MIME not in o.get("data", {})]
    resources = {"klsym": {"mathjax_root": MATHJAX_DIR.as_posix(), "provenance": provenance}}
    html, _ = _exporter().from_notebook_node(notebook, resources=resources)
    Path(html_path).write_text(strip_external_references(html), encoding="utf-8")


def _template_environment():
    import jinja2

    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATE_DIR / TEMPLATE_NAME)),
        autoescape=jinja2.select_autoescape(["html", "j2"]),
    )


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
def execute_notebook(source: Path, executed: Path, overrides: dict[str, Any], cwd: Path, failed_dir: Path) -> float:
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
        papermill.execute_notebook(
            str(source),
            str(executed),
            parameters=overrides,
            kernel_name=KERNEL_NAME,
            cwd=str(cwd),
            progress_bar=False,
            log_output=False,
            kernel_manager_class=_ipc_kernel_manager(),
        )
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


def _ipc_kernel_manager():
    """A kernel manager on the IPC transport (Unix sockets in the Jupyter runtime folder).

    Over TCP, ipykernel warns on stderr that traffic is unencrypted ("Kernel is running over TCP
    without encryption"), once per kernel; the report's kernels are local, so IPC is the right
    transport and the build prints only its own progress. Kernels are shut down without the
    SIGINT that jupyter_client sends first (it makes an idle kernel log a KeyboardInterrupt).
    """
    import uuid

    from jupyter_client.manager import AsyncKernelManager
    from jupyter_core.paths import jupyter_runtime_dir
    from traitlets import default

    class IPCKernelManager(AsyncKernelManager):
        @default("transport")
        def _transport_default(self) -> str:
            return "ipc"

        @default("ip")
        def _ip_default(self) -> str:
            # socket files <ip>-<port>: a prefix of its own per kernel, or parallel kernels share sockets
            runtime = Path(jupyter_runtime_dir())
            runtime.mkdir(parents=True, exist_ok=True)
            return str(runtime / f"klsym-{uuid.uuid4().hex[:12]}-ipc")

        async def _async_interrupt_kernel(self) -> None:
            # jupyter_client interrupts (SIGINT) before a graceful shutdown; a kernel that is between
            # messages then logs "KeyboardInterrupt caught in kernel" on stderr. Notebooks here have
            # finished when we shut down, so the shutdown request alone is enough.
            if not self.shutting_down:
                await super()._async_interrupt_kernel()

    return IPCKernelManager


def _keep_failed(executed: Path, failed_dir: Path, name: str) -> Path | None:
    if not Path(executed).exists():
        return None
    failed_dir.mkdir(parents=True, exist_ok=True)
    return Path(shutil.copy2(executed, failed_dir / name))


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


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


def build_report(
    output: Path = REPORTS_DIR,
    *,
    small: bool = False,
    jobs: int = 2,
    only: Iterable[str] | None = None,
    notebooks_dir: Path = NOTEBOOKS_DIR,
    log=print,
    findings: dict | None = None,
) -> BuildResult:
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
    findings : dict, optional
        The key-findings registry (:data:`klsym.report.findings.FINDINGS` by default).

    Raises
    ------
    NotebookFailure
        A notebook raised; the previous report is left as it was.
    klsym.report.findings.MissingRecord
        An executed notebook did not record a value the registry expects from it; the previous
        report is left as it was.
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
            reusable = (
                old
                and old.get("hash") == digest
                and (output / Path(path.name).with_suffix(".html")).exists()
                and (output / "executed" / path.name).exists()
            )
            if path not in selected and not reusable:
                continue  # not asked for and no up-to-date page to keep
            notebook = nbformat.read(path, as_version=4)
            parameters = {**default_parameters(notebook), **overrides}
            record = PageRecord(
                path.name,
                notebook_title(notebook, path.stem),
                parameters,
                overrides,
                digest,
                seconds=old["seconds"] if reusable else 0.0,
                executed=not reusable,
                executed_at=old.get("executed_at", "") if reusable else "",
            )
            pages[path.name] = record
            if reusable:
                shutil.copy2(output / record.html, build_dir / record.html)
                shutil.copy2(output / "executed" / path.name, build_dir / "executed" / path.name)
            else:
                to_run.append((path, record))

        log(
            f"klsym report: {len(to_run)} notebook(s) to execute, {len(pages) - len(to_run)} unchanged "
            f"({'small' if small else 'default'} parameters, {jobs} worker(s))"
        )

        log_lock = threading.Lock()

        def run_one(path: Path, record: PageRecord) -> PageRecord:
            executed = build_dir / "executed" / path.name
            record.seconds = execute_notebook(path, executed, record.overrides, notebooks_dir, output / "failed")
            record.executed_at = _now()
            provenance = {
                "version": __version__,
                "commit": commit,
                "dirty": dirty,
                "parameters": record.parameters,
                "parameters_text": record.parameters_text,
                "seed": record.seed,
                "small": small,
                "executed_at": record.executed_at,
            }
            notebook_to_html(executed, build_dir / record.html, provenance)
            with log_lock:  # print() from two workers at once interleaves text and newlines
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

        ordered = [pages[name] for name in sorted(pages)]
        try:
            findings, skipped = resolve_findings(
                {Path(page.name).stem: build_dir / "executed" / page.name for page in ordered},
                {Path(page.name).stem: page.html for page in ordered},
                findings,
            )
        except MissingRecord as err:  # keep what ran, as for a failing notebook
            for name in err.notebooks:
                _keep_failed(build_dir / "executed" / name, output / "failed", name)
            raise MissingRecord(f"{err}; executed copies kept in {output / 'failed'}", err.notebooks) from None
        copy_mathjax(build_dir / MATHJAX_DIR)
        rows, derivations_html, derivations_error = write_derivation_tables(build_dir)
        if derivations_error:
            log(f"klsym report: warning: {derivations_error}")
        write_closed_forms(build_dir)
        references = copy_citation_files(build_dir)
        _write_index(
            build_dir,
            ordered,
            derivations_html,
            derivations_error,
            commit,
            dirty,
            small,
            findings=findings,
            references=references,
        )
        (build_dir / STATE_FILE).write_text(
            json.dumps(
                {
                    "klsym_version": __version__,
                    "commit": commit,
                    "small": small,
                    "pages": {page.name: page.state() for page in ordered},
                },
                indent=2,
                sort_keys=True,
            )
        )
        _swap_in(build_dir, output)
    finally:
        shutil.rmtree(build_dir, ignore_errors=True)
    for page in ordered:  # a notebook that now ran cleanly supersedes its old failed copy
        if page.executed:
            (output / "failed" / page.name).unlink(missing_ok=True)
    if (output / "failed").is_dir() and not any((output / "failed").iterdir()):
        (output / "failed").rmdir()
    return BuildResult(output, ordered, rows, findings, skipped)


def write_closed_forms(outdir: Path) -> list[dict]:
    """Write ``closed_forms.{json,md,tex}``: the built-ins' Gaussian closed forms (klsym.derive.closed_forms)."""
    from klsym.derive.closed_forms import write_closed_forms as write

    return write(Path(outdir))


def copy_citation_files(outdir: Path) -> list:
    """Copy ``data/references.bib`` and ``CITATION.cff`` into the report; return the BibTeX entries."""
    from klsym.cli.cite import REFERENCES_FILE, load_references

    shutil.copy2(REFERENCES_FILE, Path(outdir) / REFERENCES_FILE.name)
    if (ROOT / CITATION_FILE).exists():
        shutil.copy2(ROOT / CITATION_FILE, Path(outdir) / CITATION_FILE)
    return load_references()


def _write_index(
    build_dir: Path,
    pages: list[PageRecord],
    derivations_html: str,
    derivations_error: str,
    commit: str,
    dirty: bool | None,
    small: bool,
    *,
    findings: list,
    references: list,
) -> None:
    from markupsafe import Markup

    from klsym.cli.cite import plain_text

    provenance = {"version": __version__, "commit": commit, "dirty": dirty, "executed_at": _now(), "small": small}
    derivation_files = sorted(p.name for p in build_dir.glob("derivations.*"))
    closed_form_files = sorted(p.name for p in build_dir.glob("closed_forms.*"))
    citation_files = [name for name in ("references.bib", CITATION_FILE) if (build_dir / name).exists()]
    klsym_entry = next((entry.text for entry in references if entry.key == "klsym"), "")
    html = (
        _template_environment()
        .get_template("report_index.html.j2")
        .render(
            pages=pages,
            provenance=provenance,
            mathjax_root=MATHJAX_DIR.as_posix(),
            derivations_html=Markup(derivations_html),
            derivations_error=derivations_error,
            derivation_files=derivation_files,
            closed_form_files=closed_form_files,
            findings=[Markup(finding.html()) for finding in findings],
            finding_names=[f.name for f in findings],
            references=[
                {
                    "key": entry.key,
                    **{name: plain_text(entry.fields.get(name, "")) for name in ("author", "title", "year")},
                }
                for entry in references
                if entry.key != "klsym"
            ],
            klsym_entry=klsym_entry,
            citation_files=citation_files,
        )
    )
    (build_dir / "index.html").write_text(strip_external_references(html), encoding="utf-8")


# ----------------------------------------------------------------------------- checking a built report
def check_report(
    output: Path = REPORTS_DIR, notebooks_dir: Path = NOTEBOOKS_DIR, *, min_findings: int = 8
) -> list[str]:
    """Problems of a built report (an empty list when it is complete); what CI checks after ``make report``.

    Every ``NN-*.ipynb`` of ``notebooks_dir`` has a page and an executed copy with every code cell
    run and no error output; no page fetches anything from the network; ``index.html`` opens with
    at least ``min_findings`` key findings and every registered finding of an executed notebook
    was recorded; the derivation tables and closed forms are there.
    """
    import nbformat

    from klsym.report.findings import MissingRecord

    output, problems = Path(output), []
    if not (output / "index.html").exists():
        return [f"{output / 'index.html'} does not exist: build the report first (make report)"]
    notebooks = discover_notebooks(notebooks_dir)
    for path in notebooks:
        page, executed = output / path.with_suffix(".html").name, output / "executed" / path.name
        if not page.exists() or not executed.exists():
            problems.append(f"{path.name}: no page or executed copy in {output}")
            continue
        notebook = nbformat.read(executed, as_version=4)
        code = [cell for cell in notebook.cells if cell.cell_type == "code"]
        if "papermill" not in notebook.metadata or any(cell.get("execution_count") is None for cell in code):
            problems.append(f"{path.name}: the executed copy has cells that did not run")
        if any(o.get("output_type") == "error" for cell in code for o in cell.get("outputs", [])):
            problems.append(f"{path.name}: the executed copy has an error output")
    for page in sorted(output.glob("*.html")):
        external = find_external_references(page.read_text(encoding="utf-8"))
        if external:
            problems.append(f"{page.name} fetches external URLs: {', '.join(external)}")
    index = (output / "index.html").read_text(encoding="utf-8")
    shown = len(re.findall(r'<li class="finding"', index))
    if 'id="key-findings"' not in index or shown < min_findings:
        problems.append(f"index.html shows {shown} key findings; at least {min_findings} expected")
    if index.find('id="key-findings"') > index.find('id="notebooks"') >= 0:
        problems.append("index.html does not open with its key findings")
    try:
        resolve_findings(
            {
                path.stem: output / "executed" / path.name
                for path in notebooks
                if (output / "executed" / path.name).exists()
            }
        )
    except MissingRecord as err:
        problems.append(str(err))
    for name in ("derivations.tex", "closed_forms.tex", "references.bib"):
        if not (output / name).exists():
            problems.append(f"{name} is missing from the report")
    return problems


def main(argv: list[str] | None = None) -> int:
    """``python -m klsym.report.build --check [DIR]``: exit 1 and list the problems of a built report."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(
        prog="python -m klsym.report.build", description="Check a built klsym report (CI runs this after make report)."
    )
    parser.add_argument("--check", action="store_true", required=True, help="check the report")
    parser.add_argument("output", nargs="?", type=Path, default=REPORTS_DIR, help="report folder (default reports/)")
    parser.add_argument("--min-findings", type=int, default=8, help="key findings the index must show (default 8)")
    parser.add_argument(
        "--notebooks",
        type=Path,
        default=NOTEBOOKS_DIR,
        metavar="DIR",
        help="folder of the NN-name.ipynb notebooks (default notebooks/)",
    )
    args = parser.parse_args(argv)
    problems = check_report(args.output, args.notebooks, min_findings=args.min_findings)
    for problem in problems:
        print(f"klsym report check: {problem}", file=sys.stderr)
    if not problems:
        print(
            f"klsym report check: {args.output / 'index.html'} is complete "
            f"({len(discover_notebooks(args.notebooks))} notebooks executed, key findings present, offline)"
        )
    return 1 if problems else 0


__all__ = [
    "NotebookFailure",
    "PageRecord",
    "BuildResult",
    "discover_notebooks",
    "select_notebooks",
    "notebook_key",
    "load_small_parameters",
    "parameters_cell",
    "default_parameters",
    "notebook_title",
    "git_commit",
    "input_hash",
    "find_external_references",
    "strip_external_references",
    "copy_mathjax",
    "notebook_to_html",
    "write_derivation_tables",
    "write_closed_forms",
    "copy_citation_files",
    "execute_notebook",
    "build_report",
    "check_report",
]


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
