r"""Clamped estimators: where a clamp freezes the value, and what it does to bias.

RL frameworks clamp the log-ratio :math:`t = \log r` to :math:`[-a, a]` (input clamp) and the
estimator value to :math:`[-c, c]` (output clamp). The clamped estimator

.. math::

    k_{a,c}(t) = \min\bigl(\max\bigl(k(e^{\min(\max(t, -a), a)}), -c\bigr), c\bigr)

is piecewise: it equals :math:`k` on a set of t-intervals and is constant elsewhere. On the
constant pieces its pathwise derivative is zero, so the ``loss``-mode gradient of a sample there
vanishes (``torch.clamp`` passes no gradient outside its range).

>>> from klsym.estimators import get_estimator
>>> format_region(saturation_region(get_estimator("k3"), input_clamp=20, output_clamp=10))
't < -10.99998 or t > 2.610869'
"""
from __future__ import annotations

import math

import numpy as np
from scipy.optimize import brentq

from .estimators import Estimator, get_estimator

#: |t| up to which estimators are evaluated (Estimator.numeric is finite there).
T_MAX = 700.0
_GRID = 40001


def _check_clamp(value, what: str) -> float | None:
    if value is None:
        return None
    value = float(value)
    if not value > 0 or math.isnan(value):
        raise ValueError(f"{what} must be a positive number or None, got {value!r}")
    return value


def level_crossings(estimator: Estimator | str, level: float, lower: float = -T_MAX,
                    upper: float = T_MAX) -> list[float]:
    r"""All t in [lower, upper] where :math:`k(e^t) = ` ``level`` (sign changes on a fine grid,
    refined by Brent's method to machine precision).

    >>> [round(x, 6) for x in level_crossings("k3", 10.0)]
    [-10.999983, 2.610869]
    """
    k = get_estimator(estimator).numeric
    grid = np.linspace(lower, upper, _GRID)
    values = k(grid) - level
    roots = []
    for i in np.flatnonzero(np.sign(values[:-1]) * np.sign(values[1:]) < 0):
        roots.append(brentq(lambda s: float(k(np.array(s))) - level, grid[i], grid[i + 1],
                            xtol=1e-15, rtol=4 * np.finfo(float).eps))
    roots.extend(float(g) for g in grid[values == 0])
    return sorted(roots)


def saturation_region(estimator: Estimator | str, input_clamp: float | None = None,
                      output_clamp: float | None = None) -> list[tuple[float, float]]:
    r"""The t-intervals where the clamped estimator is constant (its pathwise gradient is zero).

    Returns a sorted list of disjoint open intervals ``(lo, hi)`` (``-inf``/``inf`` for
    unbounded ones); ``[]`` when no clamp can bite for :math:`|t| \le 700`.

    Parameters
    ----------
    estimator : Estimator or str
        The unclamped estimator k.
    input_clamp : float, optional
        a > 0: t is clamped to [-a, a].
    output_clamp : float, optional
        c > 0: k is clamped to [-c, c].

    Examples
    --------
    >>> saturation_region("k1", output_clamp=10)
    [(-inf, -10.0), (10.0, inf)]
    >>> saturation_region("k2", input_clamp=20)
    [(-inf, -20.0), (20.0, inf)]
    """
    estimator = get_estimator(estimator)
    a = _check_clamp(input_clamp, "input clamp")
    c = _check_clamp(output_clamp, "output clamp")
    lo, hi = (-a, a) if a is not None else (-T_MAX, T_MAX)
    # Breakpoints: the input clamp edges and every crossing of |k| = c inside them.
    cuts = [lo, hi]
    if c is not None:
        cuts += level_crossings(estimator, c, lo, hi) + level_crossings(estimator, -c, lo, hi)
    cuts = sorted(set(cuts))
    k = estimator.numeric
    frozen = []
    for left, right in zip(cuts[:-1], cuts[1:]):
        middle = np.array(0.5 * (left + right))
        if c is not None and abs(float(k(middle))) > c:
            frozen.append([left, right])
    if a is not None:
        frozen = [[-math.inf, lo]] + frozen + [[hi, math.inf]]
    else:  # beyond |t| = 700 the region continues if it reaches the edge
        if frozen and frozen[0][0] == lo:
            frozen[0][0] = -math.inf
        if frozen and frozen[-1][1] == hi:
            frozen[-1][1] = math.inf
    merged: list[list[float]] = []
    for left, right in frozen:
        if merged and merged[-1][1] >= left:
            merged[-1][1] = max(merged[-1][1], right)
        else:
            merged.append([left, right])
    return [(float(left), float(right)) for left, right in merged]


def format_region(region: list[tuple[float, float]], variable: str = "t") -> str:
    """Human-readable union of intervals (7 significant digits).

    >>> format_region([(-math.inf, -20.0), (1.5, 2.0), (20.0, math.inf)])
    't < -20 or 1.5 < t < 2 or t > 20'
    >>> format_region([])
    'none'
    """
    parts = []
    for lo, hi in region:
        if lo == -math.inf and hi == math.inf:
            parts.append(f"all {variable}")
        elif lo == -math.inf:
            parts.append(f"{variable} < {hi:.7g}")
        elif hi == math.inf:
            parts.append(f"{variable} > {lo:.7g}")
        else:
            parts.append(f"{lo:.7g} < {variable} < {hi:.7g}")
    return " or ".join(parts) if parts else "none"


__all__ = ["T_MAX", "level_crossings", "saturation_region", "format_region"]
