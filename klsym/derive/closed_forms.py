r"""Citable Gaussian closed forms of an estimator: mean, variance and expected gradients, by SymPy.

For :math:`q = \mathcal{N}(\mu_q, \sigma_q^2)` (the sampler) and :math:`p = \mathcal{N}(\mu_p, \sigma_p^2)`,
an estimator that expands into terms :math:`c\, r^a t^n` (:func:`~klsym.derive.gaussian_closed_form.decompose`)
has :math:`\mathbb{E}_q[r^a t^n] = \partial_a^n M(a)` with the moment generating function
:math:`M = e^{K}` of :mod:`klsym.derive.gaussian_closed_form`. Every derivative of :math:`e^K` is
:math:`e^K` times a polynomial in the derivatives of :math:`K`:

.. math:: \partial_v \left(e^K P\right) = e^K \left(P\, \partial_v K + \partial_v P\right),

so each quantity is :math:`\sum_a M(a)\, P_a` with :math:`P_a` rational in
:math:`\Delta = \mu_q - \mu_p`, the sigmas and :math:`\ell = \log(\sigma_p / \sigma_q)`; each
:math:`P_a` is factored on its own (fast, and readable). Gradients w.r.t. :math:`(\mu_q, \sigma_q)`:
``reward`` moves the sampler with the ratio held fixed, ``loss`` moves the ratio's q in the
surrogate (straight-through estimators), ``full`` is their sum. A quantity exists where every
moment it uses is finite: :math:`(a-1)\,\sigma_p^2 < a\,\sigma_q^2` for each power :math:`a`.

>>> forms = closed_forms("k3")
>>> forms["mean"]
'log(sigma_p/sigma_q) - 1/2 + sigma_q**2/(2*sigma_p**2) + (-mu_p + mu_q)**2/(2*sigma_p**2)'
>>> forms["conditions"]["variance"]
'sigma_p**2 < 2*sigma_q**2'
>>> closed_forms("k4")["mean"] is None, closed_forms("k4")["conditions"]["mean"]
(True, 'no closed form')
"""

from __future__ import annotations

from functools import cache, lru_cache
from pathlib import Path

import sympy as sp

from klsym.derive import gaussian_closed_form as gcf
from klsym.derive.diskcache import cache_key, cached_json
from klsym.derive.estimators import BUILTINS, Estimator, get_estimator
from klsym.derive.symbols import r

MU_Q = sp.Symbol("mu_q", real=True)
SIGMA_Q = sp.Symbol("sigma_q", positive=True)
MU_P = sp.Symbol("mu_p", real=True)
SIGMA_P = sp.Symbol("sigma_p", positive=True)
#: Symbols of the closed forms, by name (the JSON strings use these names).
SYMBOLS = {"mu_q": MU_Q, "sigma_q": SIGMA_Q, "mu_p": MU_P, "sigma_p": SIGMA_P}
MODES = ("loss", "reward", "full")
PARAMETERS = ("mu_q", "sigma_q")
NO_CLOSED_FORM = "no closed form"

# The MGF's own symbols (same names and assumptions as in gaussian_closed_form, hence the same
# SymPy symbols): power a of r, sampler N(m, s^2).
_A = sp.Symbol("a", real=True)
_M = sp.Symbol("m", real=True)
_S = sp.Symbol("s", positive=True)
# Working variables: Delta = mu_q - mu_p, ell = log(sigma_p / sigma_q).
_DELTA = sp.Symbol("Delta", real=True)
_ELL = sp.Symbol("ell", real=True)
#: What each gradient moves: the sampler (reward) or the ratio's q (loss).
_MOVES = {"reward": {"mu_q": _M, "sigma_q": _S}, "loss": {"mu_q": MU_Q, "sigma_q": SIGMA_Q}}


# --- derivation ----------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def _log_mgf() -> sp.Expr:
    return sp.expand_log(gcf.log_mgf(), force=True)


def _canonical(expr: sp.Expr) -> sp.Expr:
    """Rewrite at the sampler = q in Delta and ell, so that rational parts cancel and factor."""
    expr = sp.expand_log(expr.subs({_M: MU_Q, _S: SIGMA_Q}).subs(MU_Q, MU_P + _DELTA), force=True)
    return expr.subs(sp.log(SIGMA_P), _ELL + sp.log(SIGMA_Q))


@cache
def _mgf_at(a) -> sp.Expr:
    r""":math:`M(a) = \mathbb{E}_q[r^a]` in canonical variables (1 for a = 0 and a = 1)."""
    log_mgf = _canonical(_log_mgf().subs(_A, a)).subs(_ELL, sp.log(SIGMA_P) - sp.log(SIGMA_Q))
    terms = sp.Add.make_args(sp.expand(sp.expand_log(log_mgf, force=True)))
    logs = [term for term in terms if term.has(sp.log)]  # c * log(f) with numeric c: M has the factor f^c
    rest = sp.factor(sp.cancel(sp.Add(*terms) - sp.Add(*logs)))
    powers = sp.Mul(*[sp.exp(term) for term in logs]).replace(  # sqrt(factored base): sqrt(2 sigma_q^2 - sigma_p^2)
        lambda e: e.is_Pow and not e.exp.is_Integer, lambda e: sp.factor(e.base) ** e.exp
    )
    return sp.powsimp(powers * sp.exp(rest))


@cache
def _log_mgf_derivative(j: int) -> sp.Expr:
    r""":math:`\partial_a^j K` (symbolic in a; not expanded, so cheap)."""
    return _log_mgf() if j == 0 else sp.diff(_log_mgf_derivative(j - 1), _A)


@cache
def _cumulant(j: int, a, moving: sp.Symbol | None) -> sp.Expr:
    r""":math:`\partial_{moving} \partial_a^j K` at the power a, sampler = q, canonical."""
    expr = _log_mgf_derivative(j)
    if moving is not None:
        expr = sp.diff(expr, moving)
    return sp.cancel(_canonical(expr.subs(_A, a)))


@cache
def _bell(n: int) -> sp.Expr:
    r"""Complete Bell polynomial :math:`B_n(c_1, \dots, c_n)`.

    :math:`\partial_a^n e^K = e^K B_n(K', \dots, K^{(n)})`.
    """
    if n == 0:
        return sp.Integer(1)
    return sp.expand(sp.Add(*[sp.binomial(n - 1, i) * _bell(n - 1 - i) * _BELL_ARGS[i] for i in range(n)]))


_BELL_ARGS = sp.symbols("c1:9")


@cache
def _polynomial(a, n: int, moving: sp.Symbol | None) -> sp.Expr:
    r""":math:`\partial_{moving} \partial_a^n e^K / e^K` at the power a, sampler = q, canonical.

    With :math:`\kappa_j = \partial_a^j K`: :math:`B_n(\kappa)`, and for a moving parameter v,
    :math:`\partial_v K\, B_n + \sum_j \partial B_n / \partial c_j\; \partial_v \kappa_j`.
    """
    bell = _bell(n)
    values = {_BELL_ARGS[j - 1]: _cumulant(j, a, None) for j in range(1, n + 1)}
    if moving is None:
        return sp.cancel(bell.subs(values))
    result = _cumulant(0, a, moving) * bell
    result += sp.Add(*[sp.diff(bell, _BELL_ARGS[j - 1]) * _cumulant(j, a, moving) for j in range(1, n + 1)])
    return sp.cancel(result.subs(values))


def _grouped(terms, moving: sp.Symbol | None) -> dict:
    """``{M(a): sum of c * P}`` for the terms c r^a t^n (powers with equal M(a) merged)."""
    groups: dict[sp.Expr, sp.Expr] = {}
    for c, a, n in terms:
        key = _mgf_at(a)
        groups[key] = groups.get(key, 0) + c * _polynomial(a, n, moving)
    return groups


def _add(*group_maps: dict, scale: tuple = ()) -> dict:
    total: dict[sp.Expr, sp.Expr] = {}
    for i, groups in enumerate(group_maps):
        for key, value in groups.items():
            total[key] = total.get(key, 0) + (scale[i] if scale else 1) * value
    return total


def _square(groups: dict) -> dict:
    out: dict[sp.Expr, sp.Expr] = {}
    for k1, v1 in groups.items():
        for k2, v2 in groups.items():
            key = sp.powsimp(k1 * k2)
            out[key] = out.get(key, 0) + v1 * v2
    return out


def _assemble(groups: dict) -> sp.Expr:
    """Sum of factored group coefficients times their M(a), back in mu_q, sigma_q, mu_p, sigma_p."""
    back = {_DELTA: MU_Q - MU_P, _ELL: sp.log(SIGMA_P / SIGMA_Q)}
    parts = []
    for key, coefficient in groups.items():
        factored = sp.factor(sp.cancel(sp.expand(coefficient)))
        if factored == 0:
            continue
        expanded = sp.expand(factored)  # a sum of simple terms often reads better: keep the shorter
        shorter = min((factored, expanded), key=lambda e: (sp.count_ops(e), len(str(e))))
        parts.append(shorter if key == 1 else shorter * key)
    return sp.Add(*parts).subs(back)


def _condition(term_lists) -> sp.Basic:
    """Finiteness of every moment used: strictest at the largest and the smallest power a."""
    powers = [a for terms in term_lists for _, a, _ in terms]
    return sp.And(gcf.moment_condition(max(powers)), gcf.moment_condition(min(powers)))


def derive(estimator: Estimator | str) -> dict:
    r"""The closed forms as SymPy objects (``None`` where there is none).

    Returns ``{"mean", "variance", "gradient": {mode: {"mu_q", "sigma_q"}}, "conditions": {...}}``
    with the conditions as SymPy booleans.
    """
    estimator = get_estimator(estimator)
    free = (estimator.expr.free_symbols | estimator.surrogate.free_symbols) - {r}
    if free:
        names = ", ".join(sorted(map(str, free)))
        raise ValueError(f"estimator {estimator.name!r} has free parameters ({names}): give them numeric values")
    value = gcf.decompose(estimator.expr)
    surrogate = gcf.decompose(estimator.surrogate)
    square = gcf.decompose(sp.expand(estimator.expr**2)) if value is not None else None
    out = {
        "mean": None,
        "variance": None,
        "gradient": {m: {p: None for p in PARAMETERS} for m in MODES},
        "conditions": {"mean": None, "variance": None, "gradient": {m: None for m in MODES}},
    }
    if value is not None:
        mean_groups = _grouped(value, None)
        out["mean"] = _assemble(mean_groups)
        out["variance"] = _assemble(_add(_grouped(square, None), _square(mean_groups), scale=(1, -1)))
        out["conditions"]["mean"] = _condition([value])
        out["conditions"]["variance"] = _condition([square])
        out["conditions"]["gradient"]["reward"] = _condition([value])
    if surrogate is not None:
        out["conditions"]["gradient"]["loss"] = _condition([surrogate])
    if value is not None and surrogate is not None:
        out["conditions"]["gradient"]["full"] = _condition([value, surrogate])
    for parameter in PARAMETERS:
        reward = _grouped(value, _MOVES["reward"][parameter]) if value is not None else None
        loss = _grouped(surrogate, _MOVES["loss"][parameter]) if surrogate is not None else None
        gradient = out["gradient"]
        gradient["reward"][parameter] = None if reward is None else _assemble(reward)
        gradient["loss"][parameter] = None if loss is None else _assemble(loss)
        gradient["full"][parameter] = None if reward is None or loss is None else _assemble(_add(reward, loss))
    return out


# --- JSON contract, cached ---------------------------------------------------------------------------


def _text(expr) -> str | None:
    return None if expr is None else sp.sstr(expr)


def _latex(expr) -> str | None:
    return None if expr is None else sp.latex(expr)


def _condition_text(condition) -> str:
    return NO_CLOSED_FORM if condition is None else sp.sstr(condition)


def _jsonable(estimator: Estimator, derived: dict) -> dict:
    def both(render, condition_render):
        return {
            "mean": render(derived["mean"]),
            "variance": render(derived["variance"]),
            "gradient": {m: {p: render(derived["gradient"][m][p]) for p in PARAMETERS} for m in MODES},
            "conditions": {
                "mean": condition_render(derived["conditions"]["mean"]),
                "variance": condition_render(derived["conditions"]["variance"]),
                "gradient": {m: condition_render(derived["conditions"]["gradient"][m]) for m in MODES},
            },
        }

    from klsym.derive.symbolic import value_divergence

    plain = both(_text, _condition_text)
    has_any = derived["mean"] is not None or derived["conditions"]["gradient"]["loss"] is not None
    surrogate = estimator.surrogate_expr  # straight-through: loss-mode gradients differentiate it, not k
    return {
        "name": estimator.name,
        "expr": sp.sstr(estimator.expr),
        "family": "gaussian",
        "symbols": {"q": "N(mu_q, sigma_q**2)", "p": "N(mu_p, sigma_p**2)"},
        "closed_form": has_any,
        **plain,
        "surrogate": _text(surrogate),
        "mean_equals": value_divergence(estimator)["expectation"],  # "KL(q||p)" for k1, k3, k1+, k3+
        "latex": {
            **both(_latex, lambda c: NO_CLOSED_FORM if c is None else sp.latex(c)),
            "surrogate": _latex(surrogate),
        },
    }


@cache
def _closed_forms_cached(estimator: Estimator) -> dict:
    key = cache_key(
        [sp.srepr(estimator.expr), sp.srepr(estimator.surrogate), estimator.name],
        [__file__, gcf.__file__, Path(__file__).with_name("symbolic.py")],
    )  # mean_equals
    return cached_json("closed-forms", key, lambda: _jsonable(estimator, derive(estimator)))


def closed_forms(estimator: Estimator | str) -> dict:
    """The ``derive --family gaussian`` JSON object of one estimator.

    Keys: ``name``, ``mean``, ``variance``, ``gradient`` -> mode -> {``mu_q``, ``sigma_q``},
    ``conditions`` (``mean``, ``variance``, ``gradient`` -> mode), each a SymPy string in
    ``mu_q, sigma_q, mu_p, sigma_p`` (``None`` and ``"no closed form"`` where there is none), plus
    ``latex`` (the same in LaTeX), ``expr``, ``closed_form``, ``surrogate`` (the expression a
    straight-through estimator's loss-mode gradient differentiates, else ``None``) and ``mean_equals``
    (what E_q[k] equals, from :func:`klsym.derive.symbolic.value_divergence`). Cached in-process and
    on disk (:mod:`klsym.derive.diskcache`).
    """
    import copy

    return copy.deepcopy(_closed_forms_cached(get_estimator(estimator)))


def closed_form_rows(estimators=None) -> list[dict]:
    """:func:`closed_forms` for each estimator (all built-ins by default)."""
    return [closed_forms(e) for e in (estimators if estimators is not None else BUILTINS.values())]


def numeric(text: str):
    """A NumPy function ``(mu_q, sigma_q, mu_p, sigma_p) -> value`` of one closed-form string.

    The string must be one this module wrote (it is parsed with SymPy's ``sympify``).
    """
    expr = sp.sympify(text, locals=SYMBOLS)
    return sp.lambdify((MU_Q, SIGMA_Q, MU_P, SIGMA_P), expr, modules="numpy")


# --- rendering ---------------------------------------------------------------------------------------

_MODE_LABEL = {"loss": r"\text{loss}", "reward": r"\text{reward}", "full": r"\text{full}"}
_PARAMETER_LABEL = {"mu_q": r"\mu_q", "sigma_q": r"\sigma_q"}


def _entries(row: dict, source: str):
    """(label, expression, condition) triples of one row, from ``row[source]``."""
    forms = row if source == "plain" else row["latex"]
    yield r"\mathbb{E}_q[k]" if source == "latex" else "E_q[k]", forms["mean"], forms["conditions"]["mean"]
    yield r"\mathrm{Var}_q[k]" if source == "latex" else "Var_q[k]", forms["variance"], forms["conditions"]["variance"]
    for mode in MODES:
        for parameter in PARAMETERS:
            label = (
                rf"g^{{{_MODE_LABEL[mode]}}}_{{{_PARAMETER_LABEL[parameter]}}}"
                if source == "latex"
                else f"{mode} d/d{parameter}"
            )
            yield label, forms["gradient"][mode][parameter], forms["conditions"]["gradient"][mode]


def _surrogate_source(row: dict) -> str | None:
    """The built-in whose value is the surrogate (k2 for k1+ and k3+), else None."""
    expr = sp.sympify(row["surrogate"], locals={"r": r})  # a string this module wrote
    names = [name for name, e in BUILTINS.items() if not e.straight_through and e.expr == expr]
    return names[0] if names else None


def _straight_through_note(row: dict, value: str, surrogate: str, name) -> str | None:
    """Why a straight-through estimator's loss lines are not the gradient of its value (``name`` formats
    the built-in the surrogate is, for markdown or LaTeX)."""
    if row.get("surrogate") is None:
        return None
    source = _surrogate_source(row)
    source = f" (the gradient of {name(source)})" if source else ""
    return (
        f"Straight-through: the value is {value}, but the loss-mode gradient differentiates the "
        f"surrogate {surrogate}{source}, so the loss and full lines are those of s, not of k."
    )


def _shows_equality(row: dict) -> bool:
    return row.get("mean_equals") is not None and row["mean_equals"] != row["mean"]


def render_markdown(rows: list[dict]) -> str:
    """Markdown: one section per estimator, one line per quantity with its condition."""
    lines = [
        "# Gaussian closed forms",
        "",
        "q = N(mu_q, sigma_q^2) (the sampler), p = N(mu_p, sigma_p^2), r = p(x)/q(x), x ~ q. "
        "Gradients w.r.t. (mu_q, sigma_q): `loss` = E[grad k], `reward` = E[k grad log q], "
        "`full` = loss + reward.",
        "",
    ]
    for row in rows:
        lines += [f"## `{row['name']}`: k(r) = `{row['expr']}`", ""]
        note = _straight_through_note(
            row, f"k(r) = `{row['expr']}`", f"s(r) = `{row['surrogate']}`", lambda n: f"`{n}`"
        )
        if note:
            lines += [note, ""]
        if not row["closed_form"]:
            lines += [f"{NO_CLOSED_FORM} (use `klsym exact`, quadrature)", ""]
            continue
        for label, expr, condition in _entries(row, "plain"):
            shown = f"`{expr}`" if expr is not None else NO_CLOSED_FORM
            where = "" if condition in ("True", NO_CLOSED_FORM) else f" (exists if `{condition}`)"
            equals = f" = {row['mean_equals']}" if label == "E_q[k]" and _shows_equality(row) else ""
            lines.append(f"- {label} = {shown}{equals}{where}")
        lines.append("")
    return "\n".join(lines)


def render_latex(rows: list[dict]) -> str:
    r"""LaTeX: one ``align*`` per estimator (``dmath``-free, compiles with amsmath alone)."""
    from klsym import __version__
    from klsym.derive.symbolic import _tex_label, tex_standalone

    body = [
        r"\section*{Gaussian closed forms (klsym " + __version__ + ")}",
        r"$q = \mathcal{N}(\mu_q, \sigma_q^2)$ samples, $p = \mathcal{N}(\mu_p, \sigma_p^2)$, "
        r"$r = p(x)/q(x)$. $g^{\text{mode}}_{\theta}$: expected gradient w.r.t.\ $\theta$ in that mode "
        r"(loss $=\mathbb{E}_q[\nabla_\theta k]$, reward $=\mathbb{E}_q[k\,\nabla_\theta \log q]$, "
        r"full $=$ loss $+$ reward).",
    ]
    for row in rows:
        body.append(r"\subsection*{\texttt{" + row["name"].replace("_", r"\_") + "}}")
        note = _straight_through_note(
            row,
            "$k(r) = " + sp.latex(sp.sympify(row["expr"], locals={"r": r})) + "$",
            f"$s(r) = {row['latex']['surrogate']}$",
            lambda n: r"\texttt{" + n.replace("_", r"\_") + "}",
        )
        if note:
            body.append(note)
        if not row["closed_form"]:
            body.append("No closed form (computed by quadrature).")
            continue
        lines = []
        for (label, expr, condition), (_, _, plain) in zip(_entries(row, "latex"), _entries(row, "plain")):
            shown = expr if expr is not None else r"\text{no closed form}"
            where = "" if plain in ("True", NO_CLOSED_FORM) else rf" \quad \text{{if }} {condition}"
            if not lines and _shows_equality(row):  # the first line is E_q[k]
                where = rf" = \text{{{_tex_label(row['mean_equals'])}}}" + where
            lines.append(rf"{label} &= {shown}{where}")
        body += [r"\begin{align*}", " \\\\\n".join(lines), r"\end{align*}"]
    return tex_standalone(
        "\n".join(body),
        "klsym Gaussian closed forms (generated; do not edit by hand).",
        "closed_forms",
        needs="amsmath",
        packages="amsmath,amssymb",
        geometry="margin=1.5cm",
    )


def write_closed_forms(outdir, estimators=None) -> list[dict]:
    """Write ``closed_forms.json``, ``.md`` and ``.tex`` into ``outdir``; return the rows."""
    from klsym.derive.symbolic import write_renderings

    return write_renderings(outdir, "closed_forms", closed_form_rows(estimators), render_markdown, render_latex)


__all__ = [
    "SYMBOLS",
    "MU_Q",
    "SIGMA_Q",
    "MU_P",
    "SIGMA_P",
    "NO_CLOSED_FORM",
    "derive",
    "closed_forms",
    "closed_form_rows",
    "numeric",
    "render_markdown",
    "render_latex",
    "write_closed_forms",
]
