r"""Published seed tables (``data/*.csv``) and their exact counterparts.

Each CSV row names a setting (q, p), the estimator, the quantity and the published value as printed.
:func:`exact_value` computes the same quantity exactly, with the published document's own
definition (including its choice of "true" KL direction); :func:`monte_carlo_se` gives the standard
error the published Monte Carlo number carries, so a difference can be read as a z-score.

>>> rows = load_rows()
>>> sorted({row["seed_file"][:3] for row in rows})
['000', '001', '003']
"""

from __future__ import annotations

import csv
import math
from functools import cache

import numpy as np

from klsym.derive.estimators import get_estimator
from klsym.exact import quadrature
from klsym.exact.expectations import (
    KL_PQ,
    KL_QP,
    estimator_gradient,
    estimator_gradient_std,
    estimator_stats,
    kl_divergences,
    true_gradients,
)
from klsym.exact.families import Gaussian, log_ratio
from klsym.paths import DATA_DIR

TABLES = ("zhang2025_k4.csv", "schulman2020_tables.csv", "yang2025_gradients.csv")
_PARAMS = {"mu": 0, "sigma": 1}


def load_rows(tables=TABLES) -> list[dict]:
    """All published rows, as dicts of strings (``published_value`` kept exactly as printed)."""
    rows = []
    for name in tables:
        with open(DATA_DIR / name, newline="", encoding="utf-8") as handle:
            rows += [dict(row, file=name) for row in csv.DictReader(handle)]
    return rows


def pair(row) -> tuple[Gaussian, Gaussian]:
    return (Gaussian(float(row["q_mu"]), float(row["q_sigma"])), Gaussian(float(row["p_mu"]), float(row["p_sigma"])))


def half_unit(printed: str) -> float:
    """Half a unit in the last printed digit: ``"1.42"`` -> 0.005, ``"20"`` -> 0.5."""
    mantissa, _, exponent = printed.lower().partition("e")
    decimals = len(mantissa.partition(".")[2])
    return 0.5 * 10.0 ** (-decimals + (int(exponent) if exponent else 0))


@cache
def log_ratio_range(q: Gaussian, p: Gaussian) -> tuple[float, float]:
    r"""The range of :math:`t(x)` over the real line (it is quadratic in x)."""
    curvature = 1 / q.sigma**2 - 1 / p.sigma**2
    if curvature == 0:
        return (-math.inf, math.inf) if q.mu != p.mu else (0.0, 0.0)
    vertex = (p.mu / p.sigma**2 - q.mu / q.sigma**2) / (-curvature)
    extreme = float(log_ratio(p, q, np.array(vertex)))
    return (-math.inf, extreme) if curvature < 0 else (extreme, math.inf)


def support_bounds(estimator, q: Gaussian, p: Gaussian) -> tuple[float, float]:
    r"""Exact :math:`\inf_x k` and :math:`\sup_x k` over the attainable log-ratios (limits at infinite ends)."""
    estimator = get_estimator(estimator)
    lo, hi = log_ratio_range(q, p)
    grid = np.linspace(max(lo, -700.0), min(hi, 700.0), 200_001)
    if lo <= 0.0 <= hi:  # r = 1 is attained: every estimator with k(1) = 0 reaches 0 there
        grid = np.sort(np.append(grid, 0.0))
    values = np.asarray(estimator.numeric(grid), dtype=np.float64)
    inf, sup = float(values.min()), float(values.max())
    # at an infinite end, a value still growing there means the bound is infinite
    if math.isinf(hi) and values[-1] == sup and values[-1] > values[-2]:
        sup = math.inf
    if math.isinf(lo) and values[0] == sup and values[0] > values[1]:
        sup = math.inf
    if math.isinf(hi) and values[-1] == inf and values[-1] < values[-2]:
        inf = -math.inf
    if math.isinf(lo) and values[0] == inf and values[0] < values[1]:
        inf = -math.inf
    return inf, sup


def _true_kl(row) -> float:
    return kl_divergences(*pair(row))[row["published_true_direction"].split(" ")[0]]


def _true_gradient(row) -> float:
    return float(true_gradients(*pair(row))[row["published_true_direction"]][_PARAMS[row["parameter"]]])


def exact_value(row) -> float:
    """The exact counterpart of a published number, under the document's own definitions."""
    q, p = pair(row)
    quantity, name = row["quantity"], row["estimator"]
    if row["file"] == "yang2025_gradients.csv":
        true = _true_gradient(row)
        if quantity == "true_gradient":
            return true
        i = _PARAMS[row["parameter"]]
        # Yang back-propagates the batch mean of k with samples fixed: the loss mode
        mean = float(estimator_gradient(name, q, p, "loss")[i])
        if quantity == "average_gradient":
            return mean
        if quantity == "bias/true":
            return abs(mean - true) / abs(true)
        per_trial = float(estimator_gradient_std(name, q, p, "loss")[i]) / math.sqrt(float(row["sample_size"]))
        return per_trial / abs(true)
    stats = estimator_stats(name, q, p)
    true = _true_kl(row)
    if quantity in ("bias", "bias/true"):
        return (stats["mean"] - true) / true
    if quantity in ("std", "stdev/true"):
        return stats["std"] / true
    bounds = support_bounds(name, q, p)
    return bounds[0] if quantity == "min" else bounds[1]


def monte_carlo_se(row) -> float:
    """Standard error of the published Monte Carlo number (NaN for exact or extreme-value quantities)."""
    q, p = pair(row)
    quantity, name = row["quantity"], row["estimator"]
    n, trials = float(row["sample_size"]), float(row["trials"])
    if row["file"] == "yang2025_gradients.csv":
        if quantity == "true_gradient":
            return math.nan
        i = _PARAMS[row["parameter"]]
        true = abs(_true_gradient(row))
        sample_std = float(estimator_gradient_std(name, q, p, "loss")[i])
        if quantity in ("average_gradient", "bias/true"):
            se = sample_std / math.sqrt(n * trials)
            return se if quantity == "average_gradient" else se / true
        # std over `trials` per-trial means; their excess kurtosis is the per-sample one over n
        kurtosis = _gradient_excess_kurtosis(name, q, p, i) / n
        per_trial = sample_std / math.sqrt(n)
        return per_trial / 2 * math.sqrt(2 / (trials - 1) + kurtosis / trials) / true
    if quantity not in ("bias", "std", "bias/true", "stdev/true"):
        return math.nan
    stats = estimator_stats(name, q, p)
    true = _true_kl(row)
    if quantity in ("bias", "bias/true"):
        return stats["std"] / math.sqrt(n) / true
    fourth = _central_moment(name, q, p, stats["mean"], 4)
    return math.sqrt(max(fourth - stats["std"] ** 4, 0.0) / n) / (2 * stats["std"]) / true


def _central_moment(name, q, p, mean, order) -> float:
    estimator = get_estimator(name)
    return quadrature.expect(q, lambda x: (estimator.numeric(log_ratio(p, q, x)) - mean) ** order)[0]


def _gradient_excess_kurtosis(name, q, p, i) -> float:
    estimator = get_estimator(name)
    mean = float(estimator_gradient(name, q, p, "loss")[i])
    std = float(estimator_gradient_std(name, q, p, "loss")[i])

    def centred(x):
        return -np.asarray(estimator.numeric_dt(log_ratio(p, q, x))) * q.score(x)[..., i] - mean

    return quadrature.expect(q, lambda x: centred(x) ** 4)[0] / std**4 - 3


def reproduction_rows() -> list[dict]:
    """Every published row next to its exact value, the z-score against the MC standard error, and,
    for Zhang's table, the bias/std relative to KL(q||p) (the direction k1..k4 actually estimate)."""
    out = []
    for row in load_rows():
        exact = exact_value(row)
        se = monte_carlo_se(row)
        published = float(row["published_value"])
        entry = {
            "seed": row["seed_file"][:3],
            "table": row["table"],
            "estimator": row["estimator"],
            "param": row["parameter"] or "",
            "quantity": row["quantity"],
            "published": row["published_value"],
            "exact": exact,
            "z": (published - exact) / se if se and math.isfinite(se) else None,
            "true_is": row["published_true_direction"].split(" ")[0],
            "estimates": row["estimator_direction"],
        }
        if row["file"] == "zhang2025_k4.csv" and row["quantity"] in ("bias", "std"):
            q, p = pair(row)
            stats = estimator_stats(row["estimator"], q, p)
            kl_qp = kl_divergences(q, p)[KL_QP]
            entry[f"vs {KL_QP}"] = (
                (stats["mean"] - kl_qp) / kl_qp if row["quantity"] == "bias" else stats["std"] / kl_qp
            )
        out.append(entry)
    return out


__all__ = [
    "TABLES",
    "load_rows",
    "pair",
    "half_unit",
    "exact_value",
    "monte_carlo_se",
    "support_bounds",
    "log_ratio_range",
    "reproduction_rows",
    "KL_PQ",
]
