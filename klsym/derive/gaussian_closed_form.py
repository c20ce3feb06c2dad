r"""Closed-form Gaussian expectations of :math:`r^a (\log r)^n`, derived by SymPy.

For :math:`q = \mathcal{N}(\mu, \sigma^2)` and :math:`p = \mathcal{N}(\mu_p, \sigma_p^2)` the
log-ratio :math:`t(x) = \log p(x) - \log q(x)` is quadratic in x. Let the ratio use parameters
:math:`\phi = (\mu, \sigma)` and let the expectation run over a sampler :math:`\mathcal{N}(m, s^2)`.
The generalised moment generating function

.. math:: M(a) = \mathbb{E}_{x \sim \mathcal{N}(m, s^2)}\left[e^{a\, t(x)}\right]
          = \int e^{A x^2 + B x + C}\, dx = \sqrt{\pi / (-A)}\; e^{C - B^2 / (4A)}

is a Gaussian integral, finite iff :math:`A < 0` (:func:`moment_condition`). Over T i.i.d.
positions the sequence log-ratio is :math:`\sum_i t_i`, so

.. math:: \mathbb{E}\left[r^a (\log r)^n\right]_T = \frac{d^n}{da^n} M(a)^T .

Any estimator that expands into terms :math:`c\, r^a (\log r)^n` (:func:`decompose`) then has
closed-form moments. Its gradients follow by differentiating before setting
:math:`(m, s) = \phi = \theta`: the sampler parameters give the ``reward`` (score-function) term,
the ratio parameters the ``loss`` (pathwise) term.

>>> from klsym.derive.estimators import get_estimator
>>> decompose(get_estimator("k3").expr)
[(-1, 0, 0), (-1, 0, 1), (1, 1, 0)]
>>> moment_condition(2)
sigma_p**2 < 2*sigma_q**2
>>> round(expectation(decompose(get_estimator("k1").expr), (0.0, 1.0), (1.0, 1.0)), 12)  # KL(q||p) = 1/2
0.5
"""

from __future__ import annotations

import math
from fractions import Fraction
from functools import cache, lru_cache

import mpmath
import numpy as np
import sympy as sp

from klsym.derive.symbols import r, t

# Symbols of the derivation: a (power of r), T (positions), sampler (m, s), ratio's q (mu, sigma),
# reference p (mu_p, sigma_p).
_a = sp.Symbol("a", real=True)
_T = sp.Symbol("T", positive=True)
_m = sp.Symbol("m", real=True)
_s = sp.Symbol("s", positive=True)
_mu = sp.Symbol("mu_q", real=True)
_sig = sp.Symbol("sigma_q", positive=True)
_mup = sp.Symbol("mu_p", real=True)
_sigp = sp.Symbol("sigma_p", positive=True)
_x = sp.Symbol("x", real=True)

#: Derivatives available for each term: value, then d/dmu and d/dsigma moving the sampler
#: (reward), then moving the ratio's q (loss).
QUANTITIES = ("value", "reward_mu", "reward_sigma", "loss_mu", "loss_sigma")


def _log_normal(x, mean, sd):
    return -((x - mean) ** 2) / (2 * sd**2) - sp.log(sd) - sp.log(2 * sp.pi) / 2


@lru_cache(maxsize=1)
def _exponent_coefficients():
    """Coefficients (A, B, C) of the exponent a t(x) + log N(x; m, s) as a polynomial in x."""
    t_of_x = _log_normal(_x, _mup, _sigp) - _log_normal(_x, _mu, _sig)
    exponent = sp.expand(_a * t_of_x + _log_normal(_x, _m, _s))
    poly = sp.Poly(exponent, _x)
    return poly.coeff_monomial(_x**2), poly.coeff_monomial(_x), poly.coeff_monomial(1)


@lru_cache(maxsize=1)
def log_mgf() -> sp.Expr:
    r""":math:`\log M(a)` for one position, in symbols ``a, m, s, mu_q, sigma_q, mu_p, sigma_p``."""
    A, B, C = _exponent_coefficients()
    return sp.log(sp.pi) / 2 - sp.log(-A) / 2 + C - B**2 / (4 * A)


@cache
def moment_condition(a) -> sp.Basic:
    r"""Condition on the sigmas for :math:`\mathbb{E}_q[r^a]` to be finite (sampler = q).

    The x² coefficient of the exponent must be negative:
    :math:`(a - 1)\,\sigma_p^2 < a\,\sigma_q^2`.

    >>> moment_condition(1), moment_condition(-1)
    (True, sigma_q**2 < 2*sigma_p**2)
    """
    A = _exponent_coefficients()[0].subs({_m: _mu, _s: _sig, _a: sp.sympify(a)})
    # multiply -A > 0 by the positive 2 sigma_q^2 sigma_p^2 to get a polynomial inequality
    lhs = sp.expand(-2 * A * _sig**2 * _sigp**2)
    if lhs.is_positive:
        return sp.true
    positive = sp.Add(*[term for term in sp.Add.make_args(lhs) if term.could_extract_minus_sign() is False])
    return sp.StrictLessThan(sp.expand(positive - lhs), positive)


def moment_condition_text(powers) -> str:
    r"""``sstr`` of the existence condition of :math:`\mathbb{E}_q[\sum c\, r^a t^n]` over the powers a (strictest
    at the largest and the smallest a), kept on disk (:mod:`klsym.derive.diskcache`, keyed by the two powers, the
    versions and this module's source): deriving it costs SymPy a second per process.

    >>> moment_condition_text([0, 1, 2])
    'sigma_p**2 < 2*sigma_q**2'
    """
    from klsym.derive.diskcache import cache_key, cached_json

    high, low = str(max(powers)), str(min(powers))
    return cached_json(
        "condition",
        cache_key([high, low], [__file__]),
        lambda: sp.sstr(sp.And(moment_condition(sp.sympify(high)), moment_condition(sp.sympify(low)))),
    )


def condition_holds(a, q: tuple[float, float], p: tuple[float, float]) -> bool:
    r"""Whether :math:`\mathbb{E}_q[r^a]` is finite: :math:`(a-1)\sigma_p^2 < a \sigma_q^2`.

    Decided in exact rational arithmetic, so sigmas of 1e-300 or 1e300 neither overflow nor round.

    >>> condition_holds(2, (0.0, 1e300), (0.0, 1.0)), condition_holds(2, (0.0, 1.0), (0.0, 1e300))
    (True, False)
    """
    a = _fraction(a)
    return (a - 1) * Fraction(p[1]) ** 2 < a * Fraction(q[1]) ** 2


def _fraction(number) -> Fraction:
    number = sp.Rational(sp.nsimplify(number)) if not isinstance(number, (int, Fraction)) else number
    return Fraction(int(number.p), int(number.q)) if isinstance(number, sp.Rational) else Fraction(number)


#: Largest number of terms c r^a t^n given a closed form; beyond it quadrature is used.
MAX_TERMS = 24


def decompose(expr: sp.Expr) -> list[tuple] | None:
    r"""Write :math:`k(r)` as :math:`\sum c\, r^a (\log r)^n`; ``None`` if it has another form.

    Returns sorted ``(c, a, n)`` tuples with SymPy numbers ``c`` and ``a`` and an integer ``n >= 0``.

    >>> decompose(sp.log(r) ** 2 / 2)
    [(1/2, 0, 2)]
    >>> decompose(sp.log((r - 1) ** 2 + 1)) is None   # k4: no closed form, use quadrature
    True
    """
    expanded = sp.expand(sp.expand_log(sp.sympify(expr).subs(r, sp.exp(t)), force=True))
    collected: dict[tuple, sp.Expr] = {}
    for term in sp.Add.make_args(expanded):
        c, a, n = sp.Integer(1), sp.Integer(0), 0
        for factor in sp.Mul.make_args(term):
            if factor == t:
                n += 1
            elif factor.is_Pow and factor.base == t and factor.exp.is_Integer and factor.exp > 0:
                n += int(factor.exp)
            elif isinstance(factor, sp.exp) and factor.args[0].is_polynomial(t) and sp.degree(factor.args[0], t) == 1:
                slope = factor.args[0].coeff(t, 1)
                if not slope.is_number:
                    return None
                a += slope
                c *= sp.exp(sp.expand(factor.args[0] - slope * t))
            elif not factor.has(t):
                c *= factor
            else:
                return None
        collected[(a, n)] = collected.get((a, n), 0) + c
    terms = [(sp.nsimplify(c) if c.is_Float else c, a, n) for (a, n), c in collected.items() if c != 0]
    if len(terms) > MAX_TERMS:  # e.g. (r - 1)**100: quadrature is faster than 101 derivations
        return None
    return sorted(terms, key=lambda term: (float(term[1]), term[2]))


@cache
def _term_function(a, n: int):
    r"""Lambdified ``(mu, sigma, mu_p, sigma_p, T) -> [value, reward_mu, reward_sigma, loss_mu, loss_sigma]``.

    of :math:`\mathbb{E}[r^a t^n]_T`; derived once per ``(a, n)``. It runs on mpmath numbers at the
    working precision (:func:`precise` picks it), so neither cancellation near p = q nor the range
    of float64 limits the result. The generated code is kept on disk (:mod:`klsym.derive.diskcache`,
    keyed by ``(a, n)``, the klsym and SymPy versions and this module's source), so a new process
    compiles it in milliseconds instead of differentiating again.
    """
    from klsym.derive.diskcache import cache_key, cached_json

    key = cache_key([sp.srepr(sp.sympify(a)), str(int(n))], [__file__])
    return _compile_mpmath(cached_json("gaussian-term", key, lambda: _term_source(a, n)))


def _term_source(a, n: int) -> str:
    r"""Derive the five quantities of :math:`\mathbb{E}[r^a t^n]_T` and return their lambdified source."""
    import inspect

    moment = sp.diff(sp.exp(_T * log_mgf()), _a, n)
    derivatives = [moment, sp.diff(moment, _m), sp.diff(moment, _s), sp.diff(moment, _mu), sp.diff(moment, _sig)]
    at_theta = {_a: a, _m: _mu, _s: _sig}
    exprs = [d.subs(at_theta) for d in derivatives]
    return inspect.getsource(sp.lambdify((_mu, _sig, _mup, _sigp, _T), exprs, modules="mpmath", cse=True))


def _compile_mpmath(source: str):
    """The function defined by lambdify's ``source``, in lambdify's own mpmath namespace."""
    from sympy.utilities.lambdify import MODULES, _import

    _import("mpmath")
    namespace = dict(MODULES["mpmath"][0])
    exec(compile(source, "<klsym.derive.gaussian_closed_form term>", "exec"), namespace)  # code klsym generated
    return namespace["_lambdifygenerated"]


def _term_values(a, n, q, p, positions) -> list:
    """The five quantities of one term as mpmath numbers at the working precision (inputs exact)."""
    mpf = mpmath.mpf
    return list(_term_function(a, n)(mpf(q[0]), mpf(q[1]), mpf(p[0]), mpf(p[1]), mpf(positions)))


#: Working precisions tried in turn (decimal digits) by :func:`precise`.
PRECISIONS = (30, 60, 120, 240, 480, 960)
#: Relative agreement between two precisions at which a value is accepted.
AGREEMENT = 1e-17
#: Digits kept in reserve: a value smaller than its terms' scale times 10**(GUARD - digits) is noise.
GUARD = 8


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

    The lambdified terms hold powers of :math:`1/\sigma` (up to the fourth) and of
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

    >>> v = precise(lambda: [Tracked(mpmath.exp(mpmath.mpf(1e-20))) - 1])[0]
    >>> float(v)
    1e-20
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


def expectation(terms, q, p, positions: int = 1) -> float:
    r""":math:`\mathbb{E}_q[\sum c\, r^a t^n]` over ``positions`` i.i.d. positions.

    Divergent terms (:func:`moment_condition` fails) give ``±inf`` with the sign of the dominant
    tail, or NaN where divergent tails of both signs compete. A finite value beyond the float range
    is ``±inf`` here; :func:`combine` gives it exactly (``log`` of it for a log-space field).
    """
    return float(precise(lambda: combine(terms, q, p, positions)[:1], digits_lost(q, p))[0])


def gradient(terms, q, p, moving: str, positions: int = 1) -> np.ndarray:
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


def gradient_parts(terms, q, p, moving: str, positions: int = 1) -> list:
    """:func:`gradient` as two :class:`Tracked` numbers at the working precision (inside :func:`precise`)."""
    values = combine(terms, q, p, positions)
    if not mpmath.isfinite(values[0].value):
        return [Tracked(mpmath.nan), Tracked(mpmath.nan)]
    parts = {"sampler": values[1:3], "ratio": values[3:5], "both": [values[1] + values[3], values[2] + values[4]]}
    return parts[moving]


def combine(terms, q, p, positions: int = 1) -> list:
    r"""The five :data:`QUANTITIES` of :math:`\sum c\, r^a t^n` as :class:`Tracked` numbers (working precision)."""
    total = [Tracked(0)] * len(QUANTITIES)
    divergent = []
    for c, a, n in terms:
        if condition_holds(a, q, p):
            coefficient = mpmath.mpf(sp.sympify(c).evalf(mpmath.mp.dps + 5)._to_mpmath(mpmath.mp.prec + 20))
            total = [s + Tracked(coefficient * v) for s, v in zip(total, _term_values(a, n, q, p, positions))]
        else:
            divergent.append((c, a, n))
    if divergent:
        # The tail with the largest x^2 coefficient (largest a * (1/sigma_q^2 - 1/sigma_p^2)), then the
        # highest power of t, dominates; r^a t^n there has the sign of c * sign(a)^n.
        growth = 1 / Fraction(q[1]) ** 2 - 1 / Fraction(p[1]) ** 2
        key = [(_fraction(a) * growth, n) for _, a, n in divergent]
        top = max(key)
        signs = {np.sign(float(c)) * np.sign(float(a)) ** n for (c, a, n), k in zip(divergent, key) if k == top}
        total = [Tracked(mpmath.nan)] * len(QUANTITIES)
        if len(signs) == 1:
            total[0] = Tracked(signs.pop() * mpmath.inf)
    return total


def warm(terms) -> None:
    """Derive and lambdify every term now (so timing-sensitive callers pay the cost up front)."""
    for _, a, n in terms:
        _term_function(a, n)


__all__ = [
    "decompose",
    "moment_condition",
    "moment_condition_text",
    "condition_holds",
    "log_mgf",
    "expectation",
    "gradient",
    "gradient_parts",
    "combine",
    "precise",
    "Tracked",
    "QUANTITIES",
    "warm",
]
