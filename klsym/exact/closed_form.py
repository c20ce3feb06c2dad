r"""Evaluate the Gaussian closed forms SymPy derived (:mod:`klsym.derive.gaussian_closed_form`) in mpmath, without SymPy.

An estimator that expands into terms :math:`c\, r^a t^n` has, for each term, generated mpmath code of the five
:data:`QUANTITIES` of :math:`\mathbb{E}[r^a t^n]_T` (its value and its derivatives wrt the sampler's and the
ratio's :math:`(\mu, \sigma)`). A :class:`Term` is that code with its coefficient, power and order, built from
JSON data (:meth:`Term.from_data`); :func:`combine` sums terms at the working precision and :func:`precise`
raises the precision until the result settles, so cancellation near p = q costs digits, not accuracy.

>>> v = precise(lambda: [Tracked(mpmath.exp(mpmath.mpf(1e-20))) - 1])[0]
>>> float(v)
1e-20
>>> condition_holds(2, (0.0, 1e300), (0.0, 1.0)), condition_holds(2, (0.0, 1.0), (0.0, 1e300))
(True, False)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from fractions import Fraction
from functools import cache
from typing import NamedTuple

import mpmath
import numpy as np

from klsym.derive.generated import compile_code

#: Derivatives available for each term: value, then d/dmu and d/dsigma moving the sampler
#: (reward), then moving the ratio's q (loss).
QUANTITIES = ("value", "reward_mu", "reward_sigma", "loss_mu", "loss_sigma")
#: Working precisions tried in turn (decimal digits) by :func:`precise`.
PRECISIONS = (30, 60, 120, 240, 480, 960)
#: Relative agreement between two precisions at which a value is accepted.
AGREEMENT = 1e-17
#: Digits kept in reserve: a value smaller than its terms' scale times 10**(GUARD - digits) is noise.
GUARD = 8


class Term(NamedTuple):
    r"""One term :math:`c\, r^a t^n` of an estimator, ready to evaluate.

    ``coefficient()`` is c at the working precision, ``c_float`` its float (for signs), ``a`` the power as a
    fraction, ``n`` the power of t and ``function(mu_q, sigma_q, mu_p, sigma_p, T)`` the generated code of
    the five :data:`QUANTITIES` of :math:`\mathbb{E}[r^a t^n]_T` on mpmath numbers.
    """

    coefficient: Callable
    c_float: float
    a: Fraction
    n: int
    function: Callable

    @classmethod
    def from_data(cls, data: dict) -> Term:
        """A term from its JSON form ``{"c", "c_float", "a": [num, den], "n", "code"}`` (see
        :func:`klsym.derive.gaussian_closed_form.term_data`). A rational c is exact at every precision; any
        other c (a user's ``exp(2) * r``) is SymPy text, evaluated by SymPy."""
        c = data["c"]
        if "rational" in c:
            num, den = c["rational"]

            def coefficient():
                return mpmath.mpf(num) / den
        else:
            coefficient = _sympy_coefficient(c["srepr"])
        function = term_function(data["code"])
        return cls(coefficient, float(data["c_float"]), Fraction(*data["a"]), int(data["n"]), function)


def term_function(code: dict):
    """The function of a term's generated code (compiled once per process)."""
    return _compiled(_code_key(code))


@cache
def _compiled(key: tuple):
    source, name, names = key
    return compile_code({"source": source, "name": name, "globals": dict(names)}, mpmath)


def _sympy_coefficient(text: str):
    import sympy as sp

    value = sp.sympify(text)  # text klsym wrote (srepr of a derived coefficient), not user input

    def coefficient():
        return mpmath.mpf(value.evalf(mpmath.mp.dps + 5)._to_mpmath(mpmath.mp.prec + 20))

    return coefficient


def _code_key(code: dict) -> tuple:
    """A hashable form of generated code."""
    return (code["source"], code["name"], tuple((k, tuple(v)) for k, v in sorted(code["globals"].items())))


def terms_from_data(data) -> list[Term] | None:
    """The terms of a plan (``None``: no closed form)."""
    return None if data is None else [Term.from_data(term) for term in data]


def condition_holds(a, q: tuple[float, float], p: tuple[float, float]) -> bool:
    r"""Whether :math:`\mathbb{E}_q[r^a]` is finite: :math:`(a-1)\sigma_p^2 < a \sigma_q^2` (``a`` an int or
    a Fraction). Decided in exact rational arithmetic, so sigmas of 1e-300 or 1e300 neither overflow nor round."""
    return (a - 1) * Fraction(p[1]) ** 2 < a * Fraction(q[1]) ** 2


class Tracked:
    r"""An mpmath number with the scale of the terms that were summed into it.

    ``value`` is resolved at ``digits`` working digits only if it exceeds
    ``scale * 10**(GUARD - digits)``: below that it may be pure cancellation noise
    (e.g. :math:`\mathbb{E}[k^2] - \mathbb{E}[k]^2` with both terms near :math:`10^{800}`).
    """

    __slots__ = ("value", "scale")

    def __init__(self, value, scale=None):
        self.value = mpmath.mpf(value)
        self.scale = abs(self.value) if scale is None else scale

    @staticmethod
    def of(other) -> Tracked:
        return other if isinstance(other, Tracked) else Tracked(other)

    def __add__(self, other):
        other = Tracked.of(other)
        return Tracked(self.value + other.value, self.scale + other.scale)

    __radd__ = __add__

    def __neg__(self):
        return Tracked(-self.value, self.scale)

    def __sub__(self, other):
        return self + (-Tracked.of(other))

    def __rsub__(self, other):
        return Tracked.of(other) - self

    def __mul__(self, other):
        other = Tracked.of(other)
        return Tracked(self.value * other.value, self.scale * other.scale)

    __rmul__ = __mul__

    def __pow__(self, power: int):
        return Tracked(self.value**power, self.scale**power)

    def resolved(self) -> bool:
        if not mpmath.isfinite(self.value) or not mpmath.isfinite(self.scale):
            return True
        return abs(self.value) > self.scale * mpmath.mpf(10) ** (GUARD - mpmath.mp.dps)


def digits_lost(q, p) -> int:
    r"""Decimal digits the terms' own arithmetic can cancel for these parameters.

    The generated terms hold powers of :math:`1/\sigma` (up to the fourth) and of
    :math:`\mu / \sigma`; with :math:`\sigma_q = 10^{-300}` they reach :math:`10^{1200}` and cancel
    down to numbers of size 1. Two working precisions that both lose every digit would agree on the
    same wrong value, so :func:`precise` starts above this.

    >>> digits_lost((0.0, 1.0), (1.0, 1.0)), digits_lost((1.0, 1e-300), (0.0, 1e-8))
    (2, 2432)
    """
    smallest = min(q[1], p[1])
    scales = sum(abs(math.log10(sigma)) for sigma in (q[1], p[1]))
    shifts = sum(math.log10(1.0 + abs(mu) / smallest) for mu in (q[0], p[0]))
    return int(math.ceil(4 * (scales + shifts)))


def precise(compute, extra_digits: int = 0):
    r"""Evaluate ``compute()`` (mpmath arithmetic on exact float inputs) at rising precision.

    ``compute`` returns a list of :class:`Tracked` (or plain mpmath) numbers; ``extra_digits``
    (:func:`digits_lost`) is added to every working precision. The precision is
    doubled until every value is resolved and agrees with the previous run to :data:`AGREEMENT`
    relative: the cancellation of terms of size 1 in moments of size :math:`\delta^4` (p = q shifted
    by :math:`\delta`) costs digits, not accuracy. A value still below its terms' noise at the highest
    precision is 0 (exact cancellation, as at p = q); one that resolves but does not settle is NaN.
    """
    previous = None
    for digits in PRECISIONS:
        digits += extra_digits
        with mpmath.workdps(digits):
            tracked = [Tracked.of(v) for v in compute()]
            values = [v.value for v in tracked]
            resolved = [v.resolved() for v in tracked]
            if previous is not None and all(resolved) and all(map(_agree, values, previous)):
                return values
        previous = values
    return [
        (new if _agree(new, old) else mpmath.nan) if ok else mpmath.mpf(0)
        for new, old, ok in zip(values, previous, resolved)
    ]


def _agree(new, old) -> bool:
    if not (mpmath.isfinite(new) and mpmath.isfinite(old)):
        return bool(new == old) or bool(mpmath.isnan(new) and mpmath.isnan(old))
    return abs(new - old) <= AGREEMENT * abs(new)


def expectation(terms: list[Term], q, p, positions: int = 1) -> float:
    r""":math:`\mathbb{E}_q[\sum c\, r^a t^n]` over ``positions`` i.i.d. positions.

    Divergent terms (:func:`condition_holds` fails) give ``±inf`` with the sign of the dominant
    tail, or NaN where divergent tails of both signs compete. A finite value beyond the float range
    is ``±inf`` here; :func:`combine` gives it exactly (``log`` of it for a log-space field).
    """
    return float(precise(lambda: combine(terms, q, p, positions)[:1], digits_lost(q, p))[0])


def gradient(terms: list[Term], q, p, moving: str, positions: int = 1) -> np.ndarray:
    r"""Derivative of :math:`\mathbb{E}[\sum c\, r^a t^n]` wrt :math:`(\mu_q, \sigma_q)`.

    ``moving="sampler"`` differentiates the sampling distribution only (ratio held fixed: the
    ``reward`` mode of an estimator), ``"ratio"`` the ratio only (``loss`` mode), ``"both"`` the sum.
    Divergent expectations give NaN.
    """
    if moving not in ("sampler", "ratio", "both"):
        raise ValueError(f"moving must be one of sampler, ratio, both, got {moving!r}")
    return np.array(
        [float(v) for v in precise(lambda: gradient_parts(terms, q, p, moving, positions), digits_lost(q, p))]
    )


def gradient_parts(terms: list[Term], q, p, moving: str, positions: int = 1) -> list:
    """:func:`gradient` as two :class:`Tracked` numbers at the working precision (inside :func:`precise`)."""
    values = combine(terms, q, p, positions)
    if not mpmath.isfinite(values[0].value):
        return [Tracked(mpmath.nan), Tracked(mpmath.nan)]
    parts = {"sampler": values[1:3], "ratio": values[3:5], "both": [values[1] + values[3], values[2] + values[4]]}
    return parts[moving]


def combine(terms: list[Term], q, p, positions: int = 1) -> list:
    r"""The five :data:`QUANTITIES` of :math:`\sum c\, r^a t^n` as :class:`Tracked` numbers (working precision)."""
    total = [Tracked(0)] * len(QUANTITIES)
    divergent = []
    for term in terms:
        if condition_holds(term.a, q, p):
            mpf = mpmath.mpf
            values = term.function(mpf(q[0]), mpf(q[1]), mpf(p[0]), mpf(p[1]), mpf(positions))
            coefficient = term.coefficient()
            total = [s + Tracked(coefficient * v) for s, v in zip(total, values)]
        else:
            divergent.append(term)
    if divergent:
        # The tail with the largest x^2 coefficient (largest a * (1/sigma_q^2 - 1/sigma_p^2)), then the
        # highest power of t, dominates; r^a t^n there has the sign of c * sign(a)^n.
        growth = 1 / Fraction(q[1]) ** 2 - 1 / Fraction(p[1]) ** 2
        key = [(term.a * growth, term.n) for term in divergent]
        top = max(key)
        signs = {
            np.sign(term.c_float) * np.sign(float(term.a)) ** term.n for term, k in zip(divergent, key) if k == top
        }
        total = [Tracked(mpmath.nan)] * len(QUANTITIES)
        if len(signs) == 1:
            total[0] = Tracked(signs.pop() * mpmath.inf)
    return total


__all__ = [
    "QUANTITIES",
    "PRECISIONS",
    "AGREEMENT",
    "GUARD",
    "Term",
    "terms_from_data",
    "term_function",
    "condition_holds",
    "Tracked",
    "digits_lost",
    "precise",
    "expectation",
    "gradient",
    "gradient_parts",
    "combine",
]
