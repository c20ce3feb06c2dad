r"""Monte Carlo estimators k(r) of KL divergence, as SymPy expressions in the ratio r = p/q.

Samples are drawn from the sampler q (in RL the current policy pi_theta); p is the reference.
An :class:`Estimator` carries its value expression and, for straight-through estimators, a
separate *surrogate* used for pathwise gradients (verl's ``k3+``: value of k3, gradient of k2).

The expression is the single source of truth: it is what :func:`sympy.latex` prints and, through
:meth:`Estimator.numeric`, what the Monte Carlo engine evaluates (rewritten in t = log r with
``expm1``/``log1p``, and a Taylor branch where |t| is tiny).

>>> get_estimator("k3").expr
r - log(r) - 1
>>> get_estimator("low_var_kl").name     # verl's name for k3
'k3'
>>> bregman("kl_forward").expr            # Schulman's reverse-KL estimator
r*log(r) - r + 1
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import sympy as sp
from sympy.codegen.cfunctions import expm1, log1p
from sympy.codegen.rewriting import expm1_opt, log1p_opt, optimize

from klsym.derive import generated
from klsym.derive.divergences import Divergence, get_divergence
from klsym.derive.formula import parse_formula
from klsym.derive.generated import TAYLOR_RADIUS, NotCacheable, globals_of, logratio_function
from klsym.derive.modes import MODES, gradient_weights
from klsym.derive.registry import ALIASES, BUILTIN_INFO, UnknownEstimatorError, canonical_name, split_names
from klsym.derive.symbols import lam as _lam_symbol
from klsym.derive.symbols import r, t

TAYLOR_ORDER = 8


@dataclass(frozen=True)
class Estimator:
    r"""An estimator :math:`k(r)` of a divergence, evaluated on samples :math:`x \sim q`.

    Parameters
    ----------
    name : str
        Registry name (``"k3"``).
    expr : sympy.Expr
        The value :math:`k(r)`, an expression in the positive symbol ``r``.
    target : str or None
        Label of the divergence it is meant to estimate (``"KL(q||p)"``).
    source : str
        Where the estimator comes from.
    surrogate_expr : sympy.Expr, optional
        Expression whose pathwise gradient is used in ``loss`` mode (straight-through).
    stable_expr : sympy.Expr, optional
        A numerically stable form in ``t = log r``; it must equal ``expr`` at ``r = exp(t)``
        (a test checks this). Only needed where the automatic rewriting overflows.
    """

    name: str
    expr: sp.Expr
    target: str | None = None
    source: str = ""
    surrogate_expr: sp.Expr | None = None
    stable_expr: sp.Expr | None = field(default=None, compare=False)

    @property
    def surrogate(self) -> sp.Expr:
        """The expression differentiated in ``loss`` mode (``expr`` unless straight-through)."""
        return self.expr if self.surrogate_expr is None else self.surrogate_expr

    @property
    def straight_through(self) -> bool:
        return self.surrogate_expr is not None

    @property
    def latex(self) -> str:
        return sp.latex(self.expr)

    @cached_property
    def numeric(self):
        r"""Vectorised :math:`t \mapsto k(e^t)` (NumPy), stable for :math:`|t| \le 700`.

        >>> float(get_estimator("k3").numeric(np.array(700.0)))   # e^700 - 701, no overflow
        1.0142320547350045e+304
        """
        return make_numeric(**self.numeric_forms["value"])

    @cached_property
    def numeric_dt(self):
        r"""Vectorised :math:`t \mapsto \frac{d}{dt} s(e^t)` for the surrogate ``s``.

        The pathwise (``loss``) gradient of one sample is ``-numeric_dt(t) * score`` because
        :math:`\nabla_\theta t = -\nabla_\theta \log q_\theta(x)`.
        """
        return make_numeric(**self.numeric_forms["slope"])

    @property
    def numeric_forms(self) -> dict:
        """The keyword arguments of :func:`make_numeric` for ``value`` (:attr:`numeric`) and ``slope`` (:attr:`numeric_dt`)."""
        stable = self.stable_expr if self.surrogate_expr is None else None
        stable_dt = None if stable is None else sp.diff(stable, t)
        return {
            "value": {"expr": self.expr, "stable": self.stable_expr},
            "slope": {"expr": sp.diff(in_logratio(self.surrogate), t), "stable": stable_dt, "variable_is_t": True},
        }

    def describe(self) -> dict:
        return {
            "name": self.name,
            "expr": sp.sstr(self.expr),
            "latex": self.latex,
            "surrogate": None if self.surrogate_expr is None else sp.sstr(self.surrogate_expr),
            "target": self.target,
            "source": self.source,
        }


def in_logratio(expr: sp.Expr) -> sp.Expr:
    r"""Rewrite :math:`k(r)` as a function of :math:`t = \log r`.

    >>> in_logratio(r - 1 - sp.log(r))
    -t + exp(t) - 1
    """
    return sp.expand_log(expr.subs(r, sp.exp(t)), force=True)


def make_numeric(expr: sp.Expr, stable: sp.Expr | None = None, *, variable_is_t: bool = False, module: str = "numpy"):
    r"""Lambdify an expression (in r, or in t when ``variable_is_t``) into a function of t.

    The closed form is rewritten with ``expm1``/``log1p``; for :math:`|t| <` ``TAYLOR_RADIUS``
    its Taylor polynomial in t is used instead, which removes the cancellation of forms such as
    :math:`e^t - 1 - t` near :math:`t = 0`. ``module`` is a lambdify module (``"numpy"``,
    ``"cupy"``). The returned function carries the SymPy body it evaluates as ``.expression``:
    ``Piecewise((taylor, |t| < R), (closed, True))``.

    >>> f = make_numeric(r - 1 - sp.log(r))
    >>> f.expression.args[1].expr
    -t + expm1(t)
    """
    e_t = expr if variable_is_t else in_logratio(expr)
    xp = np if module == "numpy" else __import__(module)
    # warm: generated code read from disk and compiled, no sympify/lambdify; the body only when asked for
    plan = numeric_code(e_t, stable, variable_is_t=True, module=module)
    if plan is None:
        return compile_logratio_function(_numeric_body(e_t, stable), module, xp=xp)
    return logratio_function(plan, xp, lambda: _numeric_body(e_t, stable))


def numeric_code(
    expr: sp.Expr, stable: sp.Expr | None = None, *, variable_is_t: bool = False, module: str = "numpy"
) -> dict | None:
    """The generated code :func:`make_numeric` compiles, as JSON data (:func:`klsym.derive.generated.logratio_function`
    runs it), kept on disk keyed by the expressions, the versions and this module's source; ``None`` where the code
    reads a global klsym cannot name again."""
    e_t = expr if variable_is_t else in_logratio(expr)
    free = e_t.free_symbols - {t}
    if free:
        names = ", ".join(sorted(map(str, free)))
        raise ValueError(f"estimator has free parameters ({names}): give them numeric values first")
    from klsym.derive.diskcache import cache_key, cached_json

    xp = np if module == "numpy" else __import__(module)

    def generate():
        try:
            return _plan(_numeric_body(e_t, stable), xp, module)
        except NotCacheable:
            return None

    key = cache_key([sp.srepr(e_t), sp.srepr(stable), module], [__file__, generated.__file__])  # code, its runner
    return cached_json("logratio-code", key, generate)


def _numeric_body(e_t: sp.Expr, stable: sp.Expr | None) -> sp.Expr:
    """The body of :func:`make_numeric`; kept on disk as ``srepr`` text (:mod:`klsym.derive.diskcache`,
    keyed by the expressions, the versions and this module's source): the series is the slow part."""
    from klsym.derive.diskcache import cache_key, cached_json

    def derive() -> str:
        closed = stable if stable is not None else optimize(e_t, [expm1_opt, log1p_opt])
        taylor = _taylor(e_t)
        return sp.srepr(closed if taylor is None else sp.Piecewise((taylor, sp.Abs(t) < TAYLOR_RADIUS), (closed, True)))

    text = cached_json("numeric", cache_key([sp.srepr(e_t), sp.srepr(stable)], [__file__]), derive)
    return sp.sympify(text, locals={"expm1": expm1, "log1p": log1p})  # text klsym wrote, not user input


def compile_logratio_function(body: sp.Expr, module: str = "numpy", *, xp=None):
    r"""Compile a body built by :func:`make_numeric` into a fast vectorised function of t.

    Lambdified as is, a Piecewise runs every branch through ``select`` and the Taylor powers
    :math:`t^7` cost more than the closed form. Here the closed form runs everywhere (a two-piece
    Piecewise becomes ``where``) and the Taylor polynomial, in Horner form, replaces it where
    :math:`|t| <` ``TAYLOR_RADIUS``. ``xp`` is the array module (default: ``module`` imported).

    >>> f = compile_logratio_function(get_estimator("k2").numeric_dt.expression)
    >>> values = np.array([1e-5, 2.0]); out = f(values); out[:] = 7.0; values   # input untouched
    array([1.e-05, 2.e+00])
    """
    if xp is None:
        xp = np if module == "numpy" else __import__(module)
    return logratio_function(_plan(body, xp, module, cacheable=False), xp, lambda: body)


def _plan(body: sp.Expr, xp, module: str | None = None, cacheable: bool = True) -> dict:
    """The generated code of the pieces of ``body`` (JSON data): ``{"taylor": code or None, "closed": piece}``."""
    mapping = [{"expm1": xp.expm1, "log1p": xp.log1p}, module or xp.__name__]
    taylor, closed = None, body
    if isinstance(body, sp.Piecewise) and body.args[0].cond == (sp.Abs(t) < TAYLOR_RADIUS):
        taylor = _code(sp.horner(body.args[0].expr), xp, mapping, cacheable)
        closed = body.args[1].expr
    return {"taylor": taylor, "closed": _piece_plan(closed, xp, mapping, cacheable)}


def _piece_plan(expr: sp.Expr, xp, mapping, cacheable: bool) -> dict:
    """A two-piece Piecewise is kept as pieces: its second piece runs only where the first does not apply."""
    if isinstance(expr, sp.Piecewise) and len(expr.args) == 2 and expr.args[1].cond == sp.true:
        return {
            "condition": _code(expr.args[0].cond, xp, mapping, cacheable),
            "first": _piece_plan(expr.args[0].expr, xp, mapping, cacheable),
            "second": _piece_plan(expr.args[1].expr, xp, mapping, cacheable),
        }
    return {"function": _code(expr, xp, mapping, cacheable)}


def _code(expr: sp.Expr, xp, mapping, cacheable: bool) -> dict:
    """lambdify's source for t -> expr and where each global it reads comes from (the array module, a module,
    a builtin); with ``cacheable=False`` the compiled function itself rides along."""
    import inspect

    fn = sp.lambdify(t, expr, modules=mapping)
    if not cacheable:
        return {"compiled": fn}
    return {"source": inspect.getsource(fn), "name": fn.__name__, "globals": globals_of(fn, xp)}


def _taylor(e_t: sp.Expr) -> sp.Expr | None:
    """Taylor polynomial of e_t at t = 0, or None where it is not analytic there."""
    if e_t.has(sp.Abs, sp.Piecewise, sp.sign):
        return None
    try:  # series and degree can fail on exotic user formulas (exp(exp(r))): no Taylor branch, the closed form works
        poly = sp.series(e_t, t, 0, TAYLOR_ORDER).removeO()
        if poly.has(sp.log, sp.Order) or any(p.is_negative for p in _powers_of_t(poly)):
            return None
        sp.horner(poly)  # the compiled branch is its Horner form: Poly fails on coefficients like exp(E)
    except Exception:
        return None
    return poly


def _powers_of_t(poly: sp.Expr):
    for term in sp.Add.make_args(sp.expand(poly)):
        yield sp.degree(term, t) if term.is_polynomial(t) else sp.Integer(-1)


# --- built-ins ---------------------------------------------------------------------------------

_log_r = sp.log(r)

# k4 = log((r-1)^2 + 1): past t = 40 factor out e^{2t} so nothing overflows at t = 700 (40 keeps
# expm1(t)^2 and the derivative's e^t expm1(t) finite in float32 too); the first form is exact below.
_K4_STABLE = sp.Piecewise(
    (log1p(expm1(t) ** 2), t <= 40),
    (2 * t + log1p(2 * sp.exp(-2 * t) - 2 * sp.exp(-t)), True),
)

#: name -> (value k(r), surrogate differentiated in ``loss`` mode if straight-through, stable form in t)
_EXPRESSIONS = {
    "k1": (-_log_r, None, None),
    "k2": (_log_r**2 / 2, None, None),
    "k3": (r - 1 - _log_r, None, None),
    "k4": (sp.log((r - 1) ** 2 + 1), None, _K4_STABLE),
    "rev_k1": (r * _log_r, None, None),
    "rev_k2": (r, None, None),
    "rev_k3": (r * _log_r - (r - 1), None, None),
    "k1+": (-_log_r, _log_r**2 / 2, None),
    "k3+": (r - 1 - _log_r, _log_r**2 / 2, None),
}

#: The built-ins in the order of :data:`klsym.derive.registry.BUILTIN_INFO` (their targets and sources).
BUILTINS: dict[str, Estimator] = {
    name: Estimator(name, expr, info.target, info.source, surrogate_expr=surrogate, stable_expr=stable)
    for name, info in BUILTIN_INFO.items()
    for expr, surrogate, stable in [_EXPRESSIONS[name]]
}


def get_estimator(name: str | Estimator) -> Estimator:
    """Look up a built-in estimator (or alias); an :class:`Estimator` passes through.

    >>> get_estimator("k5")
    Traceback (most recent call last):
    ...
    klsym.derive.registry.UnknownEstimatorError: unknown estimator 'k5'; built-ins: k1, k2, k3, k4, rev_k1, rev_k2, rev_k3, k1+, k3+; aliases: kl, mse, low_var_kl, low_var_kl+, reverse_k1, reverse_k2
    """
    if isinstance(name, Estimator):
        return name
    return BUILTINS[canonical_name(name)]


def get_estimators(names) -> list[Estimator]:
    """Resolve a list of names, or a comma-separated string, to estimators."""
    return [get_estimator(n) for n in split_names(names)]


def bregman(f: sp.Expr | Divergence | str, name: str | None = None) -> Estimator:
    r"""The Bregman estimator of :math:`D_f`: :math:`f(r) - f'(1)(r - 1)`.

    Unbiased for :math:`D_f` (since :math:`\mathbb{E}_q[r - 1] = 0`) and non-negative when f is
    convex (the gap between f and its tangent at 1).

    >>> bregman("kl_reverse").expr
    r - log(r) - 1
    """
    label = None
    if isinstance(f, str):
        f = get_divergence(f)
    if isinstance(f, Divergence):
        label, name, f = f.label, name or f"bregman({f.name})", f.generator
    slope = sp.simplify(sp.diff(f, r).subs(r, 1))
    return Estimator(
        name or f"bregman({sp.sstr(f)})",
        sp.expand(f - slope * (r - 1)),
        label,
        "Bregman divergence of f at r relative to 1 (Schulman 2020)",
    )


def control_variate(coefficient: sp.Expr | float = _lam_symbol) -> Estimator:
    r"""The unbiased family :math:`-\log r + \lambda (r - 1)`; ``lambda = 1`` is k3.

    >>> control_variate(1).expr
    r - log(r) - 1
    """
    coefficient = sp.nsimplify(coefficient) if isinstance(coefficient, float) else sp.sympify(coefficient)
    return Estimator(
        f"cv({sp.sstr(coefficient)})",
        -_log_r + coefficient * (r - 1),
        "KL(q||p)",
        "control variate -log r + lambda (r - 1) (Schulman 2020)",
    )


def from_formula(text: str, name: str | None = None, target: str | None = None) -> Estimator:
    """An estimator from a user's formula string, parsed safely (see :mod:`klsym.derive.formula`).

    >>> from_formula("(r - 1)**2 / 2").expr
    (r - 1)**2/2
    """
    return Estimator(name or text.strip(), parse_formula(text), target, "user formula")


__all__ = [
    "MODES",
    "gradient_weights",
    "Estimator",
    "BUILTINS",
    "ALIASES",
    "UnknownEstimatorError",
    "get_estimator",
    "get_estimators",
    "bregman",
    "control_variate",
    "from_formula",
    "in_logratio",
    "make_numeric",
    "numeric_code",
    "compile_logratio_function",
]
