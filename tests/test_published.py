"""Seed tables (data/*.csv) reproduced by the exact layer, row by row.

Directions: Zhang (seed 000) divides by truekl = kl_divergence(p, q) = KL(p||q) while k1..k4 estimate
KL(q||p); his "bias" and "std" are therefore relative to the other direction, and we reproduce them
under his definition (and also show them against KL(q||p)). Schulman (seed 001) uses equal sigmas, where
KL(q||p) = KL(p||q). Yang (seed 003) back-propagates the batch mean of each estimator with samples held
fixed (our ``loss`` mode) and compares k1..k3 with grad KL(q||p), reverse_k1/k2 with grad KL(p||q).
"""

import math

import numpy as np
import pytest

from klsym.derive.estimators import get_estimator
from klsym.exact.expectations import KL_PQ, KL_QP, estimator_gradient_std, estimator_stats, kl_divergences
from klsym.exact.families import Gaussian
from klsym.report.published import (
    exact_value,
    half_unit,
    load_rows,
    log_ratio_range,
    monte_carlo_se,
    pair,
    support_bounds,
)

ROWS = load_rows()


def _rows(file, *quantities):
    return [
        pytest.param(r, id=f"{r['table']}-{r['estimator']}-{r['parameter']}-{r['quantity']}")
        for r in ROWS
        if r["file"] == file and (not quantities or r["quantity"] in quantities)
    ]


def test_every_seed_table_is_transcribed():
    counts = {}
    for r in ROWS:
        counts[r["table"]] = counts.get(r["table"], 0) + 1
    assert counts == {
        "zhang_k4": 16,
        "schulman_p_0.1": 6,
        "schulman_p_1": 6,
        "average_gradient": 14,
        "kl_bias_std_mu": 6,
        "kl_bias_std_sigma": 6,
        "reverse_kl_bias_std_mu": 4,
        "reverse_kl_bias_std_sigma": 4,
    }
    for r in ROWS:
        assert r["published_true_direction"].split(" ")[0] in (KL_QP, KL_PQ)
        assert r["estimator_direction"] in (KL_QP, KL_PQ)
        float(r["published_value"])


# --- Schulman (seed 001) -----------------------------------------------------------------------------


@pytest.mark.parametrize("row", _rows("schulman2020_tables.csv"))
def test_schulman_closed_forms_round_to_the_published_digits(row):
    """Exact bias/true and stdev/true, rounded like the printed number, give the printed number.

    The k2 bias at p = N(0.1, 1) is exactly 0.0025 (E[k2] = (sigma_t^2 + m_t^2)/2 with t ~ N(-0.005, 0.1^2)):
    it sits on the rounding boundary of "0.002", hence the 1e-9 relative slack on the half unit."""
    published = float(row["published_value"])
    assert abs(exact_value(row) - published) <= half_unit(row["published_value"]) * (1 + 1e-9)


def test_schulman_equal_sigmas_make_both_directions_equal():
    for row in ROWS:
        if row["file"] == "schulman2020_tables.csv":
            kl = kl_divergences(*pair(row))
            assert kl[KL_QP] == pytest.approx(kl[KL_PQ], rel=1e-14)


# --- Zhang (seed 000) --------------------------------------------------------------------------------


@pytest.mark.parametrize("row", _rows("zhang2025_k4.csv", "bias", "std"))
def test_zhang_bias_and_std_relative_to_kl_p_q_within_monte_carlo_error(row):
    """His truekl is KL(p||q) (0.4004) although k1..k4 estimate KL(q||p) (1.158): we reproduce his numbers
    with his denominator; the z-score uses the standard error of 10M draws (std / sqrt(n) for the mean,
    sqrt(mu4 - sigma^4) / (2 sigma sqrt(n)) for the std)."""
    z = (float(row["published_value"]) - exact_value(row)) / monte_carlo_se(row)
    assert abs(z) < 5


def test_zhang_direction_mismatch_changes_the_story():
    """Against KL(q||p), the direction they estimate, k1 and k3 are unbiased and k4 is biased by -60%."""
    q, p = Gaussian(1.3, 2.5), Gaussian(0.5, 1.2)
    kl = kl_divergences(q, p)
    assert kl[KL_QP] > 2.8 * kl[KL_PQ]
    for name in ("k1", "k3"):
        assert estimator_stats(name, q, p)["mean"] == pytest.approx(kl[KL_QP], rel=1e-12)
    assert (estimator_stats("k4", q, p)["mean"] - kl[KL_QP]) / kl[KL_QP] < -0.5


@pytest.mark.parametrize("row", _rows("zhang2025_k4.csv", "min", "max"))
def test_zhang_extremes_lie_within_the_exact_support(row):
    """min/max are extremes of 10M float32 draws: they must lie in [inf k, sup k] over the attainable
    log-ratios, up to float32 rounding (his k4 is computed as log(p^2 - 2pq + 2q^2) - 2 log q in float32, so
    -2.4e-07 is rounding below the exact minimum 0)."""
    inf, sup = support_bounds(row["estimator"], *pair(row))
    published = float(row["published_value"])
    slack = 4 * np.finfo(np.float32).eps * max(1.0, abs(published))
    assert inf - slack <= published <= sup + slack


def test_zhang_k1_min_and_k4_max_are_attained_at_the_log_ratio_peak():
    """p is narrower than q, so t(x) has a maximum t*; k1's minimum is -t* and k4's maximum is k4(e^t*):
    10M draws get within float32 precision of both."""
    q, p = Gaussian(1.3, 2.5), Gaussian(0.5, 1.2)
    peak = log_ratio_range(q, p)[1]
    assert -peak == pytest.approx(-8.004973e-01, abs=1e-6)
    assert float(get_estimator("k4").numeric(np.array(peak))) == pytest.approx(0.918155, abs=1e-6)
    assert support_bounds("k1", q, p)[1] == math.inf and support_bounds("k4", q, p)[1] == pytest.approx(
        0.918155, abs=1e-6
    )


# --- Yang (seed 003) ---------------------------------------------------------------------------------


@pytest.mark.parametrize("row", _rows("yang2025_gradients.csv", "true_gradient"))
def test_yang_true_gradients_are_exact_to_the_printed_digits(row):
    assert abs(exact_value(row) - float(row["published_value"])) <= half_unit(row["published_value"]) * (1 + 1e-9)


@pytest.mark.parametrize("row", _rows("yang2025_gradients.csv", "average_gradient"))
def test_yang_average_gradients_equal_loss_mode_within_monte_carlo_error(row):
    """Average over 1000 x 50k samples: standard error = exact per-sample std / sqrt(5e7)."""
    z = (float(row["published_value"]) - exact_value(row)) / monte_carlo_se(row)
    assert abs(z) < 5


@pytest.mark.parametrize("row", _rows("yang2025_gradients.csv", "bias/true"))
def test_yang_bias_over_true(row):
    """|mean - true| / |true|: the MC mean's noise moves it by at most the standard error (plus rounding
    of the printed 4 decimals); unbiased rows (k2, reverse_k2) show only that noise."""
    difference = abs(float(row["published_value"]) - exact_value(row))
    assert difference <= 5 * monte_carlo_se(row) + half_unit(row["published_value"])


def _per_sample_kurtosis_is_moderate(row):
    from klsym.report.published import _gradient_excess_kurtosis

    return _gradient_excess_kurtosis(row["estimator"], *pair(row), {"mu": 0, "sigma": 1}[row["parameter"]]) < 1e3


@pytest.mark.parametrize("row", _rows("yang2025_gradients.csv", "stdev/true"))
def test_yang_stdev_over_true(row):
    """Std over 1000 trials of the per-trial mean gradient = per-sample std / sqrt(50000) exactly.

    Light-tailed rows (k1, k2: per-sample excess kurtosis < 1e3) match within 5 standard errors of a
    1000-sample std, plus rounding. For k3 and the reverse estimators the per-sample gradient carries
    r = p/q with p wider than q: E[r^4] is barely finite (3 sigma_p^2 < 4 sigma_q^2: 3.63 < 4), the excess
    kurtosis is 1e8-1e13, and a 1000-trial sample std typically falls short of the true std; every such
    published value is indeed below the exact one (and above half of it)."""
    published, exact = float(row["published_value"]), exact_value(row)
    if _per_sample_kurtosis_is_moderate(row):
        assert abs(published - exact) <= 5 * monte_carlo_se(row) + half_unit(row["published_value"])
    else:
        assert exact / 2 < published < exact


def test_yang_loss_mode_per_sample_std_matches_monte_carlo():
    """The exact per-sample std used above, checked by sampling (seeded; z-test on the sample variance)."""
    q, p = Gaussian(0.0, 1.0), Gaussian(1.0, 1.1)
    rng = np.random.default_rng(7)
    n = 400_000
    x = q.sample(rng, n)
    t = np.log(np.exp(-((x - 1) ** 2) / (2 * 1.21)) / 1.1) - np.log(np.exp(-(x**2) / 2))
    per_sample = -t * x  # k2 in loss mode: -(dk2/dt)(t) * score_mu = -t * (x - mu_q) / sigma_q^2
    exact = estimator_gradient_std("k2", q, p, "loss")[0]
    sample_var = per_sample.var()
    se = np.sqrt(np.var((per_sample - per_sample.mean()) ** 2) / n)
    assert abs(sample_var - exact**2) / se < 5
