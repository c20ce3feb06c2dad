r"""Clamped estimators: where a clamp freezes the value, and what it does to bias.

RL frameworks clamp the log-ratio :math:`t = \log r` to :math:`[-a, a]` (input clamp) and the
estimator value to :math:`[-c, c]` (output clamp). The clamped estimator

.. math::

    k_{a,c}(t) = \min\bigl(\max\bigl(k(e^{\min(\max(t, -a), a)}), -c\bigr), c\bigr)

is piecewise: it equals :math:`k` on a set of t-intervals and is constant elsewhere. On the
constant pieces its pathwise derivative is zero, so the ``loss``-mode gradient of a sample there
vanishes (``torch.clamp`` passes no gradient outside its range).

>>> from klsym.derive.estimators import get_estimator
>>> format_region(saturation_region(get_estimator("k3"), input_clamp=20, output_clamp=10))
't < -10.99998 or t > 2.610869'
"""

from __future__ import annotations

import math

import numpy as np
from scipy.optimize import brentq

from klsym.derive.estimators import Estimator, get_estimator
from klsym.exact import expectations as exact
from klsym.exact.families import Categorical, Gaussian

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


def level_crossings(
    estimator: Estimator | str, level: float, lower: float = -T_MAX, upper: float = T_MAX
) -> list[float]:
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
        roots.append(
            brentq(
                lambda s: float(k(np.array(s))) - level, grid[i], grid[i + 1], xtol=1e-15, rtol=4 * np.finfo(float).eps
            )
        )
    roots.extend(float(g) for g in grid[values == 0])
    return sorted(roots)


def saturation_region(
    estimator: Estimator | str, input_clamp: float | None = None, output_clamp: float | None = None
) -> list[tuple[float, float]]:
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


# --- the clamped estimator and its bias ----------------------------------------------------------


def clamped_numeric(estimator: Estimator | str, input_clamp: float | None = None, output_clamp: float | None = None):
    r"""Vectorised :math:`t \mapsto \min(\max(k(e^{\operatorname{clip}(t, -a, a)}), -c), c)`.

    >>> float(clamped_numeric("k3", 20, 10)(np.array(5.0)))
    10.0
    """
    k = get_estimator(estimator).numeric
    a = _check_clamp(input_clamp, "input clamp")
    c = _check_clamp(output_clamp, "output clamp")

    def value(t):
        t = np.asarray(t)
        inner = t if a is None else np.clip(t, -a, a)
        out = k(inner)
        return out if c is None else np.clip(out, -c, c)

    return value


def clamped_numeric_dt(estimator: Estimator | str, input_clamp: float | None = None, output_clamp: float | None = None):
    r"""Derivative in t of what is differentiated in ``loss`` mode, clamps included.

    Zero where a clamp is active (``torch.clamp`` passes no gradient there); a straight-through
    estimator's surrogate is unclamped (verl: ``b - b.detach() + clamped.detach()``), so its
    derivative is the surrogate's everywhere.

    >>> d = clamped_numeric_dt("k3", 20, 10)
    >>> d(np.array([1.0, 3.0, -12.0])).round(6).tolist()
    [1.718282, 0.0, 0.0]
    """
    estimator = get_estimator(estimator)
    if estimator.straight_through:
        return estimator.numeric_dt
    k, dk = estimator.numeric, estimator.numeric_dt
    a = _check_clamp(input_clamp, "input clamp")
    c = _check_clamp(output_clamp, "output clamp")

    def derivative(t):
        t = np.asarray(t)
        live = np.ones(t.shape, dtype=bool)
        if a is not None:
            live &= np.abs(t) <= a
        if c is not None:
            live &= np.abs(k(t if a is None else np.clip(t, -a, a))) <= c
        return np.where(live, dk(t), 0.0)

    return derivative


#: Standardised half-width beyond which the Gaussian sampler's mass (e^-1800) is ignored.
_Z_LIMIT = 60.0


def _gaussian_log_ratio_coefficients(q: Gaussian, p: Gaussian) -> tuple[float, float, float]:
    """t as a quadratic in z = (x - mu_q) / sigma_q: t = A z^2 + B z + C."""
    ratio, shift = q.sigma / p.sigma, (q.mu - p.mu) / p.sigma
    # z_p = ratio z + shift; t = log(sigma_q/sigma_p) + (z^2 - z_p^2) / 2
    return (1 - ratio**2) / 2, -ratio * shift, math.log(ratio) - shift**2 / 2


def _z_intervals(q: Gaussian, p: Gaussian, region) -> list[tuple[float, float]]:
    """The z-intervals (within +-_Z_LIMIT) where t(z) lies in the union of t-intervals ``region``."""
    A, B, C = _gaussian_log_ratio_coefficients(q, p)
    cuts = {-_Z_LIMIT, _Z_LIMIT}
    for edge in {e for interval in region for e in interval if math.isfinite(e)}:
        roots = np.roots([A, B, C - edge]) if abs(A) > 1e-300 else ([(edge - C) / B] if B else [])
        cuts.update(float(z.real) for z in np.atleast_1d(roots) if abs(z.imag) < 1e-12 and abs(z.real) < _Z_LIMIT)
    if abs(A) > 1e-300 and abs(B / (2 * A)) < _Z_LIMIT:
        cuts.add(-B / (2 * A))
    cuts = sorted(cuts)
    inside = []
    for lo, hi in zip(cuts[:-1], cuts[1:]):
        mid = (lo + hi) / 2
        t_mid = A * mid * mid + B * mid + C
        if any(a < t_mid < b for a, b in region):
            inside.append((lo, hi))
    return inside


def _gaussian_region_integral(q: Gaussian, p: Gaussian, region, g) -> tuple[float, float]:
    r""":math:`\int_{t(x) \in \text{region}} q(x)\, g(t(x), x)\, dx` piece by smooth piece
    (composite Gauss-Legendre over the range where the integrand is within :math:`e^{-75}` of its
    peak), scaled by the piece's largest :math:`\log(q |g|)` so tiny tails keep their digits."""
    A, B, C = _gaussian_log_ratio_coefficients(q, p)
    total, error = 0.0, 0.0
    for lo, hi in _z_intervals(q, p, region):

        def log_abs(z):
            z = np.asarray(z, dtype=np.float64)
            with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
                values = g(A * z * z + B * z + C, q.mu + q.sigma * z)
                return -0.5 * z * z - 0.5 * math.log(2 * math.pi) + np.log(np.abs(values)), np.sign(values)

        grid = np.linspace(lo, hi, 2001)
        logs, _ = log_abs(grid)
        finite = np.isfinite(logs)
        if not finite.any():
            continue
        shift = float(np.max(logs[finite]))
        # Where the integrand is within e^-75 of its peak (one grid step of margin each side).
        alive = np.flatnonzero(finite & (logs > shift - 75.0))
        step = grid[1] - grid[0]
        a, b = max(lo, grid[alive[0]] - step), min(hi, grid[alive[-1]] + step)
        value, err = _composite_gauss_legendre(log_abs, a, b, shift)
        scale = math.exp(shift) if shift < 709 else math.inf
        total += value * scale
        error += err * scale
    return total, error


_GL_COARSE = np.polynomial.legendre.leggauss(12)
_GL_FINE = np.polynomial.legendre.leggauss(24)
_PANELS = 96


def _composite_gauss_legendre(log_abs, a: float, b: float, shift: float) -> tuple[float, float]:
    """Vectorised composite Gauss-Legendre (96 panels, 24 and 12 nodes: value, |difference|) of a
    smooth integrand given as (log|f|, sign f), scaled by exp(-shift)."""
    edges = np.linspace(a, b, _PANELS + 1)
    half, middle = np.diff(edges) / 2, (edges[:-1] + edges[1:]) / 2
    results = []
    for nodes, weights in (_GL_FINE, _GL_COARSE):
        z = (middle[:, None] + half[:, None] * nodes[None, :]).ravel()
        logs, sign = log_abs(z)
        values = np.where(np.isfinite(logs), sign * np.exp(np.minimum(logs - shift, 700.0)), 0.0)
        results.append(float(np.sum(half * (values.reshape(_PANELS, -1) @ weights))))
    return results[0], abs(results[0] - results[1])


def _expect(q, p, region, g):
    """E_q[g(t(x), x)] over the t-region: exact sums (categorical) or piecewise quadrature (Gaussian)."""
    if isinstance(q, Categorical):
        probs, support = q.probs, np.flatnonzero(q.probs > 0)
        t = (p.log_probs - q.log_probs)[support]
        return float(np.sum(probs[support] * g(t, support))), 0.0
    if not (isinstance(q, Gaussian) and isinstance(p, Gaussian)):
        raise ValueError("clamp bias needs a Gaussian or a Categorical pair")
    return _gaussian_region_integral(q, p, region, g)


def _categorical_weight_gradient(q, p, weight):
    # Score of a softmax wrt logit j is onehot_j - q_j: E_q[w s_j] = q_j (w_j - E_q[w]).
    probs, support = q.probs, np.flatnonzero(q.probs > 0)
    t = (p.log_probs - q.log_probs)[support]
    w = weight(t)
    grad = np.zeros(q.size)
    grad[support] = probs[support] * (w - np.sum(probs[support] * w))
    return grad


def clamp_bias(
    estimator: Estimator | str,
    q,
    p,
    input_clamp: float | None = None,
    output_clamp: float | None = None,
    *,
    detach_weight_outside_input_clamp: bool = False,
    quantities=None,
) -> dict:
    r"""Exact effect of clamps on the value and on each mode's expected gradient.

    The clamped and unclamped estimators differ only inside :func:`saturation_region`, so each
    bias is computed as an integral (Gaussian, log-space quadrature) or a sum (categorical) of
    the difference over that region: tiny biases keep their relative accuracy. The unclamped
    numbers come from :mod:`klsym.exact.expectations`; ``clamped = unclamped + bias``.

    Parameters
    ----------
    estimator : Estimator or str
    q, p : Gaussian or Categorical
        Sampler (the policy) and reference.
    input_clamp, output_clamp : float, optional
        a and c of :func:`clamped_numeric`.
    detach_weight_outside_input_clamp : bool
        NeMo-RL's ``full`` mode: the weight exp(logp - stop(logp)) is detached where the input
        clamp bites, so the reward part vanishes for :math:`|t| > a`.
    quantities : sequence of str, optional
        Subset of ``"value", "loss", "reward", "full"`` (default: all).

    Returns
    -------
    dict
        ``{"value": {...}, "gradient": {mode: {...}}}``; each entry holds ``unclamped``,
        ``clamped``, ``bias`` (clamped - unclamped) and ``relative`` (|bias| / |unclamped|, norms
        for gradients), plus ``error_estimate`` for quadrature.

    Examples
    --------
    >>> out = clamp_bias("k3", Gaussian(0, 1), Gaussian(3, 1), 20, 10)
    >>> out["value"]["bias"] < 0, out["gradient"]["loss"]["relative"] > 1e-3
    (True, True)
    """
    estimator = get_estimator(estimator)
    a = _check_clamp(input_clamp, "input clamp")
    c = _check_clamp(output_clamp, "output clamp")
    quantities = ("value",) + exact.MODES if quantities is None else tuple(quantities)
    k, dk_sur = estimator.numeric, estimator.numeric_dt

    def pieces(t):
        """k(t), the clamped k(t), and where no clamp is active (float64: quadrature passes longdouble)."""
        t = np.asarray(t, dtype=np.float64)
        with np.errstate(over="ignore", invalid="ignore"):
            k_t = k(t)
            inside = np.ones(t.shape, dtype=bool) if a is None else np.abs(t) <= a
            k_in = k_t if a is None or inside.all() else np.where(inside, k_t, k(np.clip(t, -a, a)))
            live = inside if c is None else inside & (np.abs(k_in) <= c)
            k_c = k_in if c is None else np.clip(k_in, -c, c)
        return t, k_t, k_c, live

    def value_difference(t):
        _, k_t, k_c, live = pieces(t)
        return np.where(live, 0.0, k_c - k_t)  # exactly 0 outside the region (also where k_t = inf)

    def reward_difference(t, full: bool):
        t, k_t, k_c, live = pieces(t)
        diff = np.where(live, 0.0, k_c - k_t)
        if full and detach_weight_outside_input_clamp and a is not None:
            diff = np.where(np.abs(t) > a, -k_t, diff)
        return diff

    def loss_difference(t):
        t, _, _, live = pieces(t)
        if estimator.straight_through:  # the unclamped surrogate carries the gradient
            return np.zeros_like(t)
        return np.where(live, 0.0, dk_sur(t))  # -(0 - k'(t)) where a clamp is active

    weights = {
        "value": value_difference,
        "loss": loss_difference,
        "reward": lambda t: reward_difference(t, False),
        "full": lambda t: loss_difference(t) + reward_difference(t, True),
    }
    region = saturation_region(estimator, input_clamp, output_clamp)
    result = {"kl": exact.kl_divergences(q, p), "gradient": {}}
    for quantity in quantities:
        if quantity == "value":
            unclamped = exact.estimator_stats(estimator, q, p)["mean"]
            bias, error = _expect(q, p, region, lambda t, x: weights["value"](t))
            result["value"] = _entry(unclamped, bias, error)
            continue
        if quantity not in exact.MODES:
            raise ValueError(f"unknown quantity {quantity!r}; choose from value, {', '.join(exact.MODES)}")
        unclamped = np.asarray(exact.estimator_gradient(estimator, q, p, quantity), dtype=np.float64)
        if isinstance(q, Categorical):
            grad_bias = _categorical_weight_gradient(q, p, weights[quantity])
            grad_error = np.zeros_like(unclamped)
        else:
            parts = [
                _expect(q, p, region, lambda t, x, i=i, w=weights[quantity]: w(t) * q.score(x)[..., i])
                for i in range(len(q.param_names))
            ]
            grad_bias, grad_error = np.array([v for v, _ in parts]), np.array([e for _, e in parts])
        result["gradient"][quantity] = _entry(unclamped, grad_bias, grad_error)
    return result


def _entry(unclamped, bias, error) -> dict:
    unclamped, bias = np.asarray(unclamped, dtype=np.float64), np.asarray(bias, dtype=np.float64)
    scale = float(np.linalg.norm(np.atleast_1d(unclamped)))
    size = float(np.linalg.norm(np.atleast_1d(bias)))
    relative = size / scale if scale > 0 else (0.0 if size == 0 else math.inf)
    as_output = (lambda v: float(v)) if unclamped.ndim == 0 else (lambda v: np.asarray(v))
    return {
        "unclamped": as_output(unclamped),
        "clamped": as_output(unclamped + bias),
        "bias": as_output(bias),
        "relative": relative,
        "error_estimate": as_output(error),
    }


def gaussian_mean_shift_bias(
    estimator: Estimator | str,
    deltas,
    input_clamp: float | None = None,
    output_clamp: float | None = None,
    *,
    sigma_ratio: float = 1.0,
    detach_weight_outside_input_clamp: bool = False,
    quantities=None,
) -> list[dict]:
    r"""Relative clamp bias along q = N(0, 1), p = N(delta, sigma_ratio): one row per delta
    with the value's and each mode's relative bias (for figures and onset searches)."""
    rows = []
    for delta in np.atleast_1d(deltas):
        out = clamp_bias(
            estimator,
            Gaussian(0.0, 1.0),
            Gaussian(float(delta), sigma_ratio),
            input_clamp,
            output_clamp,
            detach_weight_outside_input_clamp=detach_weight_outside_input_clamp,
            quantities=quantities,
        )
        row = {"delta": float(delta), "KL(q||p)": out["kl"]["KL(q||p)"]}
        if "value" in out:
            row["value"] = out["value"]["relative"]
        row.update({mode: entry["relative"] for mode, entry in out["gradient"].items()})
        rows.append(row)
    return rows


def onset_distance(
    estimator: Estimator | str,
    input_clamp: float | None = None,
    output_clamp: float | None = None,
    *,
    quantity: str = "value",
    threshold: float = 1e-6,
    deltas=None,
    sigma_ratio: float = 1.0,
    **options,
) -> float:
    r"""Smallest mean shift delta (q = N(0,1), p = N(delta, sigma_ratio)) where the clamp's
    relative bias of ``quantity`` ("value", "loss", "reward", "full") exceeds ``threshold``.

    Scanned on ``deltas`` (default 0.05..20, log-spaced), then refined by bisection on
    :math:`\log` relative bias; ``inf`` when the threshold is never reached on the grid.

    >>> round(onset_distance("k3", 20, 10), 2)   # verl's k3 clamps bias the value from delta ~ 0.53
    0.53
    """
    deltas = np.geomspace(0.05, 20, 27) if deltas is None else np.asarray(deltas, dtype=float)

    def relative(delta):
        return gaussian_mean_shift_bias(
            estimator, [delta], input_clamp, output_clamp, sigma_ratio=sigma_ratio, quantities=[quantity], **options
        )[0][quantity]

    values = np.array([relative(d) for d in deltas])
    above = np.flatnonzero(values > threshold)
    if above.size == 0:
        return math.inf
    first = above[0]
    if first == 0:
        return float(deltas[0])
    lo, hi = float(deltas[first - 1]), float(deltas[first])
    while hi / lo - 1 > 1e-4:  # relative bias grows with delta: bisect in log delta
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if relative(mid) <= threshold else (lo, mid)
    return hi


__all__ = [
    "T_MAX",
    "level_crossings",
    "saturation_region",
    "format_region",
    "clamped_numeric",
    "clamped_numeric_dt",
    "clamp_bias",
    "gaussian_mean_shift_bias",
    "onset_distance",
]
