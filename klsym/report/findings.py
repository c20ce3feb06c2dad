r"""Key findings: values recorded by executed notebooks, turned into the report's opening sentences.

A notebook records a number it has just computed with :func:`record`; the value travels in the
cell's output as a ``display_data`` of MIME type :data:`RECORD_MIME` (scrapbook-style: nothing is
shown in JupyterLab, the report template renders an invisible anchor). After papermill has run the
notebook, :func:`read_records` extracts the values, and :func:`resolve_findings` fills the
sentence templates of :data:`FINDINGS`, each linked to the section of the notebook that shows it
(the nearest Markdown heading above the recording cell, or the ``section`` given to ``record``).

Rules the report builder applies (:func:`resolve_findings`):

- a finding whose notebook is not part of this build (not written yet, or left out) is skipped;
- a finding whose notebook was executed but did not record its value is an error
  (:class:`MissingRecord`), so a number never silently disappears from the report.

>>> payload = record_payload("k3_reward_gradient_error", 0.25, section="2. Gradients")
>>> payload[RECORD_MIME]["name"], payload[RECORD_MIME]["value"]
('k3_reward_gradient_error', 0.25)
>>> FINDINGS["k3_reward_gradient_error"].sentence(0.25)
'k3 in the reward (`reward` mode) follows no KL: its expected gradient is 25% away from ∇KL(q||p).'
"""

from __future__ import annotations

import html
import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from klsym.jsonio import to_jsonable

#: MIME type of a recorded value in a notebook's outputs.
RECORD_MIME = "application/vnd.klsym.record+json"


@dataclass(frozen=True)
class Finding:
    """One sentence of the report's "Key findings".

    ``template`` is a :meth:`str.format` string over ``value`` (``{value:.0%}``,
    ``{value[matching]}`` for a recorded dict); ``notebook`` the stem of the notebook that
    records it (``"04-gradients"``); ``section`` the heading of the section expected to show it (documentation
    for the notebook's author; the link follows the recording cell).
    """

    name: str
    notebook: str
    section: str
    template: str

    def sentence(self, value: Any) -> str:
        """The sentence with ``value`` filled in (plain text, backticks kept)."""
        return self.template.format(value=value)


def _findings(*entries: Finding) -> dict[str, Finding]:
    return {entry.name: entry for entry in entries}


#: The report's key findings, in the order they are shown. Values are recorded by the notebooks.
FINDINGS: dict[str, Finding] = _findings(
    Finding(
        "estimators_unbiased",
        "01-overview",
        "Three-way evidence for the value: SymPy, exact, Monte Carlo",
        "{value[unbiased]} of the {value[total]} built-in estimators are unbiased for a KL direction "
        "(derived by SymPy, confirmed by the exact layer and by Monte Carlo).",
    ),
    Finding(
        "schulman_published_match",
        "02-value-estimators",
        "3. Schulman's two experiments: published vs exact vs Monte Carlo",
        "{value[matching]} of the {value[total]} numbers in Schulman's (2020) tables equal the exact "
        "value to the digits printed.",
    ),
    Finding(
        "k2_bias_far",
        "02-value-estimators",
        "4. Bias and spread as p moves away from q",
        "k2 is biased far from q: at mu_p = {value[mu_p]:g} its mean is off KL(q||p) by "
        "{value[relative_bias]:+.1%}, while k1 and k3 stay unbiased.",
    ),
    Finding(
        "k3_loss_gradient_error",
        "04-gradients",
        "5. Where published and exact differ, and why",
        "k3 as a loss (`loss` mode, as in Yang's experiment) does not follow ∇KL(q||p): its exact expected "
        "gradient is {value:.0%} away from it (it follows ∇KL(p||q)).",
    ),
    Finding(
        "k3_reward_gradient_error",
        "04-gradients",
        "2. Exact expected gradients vs the true gradients vs Monte Carlo",
        "k3 in the reward (`reward` mode) follows no KL: its expected gradient is {value:.0%} away from ∇KL(q||p).",
    ),
    Finding(
        "k4_mean_over_kl_near",
        "06-k4-audit",
        "3. What E_q[k4] tracks, near and far",
        "k4 estimates twice the KL near p = q: E_q[k4]/KL(q||p) = {value:.3f} at the nearest pair of the "
        'sweep, and Zhang\'s "true" value is KL(p||q), not the RL penalty KL(q||p).',
    ),
    Finding(
        "token_batch_spike",
        "07-token-level",
        "3. Spikes: the largest value in a batch of B tokens",
        "On an LLM-shaped vocabulary, the median largest k3 value in a batch is {value:.3g} times "
        "the per-token KL(q||p) (exact quantiles).",
    ),
    Finding(
        "k2_shift_std_reduction",
        "08-variance-reduction",
        "3. Seed 003: an optimal shift for k2 gradients",
        "The derived optimal shift of k2 cuts the per-sample standard deviation of its `loss` gradient "
        "w.r.t. mu by {value:.0%}.",
    ),
    Finding(
        "defaults_following_reverse_kl",
        "09-framework-crosswalk",
        "Three-way check of each default's gradient",
        "{value[following]} of the {value[total]} framework defaults have an expected gradient equal "
        "to ∇KL(q||p), the gradient of the penalty they are meant to apply.",
    ),
    Finding(
        "sequence_paper_claims",
        "10-sequences",
        "5. The two papers' claims, checked by number",
        "At the sequence level, {value[holds]} of the {value[total]} statements checked here (consequences of "
        "Tang & Munos (2025) and Liu et al. (2025) as summarised in issue 12) hold by exact enumeration.",
    ),
    Finding(
        "off_policy_unbiased",
        "11-off-policy",
        "5. Sequences: which weighting gives $\\nabla KL(q\\|p)$ of the sequences",
        "Off-policy, {value[unbiased]} of the {value[total]} weighting × placement × estimator combinations "
        "give an unbiased gradient of the sequence KL(q||p).",
    ),
    Finding(
        "fixed_point_at_optimum",
        "12-where-training-ends-up",
        "4. The end point against β for each framework's default setting",
        "{value[at_optimum]} of the {value[total]} framework defaults converge to the intended optimum "
        "q* ∝ p·exp(R/β).",
    ),
)


# ----------------------------------------------------------------------------- recording
def _plain(value: Any) -> Any:
    """JSON-safe copy of ``value`` (NumPy scalars/arrays to Python, non-finite floats to strings)."""
    plain = to_jsonable(value)
    json.dumps(plain, allow_nan=False)  # raises TypeError for anything not JSON
    return plain


def record_payload(name: str, value: Any, *, section: str | None = None) -> dict[str, Any]:
    """The MIME bundle :func:`record` displays.

    Raises
    ------
    ValueError
        If ``name`` is not an identifier or ``value`` cannot be written as JSON.
    """
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"record name must be an identifier, got {name!r}")
    try:
        plain = _plain(value)
    except TypeError:
        raise ValueError(f"record {name!r}: value of type {type(value).__name__} cannot be written as JSON") from None
    return {RECORD_MIME: {"name": name, "value": plain, "section": section}}


def record(name: str, value: Any, *, section: str | None = None) -> None:
    """Record ``value`` under ``name`` in the running notebook's output (for the report's findings).

    ``section`` is the heading of the section that shows the value; by default the report links
    to the nearest Markdown heading above the recording cell. Nothing is shown in the notebook
    (returns None, so a ``record(...)`` ending a cell does not echo). Outside IPython this only
    validates.
    """
    payload = record_payload(name, value, section=section)
    try:
        from IPython import get_ipython
        from IPython.display import display
    except ImportError:  # pragma: no cover - IPython is a dependency of the notebooks
        return
    if get_ipython() is not None:
        display(payload, raw=True)


# ----------------------------------------------------------------------------- reading
@dataclass(frozen=True)
class Record:
    """A value recorded by a notebook, with the heading of the section it was recorded in."""

    name: str
    value: Any
    notebook: str
    section: str


class MissingRecord(ValueError):
    """An executed notebook did not record a value that :data:`FINDINGS` expects from it.

    ``notebooks`` names the executed ``.ipynb`` files at fault.
    """

    def __init__(self, message: str, notebooks: tuple[str, ...] = ()):
        super().__init__(message)
        self.notebooks = tuple(notebooks)


_NON_FINITE = {"inf": math.inf, "-inf": -math.inf, "nan": math.nan}


def _restore(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _restore(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_restore(item) for item in value]
    return _NON_FINITE.get(value, value) if isinstance(value, str) else value


def _source(cell: Mapping) -> str:
    source = cell.get("source", "")
    return "".join(source) if isinstance(source, list) else source


def _headings(markdown: str) -> list[str]:
    return [line.lstrip("#").strip() for line in markdown.splitlines() if re.match(r"#{1,6}\s", line)]


def read_records(notebook: Mapping | str | Path, notebook_key: str | None = None) -> dict[str, Record]:
    """The values recorded in an executed notebook (a path or the parsed JSON), by name.

    A later record of the same name replaces an earlier one.
    """
    if not isinstance(notebook, Mapping):
        path = Path(notebook)
        notebook_key = notebook_key or path.stem
        notebook = json.loads(path.read_text(encoding="utf-8"))
    records: dict[str, Record] = {}
    heading = ""
    for cell in notebook.get("cells", []):
        if cell.get("cell_type") == "markdown":
            heading = (_headings(_source(cell)) or [heading])[-1]
            continue
        for output in cell.get("outputs", []) if cell.get("cell_type") == "code" else []:
            payload = output.get("data", {}).get(RECORD_MIME)
            if output.get("output_type") not in ("display_data", "execute_result") or payload is None:
                continue
            if isinstance(payload, str):  # some writers keep JSON MIME data as text
                payload = json.loads(payload)
            name = payload["name"]
            records[name] = Record(
                name, _restore(payload.get("value")), notebook_key or "", payload.get("section") or heading
            )
    return records


@dataclass(frozen=True)
class ResolvedFinding:
    """A finding with its value: the sentence and where it links."""

    name: str
    sentence: str
    value: Any
    notebook: str
    page: str
    section: str
    anchor: str

    @property
    def href(self) -> str:
        return f"{self.page}#{self.anchor}" if self.anchor else self.page

    def html(self) -> str:
        """The sentence as HTML (backtick spans as ``<code>``) with a link to its section."""
        text = re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(self.sentence, quote=False))
        label = html.escape(self.section or self.page)
        return f'{text} <a class="finding-link" href="{html.escape(self.href)}">({label})</a>'


def section_anchor(heading: str) -> str:
    """The ``id`` nbconvert gives a Markdown heading (so links match the converted pages)."""
    if not heading:
        return ""
    from nbconvert.filters.markdown_mistune import markdown2html_mistune

    match = re.search(r'\bid="([^"]*)"', markdown2html_mistune("## " + heading))
    return html.unescape(match.group(1)) if match else ""


def resolve_findings(
    executed: Mapping[str, Path], pages: Mapping[str, str] | None = None, findings: Mapping[str, Finding] | None = None
) -> tuple[list[ResolvedFinding], list[str]]:
    """Fill the findings from executed notebooks.

    Parameters
    ----------
    executed : mapping
        Notebook stem -> executed ``.ipynb`` path, for the notebooks in this build.
    pages : mapping, optional
        Notebook stem -> HTML page name (default: the executed file's name with ``.html``).
    findings : mapping, optional
        The registry (:data:`FINDINGS` by default).

    Returns
    -------
    (resolved, skipped)
        The findings in registry order, and the names skipped because their notebook is absent.

    Raises
    ------
    MissingRecord
        Naming every finding whose notebook ran but did not record it.
    """
    findings = FINDINGS if findings is None else findings
    records = {key: read_records(path, key) for key, path in executed.items()}
    resolved, skipped, missing, at_fault = [], [], [], []
    for finding in findings.values():
        if finding.notebook not in records:
            skipped.append(finding.name)
            continue
        entry = records[finding.notebook].get(finding.name)
        if entry is None:
            missing.append(f"{finding.name} (notebook {Path(executed[finding.notebook]).name})")
            at_fault.append(Path(executed[finding.notebook]).name)
            continue
        try:
            sentence = finding.sentence(entry.value)
        except (KeyError, IndexError, TypeError, ValueError) as err:
            raise MissingRecord(
                f"finding {finding.name!r}: recorded value {entry.value!r} does not fit its "
                f"sentence template ({type(err).__name__}: {err})",
                (Path(executed[finding.notebook]).name,),
            ) from None
        page = (pages or {}).get(finding.notebook) or Path(executed[finding.notebook]).with_suffix(".html").name
        resolved.append(
            ResolvedFinding(
                finding.name,
                sentence,
                entry.value,
                finding.notebook,
                page,
                entry.section,
                section_anchor(entry.section),
            )
        )
    if missing:
        raise MissingRecord(
            "executed notebooks did not record these key findings: "
            + ", ".join(missing)
            + " (call klsym.report.findings.record(name, value) in the notebook)",
            tuple(dict.fromkeys(at_fault)),
        )
    return resolved, skipped


def registry_table(findings: Iterable[Finding] | None = None) -> list[dict[str, str]]:
    """The registry as rows (name, notebook, section, template), for docs and the CLI."""
    return [
        {"name": f.name, "notebook": f.notebook, "section": f.section, "template": f.template}
        for f in (FINDINGS.values() if findings is None else findings)
    ]


__all__ = [
    "RECORD_MIME",
    "Finding",
    "FINDINGS",
    "record",
    "record_payload",
    "Record",
    "MissingRecord",
    "read_records",
    "ResolvedFinding",
    "section_anchor",
    "resolve_findings",
    "registry_table",
]
