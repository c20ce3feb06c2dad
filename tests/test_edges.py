"""Numbers at the edges (issue 11): near-equal policies against 50-digit mpmath references,
zero-probability tokens, extreme parameters, every allowed formula, contracts.

References are computed here independently of the code under test: Gaussian expectations by
100-node Gauss-Hermite quadrature in mpmath at 50 digits (the integrands are entire in x for
these near-equal pairs), categorical ones by exact sums in mpmath at 50 digits.
"""
import json
import math
from functools import lru_cache

import mpmath
import numpy as np
import pytest
import sympy as sp

from klsym.cli import main
from klsym.derive.estimators import BUILTINS, from_formula, in_logratio
from klsym.derive.symbols import t
from klsym.exact.expectations import MODES, estimator_gradient, estimator_stats, kl_divergences
from klsym.exact.families import Categorical, Gaussian

DIGITS = 50
SHIFTS = [10.0**-k for k in range(3, 9)]  # 1e-3 .. 1e-8
RTOL = 1e-10
CATEGORICAL_Q = [0.3, -1.2, 0.5, 2.0, -0.7]
CATEGORICAL_DIRECTION = [1.0, 0.0, -1.0, 0.5, 0.0]


@lru_cache(maxsize=None)
def _hermite():
    with mpmath.workdps(DIGITS):
        nodes, weights = mpmath.gauss_quadrature(100, "hermite")
        return nodes, [w / mpmath.sqrt(mpmath.pi) for w in weights]


@lru_cache(maxsize=None)
def _functions_of_t(name):
    estimator = BUILTINS[name]
    value = sp.lambdify(t, in_logratio(estimator.expr), "mpmath")
    slope = sp.lambdify(t, sp.diff(in_logratio(estimator.surrogate), t), "mpmath")
    return value, slope


def _reference(name, points, log_ratios, scores):
    """mean, std and the three gradient modes from weighted points (mpmath, DIGITS digits)."""
    value, slope = _functions_of_t(name)
    k = [value(v) for v in log_ratios]
    loss_weight = [-slope(v) for v in log_ratios]
    mean = mpmath.fsum(w * kv for w, kv in zip(points, k))
    std = mpmath.sqrt(mpmath.fsum(w * (kv - mean) ** 2 for w, kv in zip(points, k)))
    out = {"mean": mean, "std": std}
    for mode, weight in (("loss", loss_weight), ("reward", k)):
        out[mode] = [mpmath.fsum(w * c * s[i] for w, c, s in zip(points, weight, scores))
                     for i in range(len(scores[0]))]
    out["full"] = [a + b for a, b in zip(out["loss"], out["reward"])]
    return out


def gaussian_reference(name, q, p):
    with mpmath.workdps(DIGITS):
        nodes, weights = _hermite()
        mu, sigma = map(mpmath.mpf, q)
        mu_p, sigma_p = map(mpmath.mpf, p)
        xs = [mu + mpmath.sqrt(2) * sigma * y for y in nodes]
        log_ratios = [mpmath.log(sigma / sigma_p) + ((x - mu) / sigma) ** 2 / 2 - ((x - mu_p) / sigma_p) ** 2 / 2
                      for x in xs]
        scores = [((x - mu) / sigma**2, (((x - mu) / sigma) ** 2 - 1) / sigma) for x in xs]
        return _reference(name, weights, log_ratios, scores)


def categorical_reference(name, q_logits, p_logits):
    with mpmath.workdps(DIGITS):
        def log_softmax(logits):
            logits = [mpmath.mpf(v) for v in logits]
            top = max(logits)
            norm = top + mpmath.log(mpmath.fsum(mpmath.exp(v - top) for v in logits))
            return [v - norm for v in logits]

        lq, lp = log_softmax(q_logits), log_softmax(p_logits)
        probs = [mpmath.exp(v) for v in lq]
        size = len(probs)
        scores = [[(1 if i == j else 0) - probs[j] for j in range(size)] for i in range(size)]
        return _reference(name, probs, [b - a for a, b in zip(lq, lp)], scores)


def _error(value, reference, scale) -> float:
    """|value - reference| relative to |reference|; a component far below the vector's scale is compared to it."""
    reference = mpmath.mpf(reference)
    if scale < mpmath.mpf(10) ** (10 - DIGITS):  # the reference is zero to its precision: so must the value be
        return abs(float(value)) / 1e-20
    return float(abs(mpmath.mpf(float(value)) - reference) / max(abs(reference), mpmath.mpf(1e-6) * scale))


def _worst_errors(name, q, p, reference) -> dict:
    stats = estimator_stats(name, q, p)
    errors = {key: _error(stats[key], reference[key], abs(reference[key])) for key in ("mean", "std")}
    for mode in MODES:
        grad = estimator_gradient(name, q, p, mode)
        scale = max(abs(v) for v in reference[mode])
        errors[mode] = max(_error(g, ref, scale) for g, ref in zip(grad, reference[mode]))
    return errors


GAUSSIAN_SHIFTS = [("mean", d) for d in SHIFTS] + [("scale", d) for d in SHIFTS]


@pytest.mark.parametrize("name", list(BUILTINS))
@pytest.mark.parametrize("kind, shift", GAUSSIAN_SHIFTS)
def test_gaussian_near_equal_matches_mpmath(kind, shift, name):
    q = (0.0, 1.0)
    p = (shift, 1.0) if kind == "mean" else (0.0, 1.0 + shift)
    errors = _worst_errors(name, Gaussian(*q), Gaussian(*p), gaussian_reference(name, q, p))
    assert max(errors.values()) < RTOL, errors


@pytest.mark.parametrize("name", list(BUILTINS))
@pytest.mark.parametrize("shift", SHIFTS)
def test_categorical_near_equal_matches_mpmath(shift, name):
    p_logits = [a + shift * b for a, b in zip(CATEGORICAL_Q, CATEGORICAL_DIRECTION)]
    errors = _worst_errors(name, Categorical(CATEGORICAL_Q), Categorical(p_logits),
                           categorical_reference(name, CATEGORICAL_Q, p_logits))
    assert max(errors.values()) < RTOL, errors
