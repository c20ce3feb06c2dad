"""klsym.rl.logprob against high-precision evaluations of the SymPy expressions."""

import mpmath
import numpy as np
import pytest
import sympy as sp

from klsym.derive.estimators import BUILTINS, TAYLOR_RADIUS, get_estimator
from klsym.derive.symbols import r
from klsym.rl.logprob import estimate, estimate_all, estimate_from_logratio, log_ratio

EXTREME_T = [
    -700.0,
    -100.0,
    -20.0,
    -1.0,
    -1.0001e-3,
    -0.999e-3,
    -1e-6,
    -1e-12,
    0.0,
    1e-12,
    1e-6,
    0.999e-3,
    1.0001e-3,
    0.5,
    1.0,
    20.0,
    100.0,
    700.0,
]


def _reference(expr, t):
    """k(e^t) at 60 significant digits (SymPy/mpmath), as a float."""
    with mpmath.workdps(60):
        value = sp.N(expr.subs(r, sp.exp(sp.Float(t, 60))), 60)
    return float(value)


@pytest.mark.parametrize("name", list(BUILTINS))
def test_values_match_high_precision(name):
    estimator = get_estimator(name)
    got = estimate_from_logratio(estimator, np.array(EXTREME_T))
    want = np.array([_reference(estimator.expr, t) for t in EXTREME_T])
    assert np.all(np.isfinite(got))
    # Worst case: a closed form just outside the Taylor radius cancels terms of size |t| to leave
    # ~t^2, so its relative error is a few eps/|t|: bound 16 eps / TAYLOR_RADIUS (3.6e-12).
    np.testing.assert_allclose(got, want, rtol=16 * np.finfo(float).eps / TAYLOR_RADIUS, atol=0)


@pytest.mark.parametrize("name", list(BUILTINS))
def test_same_formula_as_estimator_numeric(name):
    estimator = get_estimator(name)
    t = np.linspace(-50, 50, 2001)
    np.testing.assert_allclose(estimate_from_logratio(estimator, t), estimator.numeric(t), rtol=1e-15)


def test_argument_order_reference_first():
    log_p, log_q = np.array([-3.0, -0.5]), np.array([-1.0, -2.0])
    np.testing.assert_array_equal(estimate("k1", log_p, log_q), log_q - log_p)
    np.testing.assert_array_equal(log_ratio(log_p, log_q), log_p - log_q)


def test_clamps():
    t = np.array([-40.0, -15.0, 0.3, 3.0, 40.0])
    k3 = lambda s: np.expm1(s) - s  # noqa: E731
    got = estimate_from_logratio("k3", t, input_clamp=20, output_clamp=10)
    np.testing.assert_allclose(got, np.minimum(k3(np.clip(t, -20, 20)), 10.0))
    got_k1 = estimate_from_logratio("k1", t, output_clamp=10)
    np.testing.assert_array_equal(got_k1, np.clip(-t, -10, 10))


def test_straight_through_without_autograd_is_the_value():
    t = np.linspace(-5, 5, 11)
    np.testing.assert_array_equal(estimate_from_logratio("k3+", t), estimate_from_logratio("k3", t))


def test_dtype_is_kept_and_cast():
    log_p = np.array([-1.0, -2.0], dtype=np.float32)
    log_q = np.array([-1.5, -1.0], dtype=np.float32)
    assert estimate("k3", log_p, log_q).dtype == np.float32
    assert estimate("k3", log_p, log_q, dtype=np.float64).dtype == np.float64


def test_estimate_all_names():
    out = estimate_all(np.array([-1.0]), np.array([-2.0]), "k1,low_var_kl,k4")
    assert list(out) == ["k1", "k3", "k4"]


def test_monte_carlo_mean_is_kl():
    # Tokens drawn from q; the mean of k1 and k3 estimates KL(q||p) = sum q log(q/p) (|z| < 5).
    rng = np.random.default_rng(6)
    log_q = np.log(rng.dirichlet(np.ones(50)))
    log_p = np.log(rng.dirichlet(np.ones(50)))
    q = np.exp(log_q)
    exact = float(np.sum(q * (log_q - log_p)))
    tokens = rng.choice(50, size=200_000, p=q / q.sum())
    for name in ("k1", "k3"):
        values = estimate(name, log_p[tokens], log_q[tokens])
        z = (values.mean() - exact) / (values.std(ddof=1) / np.sqrt(values.size))
        assert abs(z) < 5, (name, z)


def test_bad_input():
    with pytest.raises(KeyError, match="unknown estimator"):
        estimate("k9", np.zeros(1), np.zeros(1))
    with pytest.raises(ValueError, match="input clamp|must"):
        from klsym.exact.clamps import saturation_region

        saturation_region("k3", input_clamp=-1)
