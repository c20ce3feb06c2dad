"""Backends: selection, the CuPy error path, the CuPy code path run with NumPy behind it, compiled estimators."""

import sys
import types

import numpy as np
import pytest

from klsym.derive.estimators import BUILTINS, TAYLOR_RADIUS
from klsym.exact.expectations import estimator_stats
from klsym.exact.families import Gaussian
from klsym.simulate import backend as backend_module
from klsym.simulate.backend import BACKEND_ENV, Backend, BackendUnavailableError, get_backend, integer_seeded
from klsym.simulate.montecarlo import run

# t values straddling the Taylor radius, zero, moderate and extreme log-ratios
T_GRID = np.concatenate(
    [np.linspace(-2 * TAYLOR_RADIUS, 2 * TAYLOR_RADIUS, 41), [0.0, -5.0, -1.0, 0.3, 3.0, 40.0], [-700.0, 700.0]]
)


def test_default_is_numpy(monkeypatch):
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    assert get_backend().xp is np


def test_environment_selects_backend(monkeypatch):
    monkeypatch.setenv(BACKEND_ENV, "NumPy")
    assert get_backend().name == "numpy"
    monkeypatch.setenv(BACKEND_ENV, "jax")
    with pytest.raises(ValueError, match="unknown backend 'jax'"):
        get_backend()


@pytest.fixture
def no_cached_cupy(monkeypatch):
    monkeypatch.setattr(backend_module, "_BACKENDS", {})


def test_missing_cupy_is_one_clear_error(monkeypatch, no_cached_cupy):
    monkeypatch.setitem(sys.modules, "cupy", None)  # makes `import cupy` raise ImportError
    with pytest.raises(BackendUnavailableError, match=r"CuPy is not installed.*pip install 'klsym\[gpu\]'"):
        get_backend("cupy")
    monkeypatch.setenv(BACKEND_ENV, "cupy")
    with pytest.raises(BackendUnavailableError, match="CuPy is not installed"):
        get_backend()


def _fake_cupy(device_count=1):
    """A module named cupy that is NumPy underneath: runs the CuPy code path without a GPU."""
    fake = types.ModuleType("cupy")
    fake.__getattr__ = lambda name: getattr(np, name)

    def count():
        if not device_count:
            raise RuntimeError("cudaErrorNoDevice: no CUDA-capable device is detected")
        return device_count

    fake.cuda = types.SimpleNamespace(runtime=types.SimpleNamespace(getDeviceCount=count))
    fake.random = types.SimpleNamespace(default_rng=np.random.default_rng)
    fake.asnumpy = np.asarray
    return fake


def test_cupy_without_device_is_one_clear_error(monkeypatch, no_cached_cupy):
    monkeypatch.setitem(sys.modules, "cupy", _fake_cupy(device_count=0))
    with pytest.raises(BackendUnavailableError, match="no CUDA device is usable: cudaErrorNoDevice"):
        get_backend("cupy")


def test_cupy_code_path_with_numpy_behind_it(monkeypatch, no_cached_cupy):
    monkeypatch.setitem(sys.modules, "cupy", _fake_cupy())
    fake = get_backend("cupy")
    assert fake.name == "cupy" and fake.lambdify_module == "cupy"
    # a small block so the run spans several blocks and a partial one
    small = Backend("cupy", fake.xp, "cupy", 1 << 12, fake.generator_factory, fake.host)
    q, p, n = Gaussian(0.0, 1.0), Gaussian(0.4, 1.1), 30_001
    result = run(q, p, "k1,k3,k4", n=n, seed=5, backend=small)
    for name, entry in result["estimators"].items():
        exact = estimator_stats(name, q, p)
        assert abs(entry["mean"] - exact["mean"]) < 5 * exact["std"] / np.sqrt(n), name


def test_compiled_function_keeps_float32():
    k3 = BUILTINS["k3"]
    compiled = get_backend("numpy").value_function(k3)
    assert compiled(np.array([1e-4, 0.5], dtype=np.float32)).dtype == np.float32


def test_block_generators_are_independent_and_reproducible():
    numpy_backend = get_backend("numpy")
    first = numpy_backend.generator(3, 0).standard_normal(8)
    np.testing.assert_array_equal(first, numpy_backend.generator(3, 0).standard_normal(8))
    assert not np.array_equal(first, numpy_backend.generator(3, 1).standard_normal(8))
    assert not np.array_equal(first, numpy_backend.generator(4, 0).standard_normal(8))


def test_integer_seeded_factory_uses_the_seed_sequence():
    factory = integer_seeded(np.random.default_rng)
    a = factory(np.random.SeedSequence(1, spawn_key=(0,))).random(4)
    b = factory(np.random.SeedSequence(1, spawn_key=(1,))).random(4)
    assert not np.array_equal(a, b)
    np.testing.assert_array_equal(a, factory(np.random.SeedSequence(1, spawn_key=(0,))).random(4))
