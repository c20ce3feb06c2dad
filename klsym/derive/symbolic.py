r"""Symbolic analysis of an estimator k(r): what it estimates, and what its gradient follows.

For an estimator :math:`k(r)`, :math:`r = p(x)/q_\theta(x)`, :math:`x \sim q_\theta`, write the score
:math:`s = \nabla_\theta \log q_\theta(x)`. Since :math:`\nabla_\theta r = -r s`, each gradient mode is
:math:`\mathbb{E}_q[h(r)\, s]` for a coefficient :math:`h`:

.. math::

    h_\text{loss} = -r\,k_\text{sur}'(r), \qquad h_\text{reward} = k(r), \qquad
    h_\text{full} = k(r) - r\,k_\text{sur}'(r),

(``k_sur`` is the straight-through surrogate, k itself otherwise). The true gradient of an
f-divergence is :math:`\nabla_\theta \mathbb{E}_q[g(r)] = \mathbb{E}_q[(g - r g')\, s]`, and
:math:`\mathbb{E}_q[c\, s] = 0`, so a mode follows the gradient of :math:`D_g` whenever

.. math:: g(r) - r\,g'(r) = h(r) + c, \qquad g(1) = 0,

a first-order linear ODE with solution :math:`g(r) = -r \int_1^r h(u)\,u^{-2}\,du` (up to
:math:`a + b r`, which has zero gradient). Differentiating the ODE gives :math:`g'' = -h'/r`, so the
implied divergence is identified, and :math:`g''(1) = -h'(1)` computed, without integrating.

>>> from klsym.derive.estimators import get_estimator
>>> implied_gradient_divergence(get_estimator("k3"), "loss")["divergence"]
'KL(p||q)'
>>> implied_gradient_generator(get_estimator("k2"), "loss")
r - log(r) - 1
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import sympy as sp
from sympy.calculus.util import continuous_domain

from klsym import __version__
from klsym.derive.budget import (  # noqa: F401 - the budget's names, where callers have found them
    DEFAULT_TIME_BUDGET,
    BudgetExceeded,
    _time_limit,
    budget_left,
    budget_spent,
    guarded,
    time_budget,
    time_budget_seconds,
    time_limit,
)
from klsym.derive.diskcache import cache_key, cached_json_if
from klsym.derive.divergences import REGISTRY
from klsym.derive.estimators import BUILTINS, Estimator, get_estimator, in_logratio
from klsym.derive.symbols import delta, r, t, u

MODES = ("loss", "reward", "full")
POSITIVE_REALS = sp.Interval.open(0, sp.oo)
SOLVE_SECONDS = 3  # per SymPy call: past this, fall back (unevaluated integral / undecided)
# Exact probe points for counterexamples: both sides of 1, far into the tails.
_PROBES = [sp.Rational(1, 10**k) for k in (6, 3, 2, 1)] + [
    sp.Rational(1, 2),
    sp.Rational(9, 10),
    sp.Rational(11, 10),
    2,
    sp.E,
    5,
    10,
    100,
    10**3,
    10**6,
]


# --- helpers ---------------------------------------------------------------------------------


def _simplify(expr: sp.Expr) -> sp.Expr:
    try:
        with _time_limit(SOLVE_SECONDS):
            return sp.simplify(expr)
    except Exception:  # SymPy may fail anywhere inside on exotic input; treat as undecided
        return expr


def is_zero(expr: sp.Expr) -> bool:
    """Exact test that ``expr`` vanishes identically (``simplify`` then ``equals``).

    >>> is_zero(sp.log(r**2) - 2 * sp.log(r))
    True
    """
    expr = sp.expand_log(expr, force=True)
    if _clearly_nonzero(expr):
        return False
    if _simplify(expr) == 0:
        return True
    try:
        with _time_limit(SOLVE_SECONDS):
            return expr.equals(0) is True
    except Exception:  # SymPy may fail anywhere inside on exotic input; treat as undecided
        return False


_CHECK_POINTS = (sp.Rational(1, 3), sp.Rational(7, 2), sp.Rational(23, 10))


#: Values given to a parameter other than r (Amari's alpha) by :func:`_clearly_nonzero`: generic, positive.
_PARAMETER_POINTS = (sp.Rational(2, 7), sp.Rational(13, 5))


def _clearly_nonzero(expr: sp.Expr) -> bool:
    """Fast, sound rejection: a value far from 0 at some point proves expr is not identically 0.

    Other real parameters (alpha) get generic positive values too: an expression that is 0 for every
    (r, alpha) is 0 at those, so a value far from 0 there still proves it is not identically 0.
    """
    parameters = sorted(expr.free_symbols - {r}, key=str)
    if any(not (s.is_real and s.is_integer is not True and s.is_negative is not True) for s in parameters):
        return False
    points = (
        [{r: point} for point in _CHECK_POINTS]
        if not parameters
        else [{r: point, **{s: value for s in parameters}} for value in _PARAMETER_POINTS for point in _CHECK_POINTS]
    )
    for point in points:
        try:
            value = sp.N(expr.subs(point), 30)
        except Exception:  # not evaluable here: let the exact test decide
            continue
        if value.is_number and value.is_finite and abs(value) > 1e-15:
            return True
    return False


def _values_at(expr: sp.Expr) -> list[float] | None:
    """Float values at the check points, or None if any is not a finite real number."""
    values = []
    for point in _CHECK_POINTS:
        try:
            value = complex(sp.N(expr.subs(r, point), 20))
        except Exception:  # symbolic parameters left, or undefined here
            return None
        if value.imag or value.real != value.real or abs(value.real) == float("inf"):
            return None
        values.append(value.real)
    return values


def _exact_value(expr: sp.Expr) -> sp.Expr | None:
    """Simplified value, or None where it is undefined (nan, zoo) or not a closed form."""
    value = _simplify(expr)
    if value.has(sp.nan, sp.zoo, sp.Subs, sp.Derivative, sp.Limit):
        return None
    return value


def _sign_at(expr: sp.Expr, point: sp.Expr) -> int | None:
    """Sign of expr at a point, evaluated to 50 digits; None if not a real number."""
    try:
        value = sp.N(expr.subs(r, point), 50)
    except Exception:  # not evaluable at this point
        return None
    if not value.is_number or value.has(sp.nan, sp.zoo, sp.DiracDelta) or not value.is_real:
        return None
    try:
        return int(bool(value > 0)) - int(bool(value < 0))
    except TypeError:  # a relational SymPy cannot decide
        return None


def _find_negative(expr: sp.Expr, interval: sp.Interval) -> sp.Expr | None:
    for point in _PROBES:
        if interval.contains(point) is sp.true and _sign_at(expr, point) == -1:
            return point
    return None


def _test_points(roots: list, interval: sp.Interval) -> list:
    """One exact point inside each interval cut out of ``interval`` by ``roots``."""
    cuts = [interval.start] + roots + [interval.end]
    points = []
    for a, b in zip(cuts, cuts[1:]):
        if b == sp.oo:
            points.append(2 * a + 1)
        else:
            points.append(sp.nsimplify((sp.N(a) + sp.N(b)) / 2, rational=True))
    return points


# --- sign analysis -----------------------------------------------------------------------------


def sign_verdict(expr: sp.Expr, interval: sp.Interval = POSITIVE_REALS) -> dict:
    r"""Decide whether ``expr`` :math:`\ge 0` for all r in ``interval``.

    Returns ``{"holds": True|False|None, "argument": str, "counterexample": r or None}``. True
    comes with the SymPy argument that proves it; False with an exact r where ``expr < 0``;
    None when undecided. Nothing is inferred from samples alone.

    >>> sign_verdict(-sp.log(r))["counterexample"]
    3
    >>> sign_verdict((1 - sp.log(r)) / r**2)["holds"]
    False
    """
    expr = sp.expand_log(expr, force=True)
    if expr.has(sp.Piecewise):
        expr = sp.piecewise_fold(expr)  # one Piecewise on the outside: analysed piece by piece
    simplified = _simplify(expr)
    if not simplified.is_nonnegative and not isinstance(simplified, sp.Piecewise):
        factored = sp.factor(sp.together(simplified))  # exposes signs simplify() may hide
        simplified = factored if factored.is_nonnegative or factored.is_negative else simplified
    if simplified.is_nonnegative:
        return {
            "holds": True,
            "argument": f"{sp.sstr(simplified)} >= 0 by SymPy's assumptions (r > 0)",
            "counterexample": None,
        }
    if simplified.is_negative:
        witness = _test_points([], interval)[0]
        return {
            "holds": False,
            "argument": f"{sp.sstr(simplified)} < 0 on {sp.sstr(interval)}",
            "counterexample": witness,
        }
    if isinstance(simplified, sp.Piecewise):
        return _piecewise_sign(simplified, interval)
    verdict = _sign_by_zeros(simplified, interval)
    if verdict is not None:
        return verdict
    witness = _find_negative(simplified, interval)
    if witness is not None:
        return {"holds": False, "argument": f"negative at r = {sp.sstr(witness)}", "counterexample": witness}
    return {
        "holds": None,
        "argument": "undecided: no proof found and no counterexample at the probe points",
        "counterexample": None,
    }


def _sign_by_zeros(expr: sp.Expr, interval: sp.Interval) -> dict | None:
    """Continuous on the interval with finitely many zeros: the sign between zeros decides."""
    if expr.free_symbols - {r}:
        return None
    try:
        with _time_limit(SOLVE_SECONDS):
            if continuous_domain(expr, r, interval) != interval:
                return None
            zeros = sp.solveset(expr, r, interval)
    except Exception:  # SymPy may fail anywhere inside on exotic input; treat as undecided
        return None
    if zeros is not sp.S.EmptySet and (not isinstance(zeros, sp.FiniteSet) or not all(z.is_real for z in zeros)):
        return None
    roots = sorted(zeros, key=lambda z: sp.N(z)) if zeros is not sp.S.EmptySet else []
    for point in _test_points(roots, interval):
        sign = _sign_at(expr, point)
        if sign is None:
            return None
        if sign < 0:
            return {"holds": False, "argument": f"negative at r = {sp.sstr(point)}", "counterexample": point}
    where = ", ".join(sp.sstr(z) for z in roots) or "none"
    return {
        "holds": True,
        "argument": (
            f"continuous on {sp.sstr(interval)} with zeros at {{{where}}}; "
            "non-negative at a point between consecutive zeros"
        ),
        "counterexample": None,
    }


def _piecewise_sign(expr: sp.Piecewise, interval: sp.Interval) -> dict:
    remaining, arguments = interval, []
    for piece, condition in expr.args:
        try:
            region = condition.as_set().intersect(remaining)
        except NotImplementedError:
            return {
                "holds": None,
                "argument": f"undecided: condition {condition} not reducible",
                "counterexample": None,
            }
        remaining = remaining - region
        for part in region.args if isinstance(region, sp.Union) else [region]:
            if part is sp.S.EmptySet:
                continue
            if isinstance(part, sp.FiniteSet):
                signs = {z: _sign_at(piece, z) for z in part}
                negative = [z for z, sign in signs.items() if sign == -1]
                holds = False if negative else (None if None in signs.values() else True)
                verdict = {
                    "holds": holds,
                    "argument": f"values at {sp.sstr(part)}",
                    "counterexample": negative[0] if negative else None,
                }
            else:
                verdict = sign_verdict(piece, part)
            if verdict["holds"] is not True:
                return verdict
            arguments.append(f"on {sp.sstr(part)}: {verdict['argument']}")
    return {"holds": True, "argument": "; ".join(arguments), "counterexample": None}


# --- derivatives, identification ----------------------------------------------------------------


def derivatives_at_one(expr: sp.Expr, order: int = 3) -> list[sp.Expr | None]:
    r"""Exact :math:`f(1), f'(1), \ldots, f^{(order)}(1)`; None where f is not differentiable at 1.

    >>> derivatives_at_one(r - 1 - sp.log(r))
    [0, 0, 1, -2]
    >>> derivatives_at_one(sp.Abs(r - 1), 1)
    [0, None]
    """
    kinked = expr.has(sp.Abs, sp.Piecewise, sp.sign, sp.Heaviside, sp.Min, sp.Max)
    if kinked:
        folded = sp.piecewise_fold(expr.rewrite(sp.Piecewise))
        left, right = (_branch_near_one(folded, side) for side in (-1, 1))
    values = []
    for n in range(order + 1):
        if kinked and n > 0:
            a, b = (sp.diff(branch, r, n).subs(r, 1) for branch in (left, right))
            defined = values[-1] is not None and is_zero(a - b)  # f^(n) needs f^(n-1) at 1
            values.append(_exact_value(a) if defined else None)
        else:
            values.append(_exact_value(sp.diff(expr, r, n).subs(r, 1)))
    return values


def _branch_near_one(expr: sp.Expr, side: int, point: sp.Expr = sp.S.One) -> sp.Expr:
    """The smooth branch of a Piecewise that is active just left (-1) or right (+1) of ``point`` (r = 1)."""
    if not isinstance(expr, sp.Piecewise):
        return expr
    probe = point + side * sp.Rational(1, 10**9)
    for branch, condition in expr.args:
        if condition.subs(r, probe) is sp.true:
            return _branch_near_one(branch, side, point)
    return sp.nan


def _kinks(pieces: sp.Piecewise) -> list | None:
    """Points of r > 0 where the pieces of a Piecewise meet (None if SymPy cannot list them)."""
    points = set()
    try:
        with _time_limit(SOLVE_SECONDS):
            for _, condition in pieces.args:
                if condition in (sp.true, sp.false):
                    continue
                boundary = condition.as_set().boundary.intersect(POSITIVE_REALS)
                if not isinstance(boundary, sp.FiniteSet):
                    return None
                points |= set(boundary)
    except Exception:  # SymPy may fail anywhere inside on exotic input; treat as undecided
        return None
    return sorted(points, key=lambda z: sp.N(z))


def _kinks_convex(pieces: sp.Piecewise) -> dict | None:
    r"""A function convex on each piece is convex iff it is continuous at each kink c and its slope
    does not drop there: :math:`f'(c^-) \le f'(c^+)`. Verdict on the kinks, or None if undecidable."""
    kinks = _kinks(pieces)
    if kinks is None:
        return None
    for c in kinks:
        left, right = (_branch_near_one(pieces, side, c) for side in (-1, 1))
        if left.has(sp.nan) or right.has(sp.nan) or not is_zero(left.subs(r, c) - right.subs(r, c)):
            return None  # a jump (or an unidentified branch): not decided here
        jump = _sign_at(sp.diff(right, r) - sp.diff(left, r), c)
        if jump is None:
            return None
        if jump < 0:
            return {"holds": False, "argument": f"the slope drops at the kink r = {sp.sstr(c)}", "counterexample": c}
    where = ", ".join(sp.sstr(c) for c in kinks) or "none"
    return {
        "holds": True,
        "argument": (f"convex on each piece, continuous with a non-decreasing slope at the kinks r = {where}"),
        "counterexample": None,
    }


def identify(generator: sp.Expr) -> str | None:
    r"""Name the registered divergence whose generator equals ``generator`` up to :math:`a + b r`.

    Two generators differing by :math:`a + b r` have equal second derivatives, which is what is
    compared. Returns ``"zero"`` for an affine generator, ``"c*LABEL"`` for a constant multiple
    :math:`c \ne 1` of a registered generator, else None.

    >>> identify(r * sp.log(r) - r + 1)
    'KL(p||q)'
    >>> identify(-2 * sp.log(r))
    '2*KL(q||p)'
    """
    return identify_second_derivative(sp.diff(generator, r, 2))


def identify_second_derivative(second: sp.Expr) -> str | None:
    """:func:`identify` for a generator given by its second derivative g''."""
    if is_zero(second):
        return "zero"
    values = _values_at(second)  # once, not once per registered divergence
    multiples = []
    for divergence, reference, reference_values in _second_derivatives(tuple(REGISTRY.values())):
        numeric = values is not None and reference_values is not None
        differences = [abs(a - b) for a, b in zip(values, reference_values)] if numeric else None
        # a difference far above the rounding of 20-digit values proves g'' differs: skip the exact test
        if not (numeric and max(differences) > 1e-9 * max(1.0, *map(abs, values))) and is_zero(second - reference):
            return divergence.label
        ratio = second / reference  # SymPy cancels common factors: 2*DiracDelta(r - 1) / DiracDelta(r - 1) is 2
        if numeric and 0.0 not in reference_values:
            ratios = [a / b for a, b in zip(values, reference_values)]
        else:
            ratios = _values_at(ratio)
        if ratios is None or max(ratios) - min(ratios) > 1e-12 * max(map(abs, ratios)):
            continue  # not a constant multiple (or not evaluable)
        ratio = _simplify(ratio)
        if ratio.is_number and ratio.is_nonzero and ratio.is_finite:
            coefficient = "-" if ratio == -1 else f"{sp.sstr(ratio)}*"
            multiples.append(f"{coefficient}{divergence.label}")
    return multiples[0] if multiples else None


@cache
def _second_derivatives(divergences: tuple) -> tuple:
    """``(divergence, f'', f'' at the check points or None)`` per divergence, computed once per registry."""
    out = []
    for divergence in divergences:
        second = sp.diff(divergence.generator, r, 2)
        out.append((divergence, second, _values_at(second)))
    return tuple(out)


def mode_coefficient(estimator: Estimator, mode: str) -> sp.Expr:
    r"""The :math:`h(r)` with expected gradient :math:`\mathbb{E}_q[h(r)\,\nabla_\theta \log q_\theta]`.

    >>> mode_coefficient(get_estimator("k3"), "loss")
    1 - r
    """
    pathwise = -r * sp.diff(estimator.surrogate, r)
    if mode == "loss":
        return sp.expand(pathwise)
    if mode == "reward":
        return estimator.expr
    if mode == "full":
        return sp.expand(estimator.expr + pathwise)
    raise ValueError(f"unknown gradient mode {mode!r}; modes: {', '.join(MODES)}")


def implied_gradient_generator(estimator: Estimator, mode: str) -> sp.Expr:
    r"""The generator :math:`g` whose true gradient the mode's expected gradient equals.

    .. math:: g(r) = -r \int_1^r \frac{h(u)}{u^2}\,du, \qquad g(1) = 0.

    >>> implied_gradient_generator(get_estimator("k1"), "loss")
    1 - r
    """
    h = mode_coefficient(estimator, mode)
    return _generator_of_coefficient(h)


@cache
def _generator_of_coefficient(h: sp.Expr) -> sp.Expr:
    """:func:`implied_gradient_generator` for the coefficient h (modes of several estimators share one h)."""
    try:
        with _time_limit(2 * SOLVE_SECONDS):
            antiderivative = _integral_from_one(h.subs(r, u) / u**2)
    except Exception:  # SymPy may fail anywhere inside on exotic input; treat as undecided
        antiderivative = sp.Integral(h.subs(r, u) / u**2, (u, 1, r))
    return sp.expand(_simplify(-r * antiderivative))


def _integral_from_one(integrand: sp.Expr) -> sp.Expr:
    r""":math:`\int_1^r f(u)\,du`. For a sum of :math:`c\,u^b (\log u)^n` (continuous on u > 0) it is
    :math:`F(r) - F(1)` term by term with
    :math:`\int u^b \log^n u\,du = u^{b+1} \sum_{k=0}^{n} (-1)^k \frac{n!}{(n-k)!} \frac{\log^{n-k} u}{(b+1)^{k+1}}`
    (:math:`\log^{n+1} u / (n + 1)` for b = -1), which skips SymPy's integrator; otherwise SymPy's definite
    integral.

    >>> sp.expand(_integral_from_one((1 - u) / u**2))
    -log(r) + 1 - 1/r
    """
    from klsym.derive.gaussian_closed_form import decompose

    terms = decompose(integrand.subs(u, r))
    if terms is None:
        return sp.integrate(integrand, (u, 1, r))
    total = sp.Integer(0)
    for c, b, n in terms:
        if b == -1:
            antiderivative = sp.log(r) ** (n + 1) / (n + 1)
        else:
            antiderivative = r ** (b + 1) * sum(
                (-1) ** k * sp.factorial(n) / sp.factorial(n - k) * sp.log(r) ** (n - k) / (b + 1) ** (k + 1)
                for k in range(n + 1)
            )
        total += c * (antiderivative - antiderivative.subs(r, 1))
    return total


def implied_gradient_divergence(estimator: Estimator, mode: str) -> dict:
    r"""The divergence whose gradient a mode follows: ``{"generator", "divergence", "d2g1"}``.

    Identification uses :math:`g'' = -h'(r)/r`, so it needs no integral.

    >>> implied_gradient_divergence(get_estimator("rev_k2"), "loss")["divergence"]
    'KL(p||q)'
    """
    h = mode_coefficient(estimator, mode)
    second = -sp.diff(h, r) / r
    label = identify_second_derivative(second)
    d2g1 = derivatives_at_one(h, 1)[1]
    return {
        "generator": implied_gradient_generator(estimator, mode),
        "divergence": label,
        "d2g1": None if d2g1 is None else _simplify(-d2g1),
    }


def value_divergence(estimator: Estimator) -> dict:
    r"""The divergence :math:`\mathbb{E}_q[k] - k(1)` equals (up to :math:`c(r - 1)`, which has mean 0).

    >>> value_divergence(get_estimator("k3"))["divergence"]
    'KL(q||p)'
    """
    offset = derivatives_at_one(estimator.expr, 0)[0]
    generator = estimator.expr - (offset if offset is not None else 0)
    label = identify(generator) if offset is not None else None
    return {"generator": generator, "divergence": label, "expectation": _expectation_label(offset, label)}


def _expectation_label(offset, label: str | None) -> str | None:
    r"""What :math:`\mathbb{E}_q[k] = k(1) + D` is, in words: ``"1"`` for rev_k2 (D = 0), ``"KL(q||p)"``
    for k3, ``"2 + KL(q||p)"`` for k3 + 2 (for p << q, where :math:`\mathbb{E}_q[r - 1] = 0`).

    >>> _expectation_label(sp.Integer(1), "zero"), _expectation_label(sp.Integer(0), "KL(q||p)")
    ('1', 'KL(q||p)')
    """
    if label is None or offset is None:
        return None
    if label == "zero":
        return sp.sstr(offset)
    return label if offset == 0 else f"{sp.sstr(offset)} + {label}"


def normal_moment_of_t(n: int, mean: sp.Expr, var: sp.Expr) -> sp.Expr:
    r""":math:`\mathbb{E}[t^n]` for :math:`t = m + s x`, :math:`x \sim N(0, 1)`, expanded: the binomial sum with
    :math:`\mathbb{E}[x^k] = (k - 1)!!` for even k (the same expression as integrating, without the integral).

    >>> normal_moment_of_t(2, -delta**2 / 2, delta**2)
    delta**4/4 + delta**2
    """
    return sp.expand(
        sum(sp.binomial(n, k) * mean ** (n - k) * sp.sqrt(var) ** k * sp.factorial2(k - 1) for k in range(0, n + 1, 2))
    )


def local_expansion(estimator: Estimator, order: int = 4) -> dict | None:
    r"""Series of :math:`\mathbb{E}_q[k]` for :math:`q = N(0, 1)`, :math:`p = N(\delta, 1)`.

    Here :math:`t = \log r = \delta x - \delta^2/2` is :math:`N(-\delta^2/2, \delta^2)`, so
    :math:`\mathbb{E}[t^n]` is exact; the Taylor series of :math:`k(e^t)` in t gives the series in
    :math:`\delta` up to :math:`\delta^{order}`. KL is exactly :math:`\delta^2/2` in both directions.

    >>> local_expansion(get_estimator("k2"))["bias_leading"]
    delta**4/8
    """
    k_t = in_logratio(estimator.expr)
    if k_t.has(sp.Abs, sp.Piecewise, sp.sign) or k_t.free_symbols - {t}:
        return None
    try:
        with _time_limit(2 * SOLVE_SECONDS):
            taylor = sp.series(k_t, t, 0, order + 1).removeO()
    except Exception:  # SymPy may fail anywhere inside on exotic input; treat as undecided
        return None
    if taylor.has(sp.log):
        return None
    mean, var = -(delta**2) / 2, delta**2
    normal_moment = {n: normal_moment_of_t(n, mean, var) for n in range(order + 1)}
    poly = sp.Poly(sp.expand(taylor), t)
    expectation = sum(coef * normal_moment[n] for (n,), coef in poly.terms())
    expectation = sp.expand(expectation)
    if expectation.is_polynomial(delta):  # a polynomial in delta: its series is its truncation
        series = sp.Add(*[term for term in sp.Add.make_args(expectation) if sp.degree(term, delta) <= order])
    else:
        series = sp.series(expectation, delta, 0, order + 1).removeO()
    kl = delta**2 / 2
    bias = sp.expand(series - kl)
    leading = min(sp.Add.make_args(bias), key=lambda term: sp.degree(term, delta)) if bias != 0 else sp.Integer(0)
    return {"series": series, "kl": kl, "bias": bias, "bias_leading": leading}


# --- the whole analysis -----------------------------------------------------------------------


@cache
def convexity(estimator: Estimator) -> dict:
    r"""Is :math:`k''(r) \ge 0` on :math:`(0, \infty)`? A :func:`sign_verdict` of :math:`k''`.

    >>> convexity(get_estimator("k2"))["counterexample"]
    1 + 2*E

    A kinked k (Abs, Piecewise) is differentiated piece by piece: a negative k'' on a piece
    disproves convexity; with convex pieces, k is convex iff it is continuous at every kink and its
    slope does not drop there (None where SymPy cannot decide that).

    >>> from klsym.derive.estimators import from_formula
    >>> convexity(from_formula("Abs(r - 1)"))["holds"], convexity(from_formula("-Abs(r - 1)"))["holds"]
    (True, False)
    """
    expr = estimator.expr
    if not expr.has(sp.Abs, sp.Piecewise, sp.sign, sp.Min, sp.Max):
        return sign_verdict(sp.diff(expr, r, 2))
    pieces = sp.piecewise_fold(expr.rewrite(sp.Piecewise))
    verdict = sign_verdict(sp.diff(pieces, r, 2))
    if verdict["holds"] is True:
        kinks = _kinks_convex(pieces) if isinstance(pieces, sp.Piecewise) else None
        return kinks or {
            "holds": None,
            "argument": "convex on each piece; the kinks are undecided",
            "counterexample": None,
        }
    return verdict


@cache
def nonnegativity(estimator: Estimator) -> dict:
    r"""Is :math:`k(r) \ge 0` on :math:`(0, \infty)`? Proof, counterexample, or undecided.

    The tangent argument comes first: :math:`k(1) = k'(1) = 0` and k convex imply k >= 0.

    >>> nonnegativity(get_estimator("k3"))["holds"], nonnegativity(get_estimator("k1"))["counterexample"]
    (True, 3)
    """
    f1, df1 = derivatives_at_one(estimator.expr, 1)
    if f1 == 0 and df1 == 0 and convexity(estimator)["holds"] is True:
        return {
            "holds": True,
            "argument": ("k(1) = 0, k'(1) = 0 and k convex: k lies above its tangent at r = 1, which is 0"),
            "counterexample": None,
        }
    return sign_verdict(estimator.expr)


_COMPLETE: dict = {}


def analyze_symbolic(estimator: Estimator, budget: float | None = None) -> dict:
    """All derived properties as SymPy objects (complete results cached in-process).

    Runs within a time budget (``budget`` seconds, else ``$KLSYM_TIME_BUDGET``, else 30): a step
    that does not finish in it is reported undecided, naming the step (``result["undecided"]``).
    """
    if estimator in _COMPLETE:
        return _COMPLETE[estimator]
    undecided = []

    def verdict(reason):
        undecided.append(reason)
        return {"holds": None, "argument": reason, "counterexample": None}

    def nothing(value):
        def fallback(reason):
            undecided.append(reason)
            return value

        return fallback

    with time_budget(budget):
        f1, df1, d2f1, d3f1 = guarded(
            "derivatives at r = 1", lambda: derivatives_at_one(estimator.expr, 3), nothing([None] * 4)
        )
        convex = guarded("convexity", lambda: convexity(estimator), verdict)
        nonnegative = guarded("non-negativity", lambda: nonnegativity(estimator), verdict)
        value = guarded(
            "E_q[k]",
            lambda: value_divergence(estimator),
            nothing({"generator": None, "divergence": None, "expectation": None}),
        )
        gradient = {
            mode: guarded(
                f"{mode}-mode gradient",
                lambda m=mode: implied_gradient_divergence(estimator, m),
                nothing({"generator": None, "divergence": None, "d2g1": None}),
            )
            for mode in MODES
        }
        expansion = guarded("local expansion", lambda: local_expansion(estimator), nothing(None))
    result = {
        "name": estimator.name,
        "expr": estimator.expr,
        "surrogate": estimator.surrogate_expr,
        "f1": f1,
        "df1": df1,
        "d2f1": d2f1,
        "d3f1": d3f1,
        "nonnegative": nonnegative,
        "convex": convex,
        "value": value,
        "gradient": gradient,
        "local_expansion": expansion,
        "undecided": undecided,
    }
    if not undecided:
        _COMPLETE[estimator] = result
    return result


def _jsonable(result: dict) -> dict:
    def text(value):
        return None if value is None else sp.sstr(value)

    def verdict(v):
        return {"argument": v["argument"], "counterexample": text(v["counterexample"])}

    expansion = result["local_expansion"]
    return {
        "name": result["name"],
        "expr": text(result["expr"]),
        "latex": sp.latex(result["expr"]),
        "f1": text(result["f1"]),
        "df1": text(result["df1"]),
        "d2f1": text(result["d2f1"]),
        "d3f1": text(result["d3f1"]),
        "nonnegative": result["nonnegative"]["holds"],
        "convex": result["convex"]["holds"],
        "value": {
            "generator": text(result["value"]["generator"]),
            "divergence": result["value"]["divergence"],
            "expectation": result["value"].get("expectation"),
        },
        "gradient": {
            mode: {"generator": text(g["generator"]), "divergence": g["divergence"], "d2g1": text(g["d2g1"])}
            for mode, g in result["gradient"].items()
        },
        "surrogate": text(result["surrogate"]),
        "arguments": {"nonnegative": verdict(result["nonnegative"]), "convex": verdict(result["convex"])},
        "local_expansion": None
        if expansion is None
        else {"series": text(expansion["series"]), "bias_leading": text(expansion["bias_leading"])},
        "undecided": list(result.get("undecided", [])),
    }


def analyze(estimator: Estimator | str, budget: float | None = None) -> dict:
    """Derived properties of one estimator as JSON-ready values (the ``derive`` contract).

    Cached in-process and on disk (``$KLSYM_CACHE_DIR``, default ``~/.cache/klsym``), keyed by the
    expression, the klsym and SymPy versions and this module's source. Runs within a time budget
    (``budget`` seconds, else ``$KLSYM_TIME_BUDGET``, else 30): steps it cuts short are "undecided"
    and listed in ``"undecided"``, naming the step; such a result is not cached.

    >>> a = analyze("k3")
    >>> a["d2f1"], a["nonnegative"], a["value"]["divergence"], a["gradient"]["loss"]["divergence"]
    ('1', True, 'KL(q||p)', 'KL(p||q)')
    """
    estimator = get_estimator(estimator)
    key = cache_key([sp.srepr(estimator.expr), sp.srepr(estimator.surrogate_expr), estimator.name], [__file__])

    return cached_json_if(
        "derive", key, lambda: _jsonable(analyze_symbolic(estimator, budget)), lambda row: not row["undecided"]
    )


def derivation_rows(estimators=None) -> list[dict]:
    """:func:`analyze` for each estimator (all built-ins by default)."""
    return [analyze(e) for e in (estimators if estimators is not None else BUILTINS.values())]


__all__ = [
    "MODES",
    "analyze",
    "analyze_symbolic",
    "derivation_rows",
    "derivatives_at_one",
    "identify",
    "implied_gradient_divergence",
    "implied_gradient_generator",
    "is_zero",
    "local_expansion",
    "mode_coefficient",
    "sign_verdict",
    "value_divergence",
    "convexity",
    "nonnegativity",
]


# --- rendering: Markdown, LaTeX, JSON ------------------------------------------------------------


def _md_label(label: str | None) -> str:
    return "—" if label is None else label.replace("|", "\\|")  # a bare | would end the table cell


def _verdict_text(value) -> str:
    return {True: "yes", False: "no", None: "undecided"}[value]


def render_markdown(rows: list[dict]) -> str:
    """A Markdown table of derivation rows (formulas as inline LaTeX)."""
    header = (
        "| estimator | $k(r)$ | $f(1)$ | $f'(1)$ | $f''(1)$ | $f'''(1)$ | $\\geq 0$ | convex "
        "| $\\mathbb{E}_q[k]$ | loss | reward | full |"
    )
    lines = [header, "|" + "---|" * 12]
    for row in rows:
        grads = [
            f"{_md_label(row['gradient'][m]['divergence'])} ($g''(1)={row['gradient'][m]['d2g1']}$)" for m in MODES
        ]
        lines.append(
            "| "
            + " | ".join(
                [
                    f"`{row['name']}`",
                    f"${row['latex']}$",
                    row["f1"] or "—",
                    row["df1"] or "—",
                    row["d2f1"] or "—",
                    row["d3f1"] or "—",
                    _verdict_text(row["nonnegative"]),
                    _verdict_text(row["convex"]),
                    _md_label(row["value"]["divergence"]),
                    *grads,
                ]
            )
            + " |"
        )
    return "\n".join(lines) + "\n"


_TEX_STANDALONE = r"""% {comment}
% Compile on its own, or \input{{{name}}} inside a document that loads {needs}.
\expandafter\ifx\csname @twoclasseserror\endcsname\documentclass
  \expandafter\def\csname klsyminput\endcsname{{}}%
\else
  \documentclass{{article}}
  \usepackage{{{packages}}}
  \usepackage[{geometry}]{{geometry}}
  \begin{{document}}
\fi
{body}
\expandafter\ifx\csname klsyminput\endcsname\relax
  \end{{document}}
\fi
"""


def tex_standalone(
    body: str,
    comment: str,
    name: str,
    needs: str = "amsmath and booktabs",
    packages: str = "amsmath,amssymb,booktabs",
    geometry: str = "landscape,margin=1.5cm",
) -> str:
    r"""``body`` as a ``.tex`` file that compiles on its own or is ``\input{name}`` into a paper."""
    return _TEX_STANDALONE.format(
        comment=comment, name=name, needs=needs, packages=packages, geometry=geometry, body=body
    )


def _tex_label(label: str | None) -> str:
    if label is None:
        return "--"
    return (
        label.replace("KL(q||p)", r"$\mathrm{KL}(q\|p)$")
        .replace("KL(p||q)", r"$\mathrm{KL}(p\|q)$")
        .replace("chi^2", r"$\chi^2$")
        .replace("*", r"$\cdot$")
    )


def render_latex(rows: list[dict]) -> str:
    r"""A LaTeX table of derivation rows: standalone, or ``\input`` into a paper."""
    body = [
        r"\begin{table}[ht]\centering\small",
        r"\caption{Estimators $k(r)$, $r = p(x)/q(x)$, $x \sim q$: derivatives at $r=1$, the divergence "
        r"$\mathbb{E}_q[k]$ equals, and the divergence whose gradient each mode follows (klsym " + __version__ + r").}",
        r"\begin{tabular}{lllllllll}",
        r"\toprule",
        r"estimator & $k(r)$ & $f''(1)$ & $k \ge 0$ & convex & $\mathbb{E}_q[k]$ & loss & reward & full \\",
        r"\midrule",
    ]
    for row in rows:
        cells = [
            r"\texttt{" + row["name"].replace("_", r"\_") + "}",
            f"${row['latex']}$",
            f"${row['d2f1']}$" if row["d2f1"] else "--",
            _verdict_text(row["nonnegative"]),
            _verdict_text(row["convex"]),
            _tex_label(row["value"]["divergence"]),
        ]
        cells += [_tex_label(row["gradient"][m]["divergence"]) for m in MODES]
        body.append(" & ".join(cells) + r" \\")
    body += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return tex_standalone(
        "\n".join(body), "klsym derivation table (generated by `make report`; do not edit by hand).", "derivations"
    )


def write_renderings(outdir, stem: str, rows: list[dict], markdown, latex) -> list[dict]:
    """Write ``STEM.json``, ``STEM.md`` (``markdown(rows)``) and ``STEM.tex`` (``latex(rows)``) into ``outdir``."""
    from klsym.jsonio import dumps  # local: jsonio imports numpy, not needed for derivations alone

    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    (outdir / f"{stem}.json").write_text(dumps(rows) + "\n")
    (outdir / f"{stem}.md").write_text(markdown(rows))
    (outdir / f"{stem}.tex").write_text(latex(rows))
    return rows


def write_derivations(outdir, estimators=None) -> list[dict]:
    """Write ``derivations.json``, ``.md`` and ``.tex`` for the estimators into ``outdir``."""
    return write_renderings(outdir, "derivations", derivation_rows(estimators), render_markdown, render_latex)


__all__ += ["render_markdown", "render_latex", "tex_standalone", "write_renderings", "write_derivations"]
