"""The compiled kernels give the array code's numbers bit for bit (draws, log-ratios, histograms, whole runs)."""

import math
import os
import subprocess
import sys

import numpy as np
import pytest

from klsym.exact.families import Categorical, Gaussian
from klsym.simulate import kernels
from klsym.simulate.accumulators import ValueSummary, histogram_keys
from klsym.simulate.backend import get_backend
from klsym.simulate.driver import KERNELS_ENV, Stream, compiled_kernels
from klsym.simulate.montecarlo import gradient, run

GAUSSIAN_PAIRS = {  # (q, p): near and far, both branches of log(sigma_q / sigma_p), extreme scales
    "schulman": (Gaussian(0.0, 1.0), Gaussian(1.0, 1.0)),
    "shifted_scaled": (Gaussian(0.3, 2.0), Gaussian(-1.0, 0.5)),
    "near": (Gaussian(0.0, 1.0), Gaussian(1e-9, 1.0 + 1e-9)),
    "narrow": (Gaussian(5.0, 1e-3), Gaussian(5.001, 1e-3)),
    "wide_p": (Gaussian(0.0, 1.0), Gaussian(0.0, 5.0)),
    "tiny_sigma": (Gaussian(0.0, 1e-300), Gaussian(1.0, 1.0)),
    "huge": (Gaussian(1e150, 1e150), Gaussian(-1e150, 3e150)),
}
_rng = np.random.default_rng(42)
_with_zero = _rng.normal(size=300)
_with_zero[[3, 50]] = -np.inf  # p(x) = 0 on part of q's support: t = -inf
CATEGORICAL_PAIRS = {
    "small": (Categorical(np.log([0.5, 0.3, 0.2])), Categorical(np.log([0.2, 0.2, 0.6]))),
    "zero_probability": (Categorical(_rng.normal(size=300)), Categorical(_with_zero)),
    "vocabulary": (Categorical(_rng.normal(size=50_000) * 3), Categorical(_rng.normal(size=50_000) * 3)),
}


def _array_code(monkeypatch):
    monkeypatch.setenv(KERNELS_ENV, "0")


@pytest.mark.parametrize("pair", GAUSSIAN_PAIRS)
@pytest.mark.parametrize("keys", [[(0,)], [(7,), (8,), (9,)], [(1, 3)]])
def test_gaussian_draws_are_the_array_codes_bits(pair, keys, monkeypatch):
    q, p = GAUSSIAN_PAIRS[pair]
    stream = Stream(q, p, "k1", seed=11)
    assert compiled_kernels(stream.backend, stream.sampler.dtype) is kernels
    compiled = stream.draw([(key, 5000) for key in keys])
    _array_code(monkeypatch)
    array = stream.draw([(key, 5000) for key in keys])
    assert compiled.kernels is kernels and array.kernels is None
    np.testing.assert_array_equal(compiled.data, array.data)  # x, NaN where the array code has NaN
    np.testing.assert_array_equal(compiled.t, array.t)
    assert compiled.t.shape == (len(keys), 5000) and compiled.t.dtype == np.float64


@pytest.mark.parametrize("pair", CATEGORICAL_PAIRS)
def test_categorical_draws_are_the_array_codes_bits(pair, monkeypatch):
    q, p = CATEGORICAL_PAIRS[pair]
    stream = Stream(q, p, "k1", seed=5)
    compiled = stream.draw([((0,), 20_000), ((1,), 20_000)])
    _array_code(monkeypatch)
    array = stream.draw([((0,), 20_000), ((1,), 20_000)])
    np.testing.assert_array_equal(compiled.data, array.data)
    np.testing.assert_array_equal(compiled.t, array.t)
    if pair == "zero_probability":
        assert np.isneginf(compiled.t).any()  # the -inf tokens were drawn, so the case was exercised


@pytest.mark.parametrize("bits", [4, 12, 18])
def test_log_ratio_histogram_counts_the_array_codes_keys(bits):
    t = np.random.default_rng(3).standard_normal((3, 4000)) * np.exp(np.random.default_rng(4).uniform(-30, 30, 4000))
    t[0, :5] = [np.inf, -np.inf, np.nan, 0.0, -0.0]
    t[1, :2] = [1e300, -1e300]  # beyond float32: the inf bins
    keys = histogram_keys(np, t, bits)
    for _ in range(2):  # the second call finds the per-thread table zeroed again
        met, counts = kernels.log_ratio_histogram(t, bits)
        assert (np.diff(met) > 0).all()  # each key once, in increasing order
        np.testing.assert_array_equal(
            np.bincount(met, weights=counts, minlength=1 << bits), np.bincount(keys, minlength=1 << bits)
        )


def test_inlined_normals_are_numpys_numbers_and_leave_the_generator_where_numpy_does():
    tail = 0
    for seed in range(20):
        generator, reference = np.random.default_rng(seed), np.random.default_rng(seed)
        out = np.empty(200_000)
        kernels.standard_normals(generator, out)
        np.testing.assert_array_equal(out, reference.standard_normal(out.size))
        assert generator.bit_generator.state == reference.bit_generator.state
        tail += int((np.abs(out) > kernels.ziggurat_nor_r).sum())  # only the tail branch draws these
    assert tail > 0
    other = np.random.Generator(np.random.Philox(3))  # not PCG64: numba's own Generator path
    kernels.standard_normals(other, out[:1000])
    np.testing.assert_array_equal(out[:1000], np.random.Generator(np.random.Philox(3)).standard_normal(1000))


def test_near_zero_indices_are_numpys():
    t = np.random.default_rng(8).standard_normal((3, 5000)) * np.exp(np.random.default_rng(9).uniform(-12, 2, 5000))
    t[1, :6] = [np.nan, np.inf, -np.inf, 0.0, -0.0, -1e-3]
    found = kernels.near_zero(t, 1e-3)
    assert found.dtype == np.intp and 0 < found.size < t.size
    np.testing.assert_array_equal(found, np.flatnonzero(np.abs(t) < 1e-3))
    np.testing.assert_array_equal(kernels.near_zero(t[1:2], 1e-3), np.flatnonzero(np.abs(t[1]) < 1e-3))


def _values_with_edges(rows: int, size: int) -> np.ndarray:
    values = np.random.default_rng(size).standard_normal((rows, size)) * 3.0
    values[0, : min(size, 40)] = -0.0  # a lane of signed zeros: -0.0 + -0.0 stays -0.0, 0.0 + -0.0 does not
    values[-1] = np.abs(values[-1])  # a row with no negative value: the count is skipped
    return values


@pytest.mark.parametrize("size, batch", [(65536, 1024), (65536, None), (5000, 1000), (300, 128), (100, 7), (1, 1)])
def test_value_summaries_are_the_array_codes_bits(size, batch):
    values = _values_with_edges(3, size)
    compiled, array = ValueSummary(np, values, batch, kernels), ValueSummary(np, values, batch)
    assert (compiled.batch_means is None) == (array.batch_means is None) == (batch is None)
    for name in ("means", "m2s", "low", "high", "negative", "nonfinite", "batch_means"):
        a, b = np.asarray(getattr(compiled, name), dtype=float), np.asarray(getattr(array, name), dtype=float)
        np.testing.assert_array_equal(a, b, err_msg=name)
        assert np.signbit(a).tolist() == np.signbit(b).tolist(), name
    assert np.array_equal(array.low, values.min(axis=1)) and np.array_equal(array.negative, (values < 0).sum(axis=1))


@pytest.mark.parametrize("bad", [[np.inf], [np.nan], [-np.inf, np.inf], [1e308, 1e308]])
def test_value_summaries_of_rows_with_inf_or_nan_are_the_array_codes(bad):
    values = _values_with_edges(3, 1000)
    values[1, 10 : 10 + len(bad)] = bad  # row 1 only: the others keep the kernel's extremes
    with np.errstate(over="ignore", invalid="ignore"):  # as the accumulators run it
        compiled, array = ValueSummary(np, values, 100, kernels), ValueSummary(np, values, 100)
    for name in ("means", "m2s", "low", "high", "negative", "nonfinite", "batch_means"):
        np.testing.assert_array_equal(getattr(compiled, name), getattr(array, name), err_msg=name)
    assert compiled.nonfinite.tolist() == [0, np.count_nonzero(~np.isfinite(bad)), 0]


def _without_timing(result: dict) -> dict:
    return {key: value for key, value in result.items() if key != "seconds"}


def _assert_same(a, b):
    """Equal, NaN equal to NaN, recursively."""
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            _assert_same(a[key], b[key])
    elif isinstance(a, float) and math.isnan(a):
        assert isinstance(b, float) and math.isnan(b)
    else:
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    "q, p",
    [
        GAUSSIAN_PAIRS["schulman"],
        GAUSSIAN_PAIRS["near"],
        CATEGORICAL_PAIRS["small"],
        CATEGORICAL_PAIRS["zero_probability"],
    ],
)
def test_runs_and_gradients_are_identical_with_and_without_kernels(q, p, monkeypatch):
    n = 2 * 65536 + 777  # a partial last block
    values = _without_timing(run(q, p, "k1,k2,k3,k4,rev_k1,k3+", n=n, seed=9))
    grads = _without_timing(gradient(q, p, "k1,k3,rev_k1", n=n, seed=9))
    _array_code(monkeypatch)
    _assert_same(values, _without_timing(run(q, p, "k1,k2,k3,k4,rev_k1,k3+", n=n, seed=9)))
    _assert_same(grads, _without_timing(gradient(q, p, "k1,k3,rev_k1", n=n, seed=9)))


def test_kernels_apply_to_numpy_float64_only(monkeypatch):
    numpy = get_backend("numpy")
    assert compiled_kernels(numpy, np.float64) is kernels  # loaded in this process: always used
    assert compiled_kernels(numpy, np.float32) is None  # float32 draws stay NumPy's
    assert Stream(Gaussian(0, 1), Gaussian(1, 1), "k1", dtype="float32").draw([((0,), 10)]).kernels is None
    monkeypatch.setenv(KERNELS_ENV, "off")
    assert compiled_kernels(numpy, np.float64) is None


def test_a_fresh_process_loads_the_kernels_only_for_a_large_run():
    """Loading numba costs about a second: a short run (a CLI call) must not pay it, a large one does."""
    code = (
        "import sys\n"
        "from klsym.exact.families import Gaussian\n"
        "from klsym.simulate.driver import KERNELS_MIN_SAMPLES, Stream\n"
        "from klsym.simulate.montecarlo import run\n"
        "run(Gaussian(0, 1), Gaussian(1, 1), 'k1', n=1000)\n"
        "print('numba' in sys.modules)\n"
        "stream = Stream(Gaussian(0, 1), Gaussian(1, 1), 'k1')\n"
        "plan = stream.streaming_plan(KERNELS_MIN_SAMPLES)\n"
        "print(stream.draw(next(plan)).kernels is not None, 'numba' in sys.modules)\n"
    )
    env = {key: value for key, value in os.environ.items() if key != KERNELS_ENV}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.split() == ["False", "True", "True"]
