"""Low-precision log-probabilities: exact q-weighted errors, checked by construction and by Monte Carlo."""

import ml_dtypes
import numpy as np
import pytest
from scipy.special import log_softmax

from klsym.derive.estimators import TAYLOR_RADIUS, get_estimator
from klsym.exact.precision import (
    LOW_PRECISION,
    PIPELINES,
    identical_logits_kl,
    log_softmax_kernel,
    lowp_estimates,
    policy_pair,
    round_to,
    token_level_error,
)

VOCAB = 32_000


@pytest.fixture(scope="module")
def pair():
    return policy_pair(VOCAB, np.random.default_rng(3), perturbation=0.1)


def _ulp(x, significant_bits):
    """Spacing of floats with ``significant_bits`` bits around |x| (frexp: x = m 2^e, 0.5 <= m < 1)."""
    _, exponent = np.frexp(np.abs(x))
    return np.ldexp(1.0, exponent - significant_bits)


@pytest.mark.parametrize("dtype, bits", [("bfloat16", 8), ("float16", 11), ("float32", 24)])
def test_round_to_keeps_the_significant_bits(dtype, bits):
    x = np.random.default_rng(0).uniform(-20, -1e-3, 10_000)
    rounded = round_to(x, dtype)
    mantissa, exponent = np.frexp(rounded)
    assert np.all(np.ldexp(mantissa, bits) == np.round(np.ldexp(mantissa, bits)))  # on the bit grid
    assert np.all(np.abs(rounded - x) <= _ulp(x, bits) / 2)  # nearest


@pytest.mark.parametrize("pipeline", ["stored", "stable"])
def test_float64_has_no_error(pair, pipeline):
    # "stable" walks the same expression with its own operation order: a few eps, no more.
    eps = np.finfo(float).eps
    for row in token_level_error(*pair, "float64", "k1,k2,k3,k4", pipeline):
        assert abs(row["bias"]) <= 4 * eps * row["exact"] and row["spread"] <= 4 * eps * row["exact"]


def test_stored_error_is_the_rounding_of_t(pair):
    # With t and k in float64, the only error is t's: |dt| <= half an ulp of each log-prob.
    log_q, log_p = log_softmax(pair[0]), log_softmax(pair[1])
    t_rounded = round_to(log_p, "bfloat16") - round_to(log_q, "bfloat16")
    bound = (_ulp(log_p, 8) + _ulp(log_q, 8)) / 2
    assert np.all(np.abs(t_rounded - (log_p - log_q)) <= bound)
    k1 = lowp_estimates("k1", log_p, log_q, "bfloat16", "stored")
    np.testing.assert_array_equal(k1, -t_rounded)


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_spread_shrinks_with_precision(pair, estimator):
    spreads = [token_level_error(*pair, d, estimator, "stored")[0]["spread"] for d in LOW_PRECISION]
    assert spreads[0] > spreads[1] > spreads[2] > 0


@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_fp32_stable_form_beats_naive_low_precision(dtype):
    # Log-ratios exactly representable in the dtype, so only the evaluation of k3 differs.
    t = round_to(-np.logspace(-4, -0.5, 200), dtype)
    exact = get_estimator("k3").numeric(t)
    relative = {
        pipeline: np.max(np.abs(lowp_estimates("k3", t, np.zeros_like(t), dtype, pipeline) / exact - 1))
        for pipeline in ("naive", "fp32")
    }
    # expm1(t) - t in float32 just outside the Taylor radius: error ~ 4 eps32 / |t|.
    assert relative["fp32"] <= 4 * np.finfo(np.float32).eps / TAYLOR_RADIUS
    assert relative["naive"] > 10 * relative["fp32"]


def test_low_precision_stable_form_still_cancels():
    # The Taylor radius is tuned for float64: in bfloat16, expm1(t) - t just outside it is 0.
    t = round_to(np.array([-2e-3, 2e-3]), "bfloat16")
    assert np.all(lowp_estimates("k3", t, np.zeros_like(t), "bfloat16", "stable") == 0)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("pipeline", list(PIPELINES))
def test_monte_carlo_confirms_the_exact_bias(pair, dtype, pipeline):
    # Tokens x ~ q; the sample mean of (k_hat - k) estimates the exact q-weighted bias (|z| < 5).
    logits_q, logits_p = pair
    log_q, log_p = log_softmax(logits_q), log_softmax(logits_p)
    q = np.exp(log_q)
    rng = np.random.default_rng(11)
    tokens = rng.choice(VOCAB, size=200_000, p=q / q.sum())
    k3 = get_estimator("k3")
    errors = lowp_estimates(k3, log_p[tokens], log_q[tokens], dtype, pipeline) - k3.numeric(
        log_p[tokens] - log_q[tokens]
    )
    row = token_level_error(logits_q, logits_p, dtype, "k3", pipeline)[0]
    z = (errors.mean() - row["bias"]) / (row["spread"] / np.sqrt(errors.size))
    assert abs(z) < 5, z


def test_identical_logits_same_kernel_give_zero():
    logits = policy_pair(4096, np.random.default_rng(1))[1]
    for kernel in ("fused", "unfused", "lowp"):
        out = identical_logits_kl(logits, "bfloat16", kernel, kernel)
        assert out["mismatch_mass"] == 0 and all(v == 0 for v in out["estimates"].values())


def test_identical_logits_different_kernels_give_nonzero_kl(pair):
    out = identical_logits_kl(pair[1], "bfloat16", "fused", "unfused")
    assert out["mismatch_mass"] > 0.01
    assert out["estimates"]["k3"] > 0 and out["estimates"]["k2"] > 0
    # One extra rounding: the two log-probs differ by at most one bfloat16 ulp of the log-prob.
    log_q = log_softmax_kernel(pair[1], "bfloat16", "fused")
    assert np.all(np.abs(out["t"]) <= _ulp(log_q, 8) + 1e-300)


def test_identical_logits_monte_carlo(pair):
    out = identical_logits_kl(pair[1], "bfloat16", "fused", "unfused")
    q, t = out["q"], out["t"]
    rng = np.random.default_rng(5)
    tokens = rng.choice(t.size, size=200_000, p=q / q.sum())
    for name in ("k1", "k3"):
        values = get_estimator(name).numeric(t[tokens])
        z = (values.mean() - out["estimates"][name]) / (values.std(ddof=1) / np.sqrt(values.size))
        assert abs(z) < 5, (name, z)


def test_bad_input():
    with pytest.raises(ValueError, match="unknown dtype"):
        round_to([1.0], "float8")
    with pytest.raises(ValueError, match="unknown pipeline"):
        lowp_estimates("k3", np.zeros(2), np.zeros(2), "float32", "fancy")
    with pytest.raises(ValueError, match="differ in shape"):
        token_level_error(np.zeros(3), np.zeros(4), "float32")
    with pytest.raises(ValueError, match="unknown kernel"):
        log_softmax_kernel(np.zeros(3), "bfloat16", "magic")
    assert ml_dtypes.bfloat16 is not None
