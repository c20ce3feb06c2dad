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
>>> from klsym.exact import closed_form   # evaluates the terms (generated code, no SymPy)
>>> terms = closed_form.terms_from_data(terms_data(decompose(get_estimator("k1").expr)))
>>> round(closed_form.expectation(terms, (0.0, 1.0), (1.0, 1.0)), 12)  # KL(q||p) = 1/2
0.5
"""

from __future__ import annotations

from fractions import Fraction
from functools import cache, lru_cache

import sympy as sp

from klsym.derive import generated
from klsym.derive.symbols import r, t
from klsym.exact import closed_form

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
    r"""Compiled ``(mu, sigma, mu_p, sigma_p, T) -> [value, reward_mu, reward_sigma, loss_mu, loss_sigma]``

    of :math:`\mathbb{E}[r^a t^n]_T`; derived once per ``(a, n)``. It runs on mpmath numbers at the
    working precision (:func:`klsym.exact.closed_form.precise` picks it), so neither cancellation near p = q nor the range
    of float64 limits the result. The generated code is kept on disk (:func:`term_code`), so a new process
    compiles it in milliseconds instead of differentiating again.
    """
    return closed_form.term_function(term_code(a, n))


def term_code(a, n: int) -> dict:
    r"""Generated code of the quantities of :math:`\mathbb{E}[r^a t^n]_T` as JSON data (source and the mpmath
    globals it reads), kept on disk (:mod:`klsym.derive.diskcache`, keyed by ``(a, n)``, the versions and this
    module's and :mod:`klsym.derive.generated`'s source)."""
    from klsym.derive.diskcache import cache_key, cached_json

    key = cache_key([sp.srepr(sp.sympify(a)), str(int(n))], [__file__, generated.__file__])  # code, its runner
    return cached_json("gaussian-term", key, lambda: _term_code(_term_source(a, n)))


def term_data(c, a, n: int) -> dict:
    r"""One term :math:`c\, r^a t^n` as JSON data for :class:`klsym.exact.closed_form.Term`: c exact (a rational
    as ``[num, den]``, else its ``srepr``), the power a as a fraction, n, the generated code.
    ``TypeError`` when a is not rational (then the estimator has no closed form here)."""
    c = sp.sympify(c)
    power = _fraction(a)
    exact = {"rational": [int(c.p), int(c.q)]} if c.is_Rational else {"srepr": sp.srepr(c)}
    return {
        "c": exact,
        "c_float": float(c),
        "a": [power.numerator, power.denominator],
        "n": int(n),
        "code": term_code(a, n),
    }


def terms_data(terms) -> list[dict] | None:
    """:func:`decompose`'s terms as JSON data (``None`` stays ``None``: no closed form)."""
    return None if terms is None else [term_data(c, a, n) for c, a, n in terms]


def _term_source(a, n: int) -> str:
    r"""Derive the five quantities of :math:`\mathbb{E}[r^a t^n]_T` and return their lambdified source."""
    import inspect

    moment = sp.diff(sp.exp(_T * log_mgf()), _a, n)
    derivatives = [moment, sp.diff(moment, _m), sp.diff(moment, _s), sp.diff(moment, _mu), sp.diff(moment, _sig)]
    at_theta = {_a: a, _m: _mu, _s: _sig}
    exprs = [d.subs(at_theta) for d in derivatives]
    return inspect.getsource(sp.lambdify((_mu, _sig, _mup, _sigp, _T), exprs, modules="mpmath", cse=True))


def _term_code(source: str) -> dict:
    """lambdify's mpmath ``source`` and where each global it reads comes from (mpmath: no SymPy to run it)."""
    import mpmath
    from sympy.utilities.lambdify import MODULES, _import

    _import("mpmath")
    namespace = dict(MODULES["mpmath"][0])
    exec(compile(source, "<klsym.derive.gaussian_closed_form term>", "exec"), namespace)  # code klsym generated
    return {
        "source": source,
        "name": "_lambdifygenerated",
        "globals": generated.globals_of(namespace["_lambdifygenerated"], mpmath),
    }


def warm(terms) -> None:
    """Derive and compile every term now (so timing-sensitive callers pay the cost up front)."""
    for _, a, n in terms:
        _term_function(a, n)


__all__ = [
    "decompose",
    "moment_condition",
    "moment_condition_text",
    "log_mgf",
    "term_code",
    "term_data",
    "terms_data",
    "warm",
]
