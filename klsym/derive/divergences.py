r"""f-divergence generators, one small function each.

Every generator is a SymPy expression :math:`f(r)` in the positive ratio :math:`r = p(x)/q(x)` with
:math:`f(1) = 0`, and defines

.. math:: D_f = \mathbb{E}_{x \sim q}[f(r)].

With this convention :math:`f(r) = -\log r` gives KL(q||p), the RL penalty KL(pi||pi_ref), and
:math:`f(r) = r \log r` gives KL(p||q). The set covers TensorFlow Probability's ``tfp.vi`` Csiszar
functions; :func:`dual` and :func:`symmetrized` build new generators from old ones.

>>> kl_reverse()
-log(r)
>>> dual(kl_reverse())
r*log(r)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import sympy as sp

from klsym.derive.symbols import alpha as _alpha_symbol
from klsym.derive.symbols import r


def kl_reverse() -> sp.Expr:
    r"""KL(q||p), the RL penalty KL(pi_theta||pi_ref).

    .. math:: f(r) = -\log r, \quad \mathbb{E}_q[f(r)] = \mathbb{E}_q[\log(q/p)].

    >>> kl_reverse().diff(r, 2).subs(r, 1)
    1
    """
    return -sp.log(r)


def kl_forward() -> sp.Expr:
    r"""KL(p||q).

    .. math:: f(r) = r \log r, \quad \mathbb{E}_q[r \log r] = \mathbb{E}_p[\log(p/q)].

    >>> kl_forward()
    r*log(r)
    """
    return r * sp.log(r)


def pearson() -> sp.Expr:
    r"""Pearson :math:`\chi^2`: :math:`f(r) = (r - 1)^2`, so :math:`D_f = \mathbb{E}_q[(p/q - 1)^2]`.

    >>> pearson()
    (r - 1)**2
    """
    return (r - 1) ** 2


def neyman() -> sp.Expr:
    r"""Neyman :math:`\chi^2`: :math:`f(r) = (1 - r)^2 / r`, the dual of Pearson.

    >>> sp.simplify(neyman() - dual(pearson()))
    0
    """
    return (1 - r) ** 2 / r


def chi_square() -> sp.Expr:
    r"""TFP's ``chi_square``: :math:`f(r) = r^2 - 1` (Pearson :math:`\chi^2` plus :math:`2(r - 1)`).

    >>> chi_square()
    r**2 - 1
    """
    return r**2 - 1


def squared_hellinger() -> sp.Expr:
    r"""Squared Hellinger: :math:`f(r) = (\sqrt{r} - 1)^2`.

    >>> squared_hellinger()
    (sqrt(r) - 1)**2
    """
    return (sp.sqrt(r) - 1) ** 2


def jensen_shannon() -> sp.Expr:
    r"""Jensen-Shannon, TFP's self-normalised convention :math:`KL(p||m) + KL(q||m)`, :math:`m = (p+q)/2`.

    .. math:: f(r) = r \log r - (1 + r) \log\frac{1 + r}{2}.

    >>> sp.simplify(jensen_shannon().subs(r, 1))
    0
    """
    return r * sp.log(r) - (1 + r) * sp.log((1 + r) / 2)


def arithmetic_geometric() -> sp.Expr:
    r"""Arithmetic-geometric: :math:`f(r) = (1 + r)\log\frac{1 + r}{2\sqrt{r}}`.

    >>> sp.simplify(arithmetic_geometric().subs(r, 1))
    0
    """
    return (1 + r) * sp.log((1 + r) / (2 * sp.sqrt(r)))


def total_variation() -> sp.Expr:
    r"""Total variation: :math:`f(r) = \tfrac12 |r - 1|` (not differentiable at :math:`r = 1`).

    >>> total_variation()
    Abs(r - 1)/2
    """
    return sp.Abs(r - 1) / 2


def jeffreys() -> sp.Expr:
    r"""Jeffreys, half the symmetric KL: :math:`f(r) = \tfrac12 (r \log r - \log r)`.

    >>> sp.simplify(jeffreys() - symmetrized(kl_reverse()))
    0
    """
    return (r * sp.log(r) - sp.log(r)) / 2


def triangular() -> sp.Expr:
    r"""Triangular discrimination: :math:`f(r) = (r - 1)^2 / (1 + r)`.

    >>> triangular().subs(r, 3)
    1
    """
    return (r - 1) ** 2 / (1 + r)


def modified_gan() -> sp.Expr:
    r"""TFP's modified GAN: :math:`f(r) = \log(1 + r) - \log r - \log 2` (normalised so f(1) = 0).

    >>> modified_gan().subs(r, 1)
    0
    """
    return sp.log(1 + r) - sp.log(r) - sp.log(2)


def log1p_abs() -> sp.Expr:
    r"""TFP's ``log1p_abs``: :math:`f(r) = r^{\operatorname{sign}(r - 1)} - 1`.

    >>> log1p_abs().subs(r, 2), log1p_abs().subs(r, sp.Rational(1, 2))
    (1, 1)
    """
    return sp.Piecewise((r - 1, r >= 1), (1 / r - 1, True))


def amari_alpha(a: sp.Expr | float = _alpha_symbol) -> sp.Expr:
    r"""Amari :math:`\alpha`-divergence, symbolic :math:`\alpha` by default.

    .. math:: f_\alpha(r) = \frac{r^\alpha - 1 - \alpha (r - 1)}{\alpha(\alpha - 1)},

    with the limits :math:`\alpha \to 0` (:math:`-\log r + r - 1`) and :math:`\alpha \to 1`
    (:math:`r \log r - r + 1`). :math:`f''(1) = 1` for every :math:`\alpha`.

    >>> sp.simplify(amari_alpha().diff(r, 2).subs(r, 1))
    1
    >>> amari_alpha(0)
    r - log(r) - 1
    """
    a = sp.sympify(a)
    if a == 0:
        return -sp.log(r) + r - 1
    if a == 1:
        return r * sp.log(r) - r + 1
    return (r**a - 1 - a * (r - 1)) / (a * (a - 1))


def t_power(power: sp.Expr | float) -> sp.Expr:
    r"""TFP's ``t_power``: :math:`f(r) = s\,(r^t - 1)` with :math:`s = -1` for :math:`0 < t < 1`, else 1.

    >>> t_power(2)
    r**2 - 1
    """
    power = sp.sympify(power)
    sign = -1 if (0 < power < 1) else 1
    return sign * (r**power - 1)


def dual(f: sp.Expr) -> sp.Expr:
    r"""The Csiszar dual :math:`f^*(r) = r f(1/r)`: :math:`D_{f^*}(p, q) = D_f(q, p)`.

    >>> dual(kl_forward())
    -log(r)
    """
    return sp.expand_log(sp.simplify(r * f.subs(r, 1 / r)), force=True)


def symmetrized(f: sp.Expr) -> sp.Expr:
    r"""The symmetrised generator :math:`\tfrac12 (f(r) + r f(1/r))`.

    >>> sp.simplify(symmetrized(kl_forward()) - jeffreys())
    0
    """
    return sp.expand_log((f + r * f.subs(r, 1 / r)) / 2, force=True)


@dataclass(frozen=True)
class Divergence:
    """A registered divergence: its label (as printed everywhere) and its generator."""

    name: str
    label: str
    generator: sp.Expr
    description: str


def _entry(name: str, label: str, make: Callable[[], sp.Expr]) -> Divergence:
    doc = (make.__doc__ or "").strip().splitlines()[0]
    return Divergence(name=name, label=label, generator=make(), description=doc)


#: The registry, keyed by short name. Labels are the strings used in JSON output.
REGISTRY: dict[str, Divergence] = {
    d.name: d
    for d in [
        _entry("kl_reverse", "KL(q||p)", kl_reverse),
        _entry("kl_forward", "KL(p||q)", kl_forward),
        _entry("pearson", "Pearson chi^2", pearson),
        _entry("neyman", "Neyman chi^2", neyman),
        _entry("squared_hellinger", "squared Hellinger", squared_hellinger),
        _entry("jensen_shannon", "Jensen-Shannon", jensen_shannon),
        _entry("arithmetic_geometric", "arithmetic-geometric", arithmetic_geometric),
        _entry("total_variation", "total variation", total_variation),
        _entry("jeffreys", "Jeffreys", jeffreys),
        _entry("triangular", "triangular", triangular),
        _entry("modified_gan", "modified GAN", modified_gan),
        _entry("log1p_abs", "log1p-abs", log1p_abs),
        _entry("amari_alpha", "Amari alpha", amari_alpha),
        _entry("chi_square", "chi-square (TFP)", chi_square),
    ]
}


def get_divergence(name: str) -> Divergence:
    """Look up a divergence by short name or label, with a clear error.

    >>> get_divergence("KL(p||q)").name
    'kl_forward'
    """
    for d in REGISTRY.values():
        if name in (d.name, d.label):
            return d
    known = ", ".join(sorted(REGISTRY))
    raise KeyError(f"unknown divergence {name!r}; known: {known}")


__all__ = [
    "Divergence",
    "REGISTRY",
    "get_divergence",
    "dual",
    "symmetrized",
    "kl_reverse",
    "kl_forward",
    "pearson",
    "neyman",
    "chi_square",
    "squared_hellinger",
    "jensen_shannon",
    "arithmetic_geometric",
    "total_variation",
    "jeffreys",
    "triangular",
    "modified_gan",
    "log1p_abs",
    "amari_alpha",
    "t_power",
]
