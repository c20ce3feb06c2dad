"""Quantiles of every estimator from one histogram of t: the bracket holds the sample quantile, and the
estimate is within the documented accuracy of it (klsym.simulate.accumulators.quantiles_of_function)."""

import numpy as np
import pytest

from klsym.derive.estimators import BUILTINS
from klsym.exact.families import Categorical, Gaussian
from klsym.simulate.accumulators import T_HIST_BITS, LogRatioHistogram
from klsym.simulate.driver import Stream, stream_through
from klsym.simulate.montecarlo import run

LEVELS = (0.0, 0.01, 0.05, 0.25, 0.5, 0.95, 0.99, 1.0)
INTERIOR = LEVELS[1:-1]
_ZERO_MASS = np.append(np.log([0.5, 0.3, 0.2, 1e-3]), -np.inf)  # a token p never emits: t = -inf there
PAIRS = {
    "close": (Gaussian(0.0, 1.0), Gaussian(0.1, 1.0)),
    "far": (Gaussian(0.0, 1.0), Gaussian(2.0, 1.0)),
    "p_wider": (Gaussian(0.0, 1.0), Gaussian(0.5, 1.6)),
    "categorical": (
        Categorical(np.random.default_rng(10).normal(size=40)),
        Categorical(np.random.default_rng(11).normal(size=40)),
    ),
    "zero_mass": (Categorical(np.log([0.2, 0.2, 0.2, 0.2, 0.2])), Categorical(_ZERO_MASS)),
}


def _histogram_and_draws(q, p, n=3 * 65536 + 77, seed=5):
    stream = Stream(q, p, "k1", seed=seed)
    plan = list(stream.streaming_plan(n))
    histogram = LogRatioHistogram()
    stream_through(stream, plan, [histogram], threads=2)
    return histogram, np.concatenate([stream.draw(blocks).t.ravel() for blocks in plan])


@pytest.fixture(scope="module", params=list(PAIRS))
def drawn(request):
    return request.param, *_histogram_and_draws(*PAIRS[request.param])


@pytest.mark.parametrize("name", list(BUILTINS))
def test_bracket_holds_the_sample_quantile(drawn, name):
    pair, histogram, t = drawn
    function = BUILTINS[name].numeric
    with np.errstate(all="ignore"):
        k = function(t)
    finite = k[~np.isnan(k)]  # inf values (k1 where p(x) = 0) are samples too; NaN ones have no value
    brackets = histogram.quantiles(function, LEVELS, bracket=True)
    estimates = histogram.quantiles(function, LEVELS)
    for level in LEVELS:
        exact = np.quantile(finite, level, method="inverted_cdf")
        low, high = brackets[str(level)]
        slack = 2.0**-23 * abs(exact) if np.isfinite(exact) else 0.0  # t is binned as float32 (rounded)
        assert low - slack <= exact <= high + slack, (pair, name, level, low, exact, high)
        assert low <= estimates[str(level)] <= high


@pytest.mark.parametrize("pair", [name for name, (q, _) in PAIRS.items() if isinstance(q, Gaussian)])
def test_gaussian_quantiles_are_within_the_documented_accuracy(pair):
    """The bracket allows about |t k'(t)/k(t)| 2^-9 relative; interpolating inside it does better: every
    built-in at every interior level within 2^-8 of the sample quantile."""
    histogram, t = _histogram_and_draws(*PAIRS[pair])
    for name in BUILTINS:
        _check_accuracy(pair, name, histogram, t)


def _check_accuracy(pair, name, histogram, t):
    k = BUILTINS[name].numeric(t)
    estimates = histogram.quantiles(BUILTINS[name].numeric, INTERIOR)
    for level in INTERIOR:
        exact = np.quantile(k, level, method="inverted_cdf")
        assert estimates[str(level)] == pytest.approx(exact, rel=2.0 ** -(T_HIST_BITS - 10)), (pair, name, level)


def test_run_reports_the_same_quantiles_for_any_chunking():
    q, p = PAIRS["far"]
    a = run(q, p, "k1,k3,k4", n=2 * 65536 + 5, seed=1, chunk=1, threads=1, batch_size=None)["estimators"]
    b = run(q, p, "k1,k3,k4", n=2 * 65536 + 5, seed=1, chunk=1 << 20, threads=2, batch_size=None)["estimators"]
    assert all(a[name]["quantiles"] == b[name]["quantiles"] for name in a)
    assert a["k3"]["quantiles"]["0.5"] > 0


def test_quantiles_and_batch_spread_cover_zero_mass_samples():
    """p(x) = 0 for one token of three: t = -inf for a third of the samples, where k1 = inf, rev_k1 = 0 log 0 = 0
    and rev_k3 = 1. Quantiles are over all samples (QA: they were over finite t only), k1's batch spread is inf."""
    q, p = Categorical(np.zeros(3)), Categorical(np.array([0.0, -np.inf, 0.0]))
    result = run(q, p, "k1,rev_k1,rev_k3", n=10_000, seed=0, quantiles=(0.01, 0.5, 0.95, 0.99))["estimators"]
    zero_mass = result["k1"]["n_nonfinite"] / 10_000
    assert 0.3 < zero_mass < 0.37  # a third, within 5 standard errors
    on_support = 1.5 * np.log(1.5)  # r = 1.5 on the other two tokens
    rev_k1, rev_k3, k1 = (result[name]["quantiles"] for name in ("rev_k1", "rev_k3", "k1"))
    assert rev_k1["0.01"] == 0.0 and rev_k1["0.99"] == pytest.approx(on_support, rel=2.0**-8)
    assert rev_k3["0.99"] == 1.0 and rev_k3["0.01"] == pytest.approx(on_support - 0.5, rel=2.0**-8)
    assert k1["0.95"] == np.inf and k1["0.99"] == np.inf and k1["0.01"] == pytest.approx(-np.log(1.5), rel=2.0**-8)
    assert result["k1"]["batch"]["mean_std"] == np.inf
    assert np.isfinite(result["rev_k1"]["batch"]["mean_std"]) and result["rev_k1"]["min"] == 0.0


def test_quantiles_asked_between_updates_follow_the_samples_added_since():
    """The histogram keeps the bins it met between calls: blocks added after a call must change the answer."""
    q, p = PAIRS["far"]
    stream = Stream(q, p, "k1", seed=2)
    plan = list(stream.streaming_plan(4 * 65536, chunk=65536))
    k1 = BUILTINS["k1"].numeric
    growing, whole = LogRatioHistogram(), LogRatioHistogram()
    growing.update(stream.draw(plan[0]))
    first = growing.quantiles(k1, INTERIOR)
    for blocks in plan[1:]:
        growing.update(stream.draw(blocks))
    stream_through(stream, plan, [whole], threads=1)
    assert growing.quantiles(k1, INTERIOR) == whole.quantiles(k1, INTERIOR) != first
