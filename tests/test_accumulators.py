"""The streaming driver and its mergeable accumulators: merge order, chunk invariance, reference values."""

import math

import numpy as np
import pytest

from klsym.derive.estimators import MODES, get_estimator, gradient_weights
from klsym.exact.families import Categorical, Gaussian
from klsym.simulate.accumulators import (
    FEED_BLOCKS,
    BatchSpread,
    Extremes,
    GradientSums,
    Histogram,
    LogRatioHistogram,
    Moments,
    TrialGradients,
    feed,
    lane_sums,
    needs_samples,
)
from klsym.simulate.driver import Stream, stream_through

PAIRS = {
    "gaussian": (Gaussian(0.0, 1.0), Gaussian(0.4, 1.2)),
    "categorical": (Categorical(np.log([0.5, 0.3, 0.2])), Categorical(np.log([0.2, 0.2, 0.6]))),
}


def _accumulators(stream):
    width, sampler = len(stream.estimators), stream.sampler
    return [
        Moments(width),
        Moments(width, square=True),
        Extremes(width),
        Histogram(width),
        BatchSpread(width, 256),
        GradientSums(width, MODES, sampler.size, sampler.categorical),
    ]


def _state(accumulators):
    out = []
    for a in accumulators:
        a.merge(a.empty())  # folds anything pending
        out.append({k: v for k, v in vars(a).items() if not k.startswith("_") and k != "moments"})
        if isinstance(a, BatchSpread):
            out.append(vars(a.moments))
    return out


@pytest.mark.parametrize("family", PAIRS)
def test_every_accumulator_is_bit_identical_for_any_chunking_and_threads(family):
    q, p = PAIRS[family]
    n = 3 * 65536 + 1234  # a partial last block
    states = []
    for chunk, threads in ((1, 1), (65536, 2), (4 * 65536, 3)):
        stream = Stream(q, p, "k1,k3,rev_k1", seed=7)
        accumulators = _accumulators(stream)
        stream_through(stream, stream.streaming_plan(n, chunk), accumulators, threads=threads)
        states.append(_state(accumulators))
    for other in states[1:]:
        for a, b in zip(states[0], other):
            for key in a:
                np.testing.assert_array_equal(np.asarray(a[key]), np.asarray(b[key]), err_msg=key)


@pytest.mark.parametrize("family", PAIRS)
def test_feeding_groups_of_blocks_estimator_by_estimator_gives_each_accumulators_own_update(family):
    q, p = PAIRS[family]
    stream = Stream(q, p, "k1,k3,rev_k1", seed=11)
    six = [((b,), 5000) for b in range(FEED_BLOCKS + 2)]  # more blocks than feed reduces at once
    trials = TrialGradients(3, MODES, stream.sampler.size, stream.sampler.categorical, len(six) + 1)
    fed = _accumulators(stream) + [LogRatioHistogram(), trials]
    alone = [a.empty() for a in fed]
    for blocks in (six, [((FEED_BLOCKS + 2,), 777)]):
        feed(fed, stream.draw(blocks))
        for accumulator in alone:
            accumulator.update(stream.draw(blocks))
    for a, b in zip(_state(fed), _state(alone)):
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(np.asarray(a[key]), np.asarray(b[key]), err_msg=key)
    assert fed[-2].counts.sum() == len(six) * 5000 + 777
    np.testing.assert_array_equal(fed[-2].counts, alone[-2].counts)


def test_a_chunk_keeps_the_samples_only_where_an_accumulator_reads_them(monkeypatch):
    q, p = PAIRS["gaussian"]
    stream = Stream(q, p, "k3", seed=4)
    gradient = [GradientSums(1, ("loss",), stream.sampler.size, False)]
    assert not needs_samples([Moments(1), Extremes(1), LogRatioHistogram()]) and needs_samples(gradient)
    kept, skipped = stream.draw([((0,), 3000)]), stream.draw([((0,), 3000)], keep_samples=False)
    np.testing.assert_array_equal(kept.t, skipped.t)
    assert kept.data.shape == kept.t.shape
    if skipped.kernels is not None:  # the compiled draw stores no x; the array code computes t from x anyway
        assert skipped.data is None


def test_moments_match_numpy_on_the_same_draws():
    q, p = PAIRS["gaussian"]
    stream = Stream(q, p, "k1,k3", seed=3)
    n = 2 * 65536 + 10
    plan = list(stream.streaming_plan(n))
    moments, extremes = Moments(2), Extremes(2)
    stream_through(stream, plan, [moments, extremes])
    t = np.concatenate([stream.draw(blocks).t.ravel() for blocks in plan])
    values = np.stack([get_estimator("k1").numeric(t), get_estimator("k3").numeric(t)])
    assert moments.count == n
    np.testing.assert_allclose(moments.mean, values.mean(axis=1), rtol=1e-13)
    np.testing.assert_allclose(moments.std(), values.std(axis=1, ddof=1), rtol=1e-12)
    np.testing.assert_array_equal(extremes.min, values.min(axis=1))
    np.testing.assert_array_equal(extremes.negative, (values < 0).sum(axis=1))


def _lane_sum_by_definition(sequence) -> float:
    """klsym's summation order, one addition at a time: element i into lane i mod 128, lane j into accumulator
    j mod 8, each in order; the accumulators in a fixed tree, added to 0."""
    lanes = [0.0] * 128
    for i, x in enumerate(sequence):
        lanes[i % 128] = lanes[i % 128] + x
    a = lanes[:8]
    for j in range(8, 128):
        a[j % 8] = a[j % 8] + lanes[j]
    return 0.0 + (((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7])))


@pytest.mark.parametrize("shape", [(1, 65536), (3, 1000), (2, 5, 300), (4, 127), (2, 0)])
def test_lane_sums_add_in_klsyms_order(shape):
    values = np.random.default_rng(1).standard_normal(shape) * np.exp(np.random.default_rng(2).uniform(-20, 20, shape))
    flat = values.reshape(math.prod(shape[:-1]), shape[-1])
    flat[0, :3] = -0.0
    expected = np.array([_lane_sum_by_definition(row.tolist()) for row in flat], dtype=float).reshape(shape[:-1])
    got = lane_sums(np, values)
    np.testing.assert_array_equal(got, expected)
    assert np.signbit(got).tolist() == np.signbit(expected).tolist()
    np.testing.assert_array_equal(
        lane_sums(np, values.astype(np.float32)), lane_sums(np, values.astype(np.float32).astype(np.float64))
    )


def test_merge_folds_the_other_accumulators_blocks_after_its_own():
    q, p = PAIRS["gaussian"]
    stream = Stream(q, p, "k2", seed=1)
    plan = list(stream.streaming_plan(4 * 65536))
    whole = Moments(1)
    stream_through(stream, plan, [whole], threads=1)
    first, second = Moments(1), Moments(1)
    for blocks in plan[:2]:
        first.update(stream.draw(blocks))
    for blocks in plan[2:]:
        second.update(stream.draw(blocks))
    merged = Moments(1).merge(first).merge(second)
    assert merged.count == whole.count
    np.testing.assert_array_equal(merged.mean, whole.mean)
    np.testing.assert_array_equal(merged.std(), whole.std())


def test_trial_gradients_keep_block_order():
    q, p = PAIRS["gaussian"]
    stream = Stream(q, p, "k3", seed=2)
    trials = TrialGradients(1, ("loss",), 2, False, 5)
    stream_through(stream, stream.trials_plan(1000, 5, 2), [trials], threads=3)
    for i in range(5):
        chunk = stream.draw([((1, i), 1000)])
        w = chunk.weights(0, ("loss",))["loss"][0]
        expected = (w * chunk.score()[:, 0]).sum(axis=-1) / 1000
        np.testing.assert_allclose(trials.result[0, i], expected, rtol=1e-12)


@pytest.mark.parametrize("name", ["k1", "k2", "k3", "rev_k1", "k3+"])
def test_gradient_weights_follow_the_mode_definitions(name):
    estimator = get_estimator(name)
    t = np.linspace(-3, 3, 13)
    w = gradient_weights(estimator.numeric, estimator.numeric_dt, t)
    np.testing.assert_allclose(w["reward"], estimator.numeric(t))
    np.testing.assert_allclose(w["loss"], -estimator.numeric_dt(t))
    np.testing.assert_allclose(w["full"], w["loss"] + w["reward"])


def test_gradient_weights_reject_unknown_modes():
    k1 = get_estimator("k1")
    with pytest.raises(ValueError, match="unknown gradient mode"):
        gradient_weights(k1.numeric, k1.numeric_dt, np.zeros(2), ("pathwise",))
