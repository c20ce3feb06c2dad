r"""Array backends for the Monte Carlo engine: NumPy (default) or CuPy (GPU).

A :class:`Backend` bundles the array module ``xp``, the random generator of one RNG block, the
transfer to host memory and the estimator functions compiled for that module. The choice is
``backend="cupy"`` or the environment variable ``KLSYM_BACKEND=cupy``; CuPy is imported only
then, and a clear error names the fix when it is missing.

>>> get_backend("numpy").name
'numpy'
>>> get_backend("torch")
Traceback (most recent call last):
...
ValueError: unknown backend 'torch'; choose one of: numpy, cupy
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from types import ModuleType

import numpy as np

from klsym.exact.plans import plan_of

#: Environment variable that selects the backend when none is passed.
BACKEND_ENV = "KLSYM_BACKEND"
BACKENDS = ("numpy", "cupy")
#: Samples per RNG block: block ``b`` is drawn from ``SeedSequence(seed, spawn_key=(b,))``, so
#: results depend on (seed, n) only, never on chunk size or thread count.
NUMPY_BLOCK = 1 << 16
#: On a GPU a block must fill the device; results there depend on (seed, n, backend).
CUPY_BLOCK = 1 << 24


class BackendUnavailableError(ValueError):
    """A backend was requested whose library (or device) is not available."""


@dataclass(frozen=True, eq=False)
class Backend:
    r"""An array module plus what the engine needs from it.

    Parameters
    ----------
    name : str
        ``"numpy"`` or ``"cupy"`` (tests may build one around NumPy under another name).
    xp : module
        The array module (``numpy``, ``cupy``).
    lambdify_module : str
        Module name given to :func:`sympy.lambdify` (:func:`klsym.derive.estimators.compile_logratio_function`)
        for any module but NumPy, whose functions come compiled with the estimator's plan.
    block_size : int
        Samples per RNG block.
    generator_factory : callable
        ``generator_factory(seed_sequence)`` returns a generator with ``standard_normal(size,
        dtype=...)`` and ``random(size, dtype=...)``.
    host : callable
        Copies an ``xp`` array to a NumPy array.
    """

    name: str
    xp: ModuleType
    lambdify_module: str
    block_size: int
    generator_factory: Callable
    host: Callable = np.asarray
    _compiled: dict = field(default_factory=dict, repr=False)

    def generator(self, seed: int, *key: int):
        r"""The generator of RNG block ``key`` (a path of spawn keys) under ``seed``.

        >>> b = get_backend("numpy")
        >>> float(b.generator(1, 0).random()) == float(b.generator(1, 0).random())
        True
        """
        return self.generator_factory(np.random.SeedSequence(seed, spawn_key=tuple(key)))

    def value_function(self, estimator) -> Callable:
        r"""Vectorised :math:`t \mapsto k(e^t)` for this backend.

        ``estimator`` is a plan (:mod:`klsym.exact.plans`), a built-in name or an
        :class:`~klsym.derive.estimators.Estimator`. On NumPy this is the plan's own function (generated code
        read from the cache: no SymPy once warm); other modules compile the plan's SymPy body for themselves.
        """
        return self._compile(estimator, "value")

    def derivative_function(self, estimator) -> Callable:
        r"""Vectorised :math:`t \mapsto \frac{d}{dt} k_{sur}(e^t)` for this backend (see :meth:`value_function`)."""
        return self._compile(estimator, "dt")

    def _compile(self, estimator, kind: str) -> Callable:
        plan = plan_of(estimator)
        reference = plan.numeric if kind == "value" else plan.numeric_dt
        if self.xp is np and self.lambdify_module == "numpy":
            return reference  # lambdify's NumPy code of the same body, cached: the same bits (test_plans)
        key = (plan, kind)
        if key not in self._compiled:
            from klsym.derive.estimators import compile_logratio_function

            # The SymPy body built by make_numeric does not depend on the array module.
            self._compiled[key] = compile_logratio_function(reference.expression, self.lambdify_module, xp=self.xp)
        return self._compiled[key]


def _numpy_generator(seed_sequence: np.random.SeedSequence) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(seed_sequence))


def integer_seeded(default_rng: Callable) -> Callable:
    """A generator factory for libraries seeded by one integer (CuPy): 64 bits of the SeedSequence."""

    def factory(seed_sequence: np.random.SeedSequence):
        return default_rng(int(seed_sequence.generate_state(1, np.uint64)[0]))

    return factory


def _cupy_backend() -> Backend:
    try:
        import cupy  # lazily: only a GPU run needs it

        cupy.cuda.runtime.getDeviceCount()
    except ImportError:
        raise BackendUnavailableError(
            "backend 'cupy' requested but CuPy is not installed; install it with "
            "pip install 'klsym[gpu]' (needs an NVIDIA GPU with CUDA 12)"
        ) from None
    except Exception as err:  # CUDA driver missing or no device
        raise BackendUnavailableError(f"backend 'cupy' requested but no CUDA device is usable: {err}") from None

    return Backend("cupy", cupy, "cupy", CUPY_BLOCK, integer_seeded(cupy.random.default_rng), cupy.asnumpy)


_BACKENDS: dict[str, Backend] = {}


def get_backend(name: str | Backend | None = None) -> Backend:
    r"""The backend called ``name``; ``None`` reads ``$KLSYM_BACKEND`` (default ``"numpy"``).

    Raises
    ------
    ValueError
        For an unknown name; :class:`BackendUnavailableError` when CuPy is requested but missing.
    """
    if isinstance(name, Backend):
        return name
    chosen = (name or os.environ.get(BACKEND_ENV) or "numpy").strip().lower()
    if chosen not in BACKENDS:
        raise ValueError(f"unknown backend {chosen!r}; choose one of: {', '.join(BACKENDS)}")
    if chosen not in _BACKENDS:
        _BACKENDS[chosen] = (
            Backend("numpy", np, "numpy", NUMPY_BLOCK, _numpy_generator) if chosen == "numpy" else _cupy_backend()
        )
    return _BACKENDS[chosen]


__all__ = [
    "Backend",
    "BackendUnavailableError",
    "BACKEND_ENV",
    "BACKENDS",
    "NUMPY_BLOCK",
    "CUPY_BLOCK",
    "get_backend",
    "integer_seeded",
]
