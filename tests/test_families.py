"""Families: parameter validation, log-density, score and sampler against independent formulas."""

import math

import numpy as np
import pytest
from scipy import stats

from klsym.exact.families import Categorical, Gaussian, check_same_family, log_ratio


@pytest.mark.parametrize(
    "mu, sigma, message",
    [
        (0.0, 0.0, "sigma must be positive"),
        (0.0, -1.0, "sigma must be positive"),
        (0.0, math.nan, "sigma must be positive"),
        (0.0, math.inf, "sigma must be positive"),
        (math.nan, 1.0, "mu must be finite"),
        ("a", 1.0, "mu must be a real number"),
    ],
)
def test_gaussian_rejects_bad_parameters_with_one_clear_error(mu, sigma, message):
    with pytest.raises(ValueError, match=message):
        Gaussian(mu, sigma)


@pytest.mark.parametrize(
    "logits, message",
    [
        ([np.nan, 0.0], "NaN"),
        ([np.inf, 0.0], r"\+inf"),
        ([-np.inf, -np.inf], "all -inf"),
        ([[0.0, 1.0]], "1-D"),
        ([], "non-empty"),
    ],
)
def test_categorical_rejects_bad_logits(logits, message):
    with pytest.raises(ValueError, match=message):
        Categorical(logits)


def test_mismatched_vocab_sizes_are_rejected():
    with pytest.raises(ValueError, match="same vocabulary size"):
        check_same_family(Categorical([0.0, 1.0]), Categorical([0.0, 1.0, 2.0]))


def test_mixed_families_are_rejected():
    with pytest.raises(ValueError, match="same family"):
        check_same_family(Gaussian(0, 1), Categorical([0.0, 1.0]))


def test_gaussian_log_prob_matches_scipy():
    x = np.linspace(-5, 5, 11)
    np.testing.assert_allclose(Gaussian(0.3, 1.7).log_prob(x), stats.norm(0.3, 1.7).logpdf(x), rtol=1e-14)


def test_gaussian_log_ratio_matches_difference_of_log_densities():
    q, p = Gaussian(0.2, 1.3), Gaussian(-0.5, 0.8)
    x = np.linspace(-6, 6, 25)
    expected = stats.norm(-0.5, 0.8).logpdf(x) - stats.norm(0.2, 1.3).logpdf(x)
    np.testing.assert_allclose(log_ratio(p, q, x), expected, rtol=1e-12, atol=1e-13)


def test_gaussian_score_matches_finite_differences_of_log_density():
    x, h = np.array([-1.3, 0.4, 2.2]), 1e-6
    score = Gaussian(0.5, 1.5).score(x)
    d_mu = (Gaussian(0.5 + h, 1.5).log_prob(x) - Gaussian(0.5 - h, 1.5).log_prob(x)) / (2 * h)
    d_sigma = (Gaussian(0.5, 1.5 + h).log_prob(x) - Gaussian(0.5, 1.5 - h).log_prob(x)) / (2 * h)
    np.testing.assert_allclose(score, np.stack([d_mu, d_sigma], -1), rtol=1e-8)


def test_gaussian_mass_between_matches_scipy_in_both_tails():
    g = Gaussian(1.0, 2.0)
    for lo, hi in [(-np.inf, 0.0), (30.0, 40.0), (-40.0, -30.0), (0.0, np.inf)]:
        expected = stats.norm(1.0, 2.0).cdf(hi) - stats.norm(1.0, 2.0).cdf(lo)
        if lo > 1.0:
            expected = stats.norm(1.0, 2.0).sf(lo) - stats.norm(1.0, 2.0).sf(hi)
        assert float(g.mass_between(lo, hi)) == pytest.approx(expected, rel=1e-12)


def test_categorical_probabilities_and_score():
    logits = np.array([0.0, 1.0, -np.inf, 2.0])
    c = Categorical(logits)
    expected = np.exp(logits) / np.exp(logits).sum()
    np.testing.assert_allclose(c.probs, expected, rtol=1e-15)
    np.testing.assert_allclose(c.score(np.array([1])), [np.eye(4)[1] - expected])


@pytest.mark.parametrize("family", [Gaussian(0.5, 2.0), Categorical([0.0, 1.0, 2.0])])
def test_sampler_mean_matches_distribution_mean(family):
    # z-test with the exact standard error of the sample mean
    rng = np.random.default_rng(12345)
    n = 200_000
    draws = family.sample(rng, n).astype(float)
    if isinstance(family, Gaussian):
        mean, sd = family.mu, family.sigma
    else:
        support = np.arange(family.size)
        mean = float(np.sum(family.probs * support))
        sd = math.sqrt(float(np.sum(family.probs * (support - mean) ** 2)))
    assert abs(draws.mean() - mean) / (sd / math.sqrt(n)) < 5


def test_categorical_reads_npy_and_text(tmp_path):
    logits = np.array([0.5, -1.0, 2.0])
    np.save(tmp_path / "l.npy", logits)
    (tmp_path / "l.txt").write_text("0.5 -1.0\n2.0\n")
    for name in ("l.npy", "l.txt"):
        np.testing.assert_array_equal(Categorical.from_file(tmp_path / name).logits, logits)
    with pytest.raises(FileNotFoundError, match="not found"):
        Categorical.from_file(tmp_path / "missing.txt")
