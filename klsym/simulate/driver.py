r"""The streaming driver: RNG blocks drawn on worker threads, statistics merged in block order.

Samples :math:`x \sim q` come in RNG blocks: block ``key`` (a path of spawn keys) of ``size`` samples is
drawn from ``SeedSequence(seed, spawn_key=key)``. The streaming plan uses keys ``(b,)`` with
:data:`klsym.simulate.backend.NUMPY_BLOCK` samples each; per-trial plans use ``(TRIALS_STREAM, i)``.
A worker draws a *chunk* (consecutive blocks of one size) as ``(rows, size)`` arrays, and every
accumulator (:mod:`klsym.simulate.accumulators`) reduces it to one partial result per block. The main
thread merges the partials in block order, so a result depends only on ``(seed, plan)``: not on how
many blocks a chunk holds nor on the number of threads. At most ``2 x threads`` chunks are in flight,
so memory does not depend on ``n``. On the NumPy backend in float64 the draws and the histogram of t run as
compiled kernels (:mod:`klsym.simulate.kernels`, numba) that give the array code's numbers bit for bit.
"""

from __future__ import annotations

import ctypes
import math
import os
import sys
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from klsym.derive.generated import TAYLOR_RADIUS, near_zero, sharing_calls
from klsym.derive.modes import MODES, gradient_weights
from klsym.derive.registry import split_names
from klsym.exact.families import Categorical, Gaussian, check_same_family, log_ratio
from klsym.exact.plans import plan_of
from klsym.simulate.accumulators import ValueSummary, feed, needs_samples
from klsym.simulate.backend import Backend, get_backend

DTYPES = {"float64": np.float64, "float32": np.float32}
#: Most samples one worker takes at once by default (rounded to whole RNG blocks): eight blocks, drawn and
#: histogrammed together, then reduced four blocks at a time (:func:`klsym.simulate.accumulators.feed`). Fewer
#: hand-offs a sample than one block: 15-25 % less time at 1e7 samples on 2 cores; more blocks gain nothing.
DEFAULT_CHUNK = 1 << 19
#: Chunks per worker thread the default plan keeps at least (where n allows), so that every thread has work.
CHUNKS_PER_THREAD = 4
#: First spawn key of the per-trial streams (streaming blocks use the 1-tuple ``(b,)``).
TRIALS_STREAM = 1


# --- samplers ----------------------------------------------------------------------------------


def _rows(xp, generators, draw):
    """``draw(generator)`` for each block's generator, as one (rows, size) array (no copy for one row)."""
    if len(generators) == 1:
        return draw(generators[0])[None]
    return xp.stack([draw(generator) for generator in generators])


#: ``KLSYM_KERNELS``: ``auto`` (default, see :func:`compiled_kernels`), ``on`` or ``off`` (the array code).
#: The results are the same bits either way; only the time differs.
KERNELS_ENV = "KLSYM_KERNELS"
#: Samples from which a run loads the compiled kernels itself: importing numba and loading its cached
#: code costs about 0.8 s once per process, and the kernels save about 15 ns of CPU per sample.
KERNELS_MIN_SAMPLES = 1 << 26


def compiled_kernels(backend: Backend, dtype, samples: int | None = None):
    """:mod:`klsym.simulate.kernels` where it applies (NumPy backend, float64, numba importable) and pays
    off, else None: with ``KLSYM_KERNELS=auto`` once a process has loaded them, or for a run of at least
    :data:`KERNELS_MIN_SAMPLES` samples (a short run in a fresh process, e.g. a CLI call, skips the load)."""
    if backend.name != "numpy" or backend.xp is not np or dtype is not np.float64:
        return None
    setting = os.environ.get(KERNELS_ENV, "auto").strip().lower()
    if setting in ("0", "off", "false", "no"):
        return None
    loaded = "klsym.simulate.kernels" in sys.modules
    if setting == "auto" and not loaded and (samples or 0) < KERNELS_MIN_SAMPLES:
        return None
    return load_kernels()


def load_kernels():
    """Import :mod:`klsym.simulate.kernels` and load its compiled code now (None without numba); afterwards
    every float64 NumPy run of this process uses them."""
    try:
        from klsym.simulate import kernels
    except ImportError:  # no numba wheel for this platform: the array code gives the same numbers
        return None
    kernels.warm_up()
    return kernels


class GaussianSampler:
    """Draws x = mu + sigma z from q and returns (t, x) as (rows, size) arrays; the score comes from the family."""

    categorical = False

    def __init__(self, q: Gaussian, p: Gaussian, backend: Backend, dtype):
        self.q, self.p, self.backend, self.dtype = q, p, backend, dtype
        self.param_names = q.param_names
        self.size = len(q.param_names)

    def draw(self, generators, size, kernels=None, keep_samples: bool = True):
        if kernels is not None:  # one compiled loop, the same bits as the array code below
            return kernels.gaussian_draw(generators, size, self.q, self.p, keep_samples)
        x = _rows(self.backend.xp, generators, lambda g: g.standard_normal(size, dtype=self.dtype))
        x *= self.q.sigma  # x = mu + sigma z in place; elementwise: the same bits as block by block
        x += self.q.mu
        return log_ratio(self.p, self.q, x), x

    def score(self, x):
        """Score as a contiguous (n_params, *x.shape) array."""
        xp = self.backend.xp
        return xp.ascontiguousarray(xp.moveaxis(xp.asarray(self.q.score(x)), -1, 0))


class CategoricalSampler:
    """Inverse-CDF sampling of token ids from a precomputed CDF (O(log V) per sample)."""

    categorical = True

    def __init__(self, q: Categorical, p: Categorical, backend: Backend, dtype):
        xp = backend.xp
        self.q, self.p, self.backend, self.dtype = q, p, backend, dtype
        self.param_names = None
        self.size = q.size
        self.probs = q.probs
        self.cdf = xp.asarray(np.cumsum(self.probs))
        self.last_token = int(np.flatnonzero(self.probs > 0)[-1])  # u past a rounded cdf[-1]
        self.table = xp.asarray((p.log_probs - q.log_probs).astype(dtype))

    def draw(self, generators, size, kernels=None, keep_samples: bool = True):
        if kernels is not None:
            return kernels.categorical_draw(generators, size, self.cdf, self.last_token, self.table)
        xp = self.backend.xp
        u = _rows(xp, generators, lambda g: g.random(size))
        tokens = xp.minimum(xp.searchsorted(self.cdf, u, side="right"), self.last_token)
        return self.table[tokens], tokens


def make_sampler(q, p, backend: Backend, dtype):
    check_same_family(q, p)
    if isinstance(q, Gaussian):
        return GaussianSampler(q, p, backend, dtype)
    if isinstance(q, Categorical):
        return CategoricalSampler(q, p, backend, dtype)
    raise ValueError(f"no Monte Carlo sampler for the family {type(q).__name__}")


# --- argument checks ---------------------------------------------------------------------------


def check_count(value, what: str) -> int:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a positive integer, got {value!r}") from None
    if not (math.isfinite(number) and number >= 1 and number == int(number)):
        raise ValueError(f"{what} must be a positive integer, got {value!r}")
    return int(number)


def check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    return int(seed)


def check_modes(modes) -> tuple[str, ...]:
    modes = tuple(m.strip() for m in modes.split(",")) if isinstance(modes, str) else tuple(modes)
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes:
        raise ValueError(f"unknown gradient mode(s) {unknown or modes}; choose from: {', '.join(MODES)}")
    return modes


# --- the stream: what is sampled, and the chunks it is cut into --------------------------------


class Stream:
    """One Monte Carlo experiment: the pair, the estimators (compiled for the backend) and the seed.

    ``estimators`` are names (``"k1,k3"`` or a list), :class:`~klsym.derive.estimators.Estimator` objects or
    plans; :attr:`estimators` holds their plans (:func:`klsym.exact.plans.plan_of`: ``name``, ``target``,
    the NumPy functions and the limits at t = -inf), so built-in names need no SymPy once the cache is warm.
    """

    def __init__(self, q, p, estimators, seed: int = 0, backend: str | Backend | None = None, dtype: str = "float64"):
        estimators = [plan_of(e) for e in (split_names(estimators) if isinstance(estimators, str) else estimators)]
        if not estimators:
            raise ValueError("no estimators given")
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; choose one of: {', '.join(DTYPES)}")
        self.q, self.p, self.estimators, self.dtype = q, p, estimators, dtype
        self.seed = check_seed(seed)
        self.backend = get_backend(backend)
        self.sampler = make_sampler(q, p, self.backend, DTYPES[dtype])
        self.values = [self.backend.value_function(e) for e in estimators]
        self.slopes = [self.backend.derivative_function(e) for e in estimators]
        self.samples: int | None = None  # how many the plan draws: whether loading the kernels pays

    @property
    def kernels(self):
        """:mod:`klsym.simulate.kernels` when this stream's chunks use them (see :func:`compiled_kernels`)."""
        return compiled_kernels(self.backend, self.sampler.dtype, self.samples)

    @property
    def xp(self):
        return self.backend.xp

    def streaming_plan(self, n: int, chunk: int | None = None):
        """Chunks of ``(key, size)``: full blocks grouped by ``chunk`` samples, a partial last block alone.
        By default up to :data:`DEFAULT_CHUNK`, and fewer where n is small, so that each core gets
        :data:`CHUNKS_PER_THREAD` chunks."""
        self.samples = n
        block = self.backend.block_size
        full, rest = divmod(n, block)
        if chunk is None:
            per_chunk = max(1, min(DEFAULT_CHUNK // block, full // (CHUNKS_PER_THREAD * default_threads())))
        else:
            per_chunk = max(1, chunk // block)
        for start in range(0, full, per_chunk):
            yield [((b,), block) for b in range(start, min(full, start + per_chunk))]
        if rest:
            yield [((full,), rest)]

    def trials_plan(self, n: int, trials: int, group: int):
        """Chunks of ``group`` trials, trial ``i`` being block ``(TRIALS_STREAM, i)`` of ``n`` samples."""
        self.samples = n * trials
        for first in range(0, trials, group):
            yield [((TRIALS_STREAM, i), n) for i in range(first, min(trials, first + group))]

    def draw(self, blocks, keep_samples: bool = True) -> Chunk:
        """The chunk of ``blocks``; without ``keep_samples`` its ``data`` may be ``None`` (values need only t)."""
        return Chunk(self, blocks, keep_samples)


class Chunk:
    """Consecutive RNG blocks of one size, drawn at once: ``t`` and ``data`` are (rows, size) arrays.

    Estimator values and gradient weights are computed once per chunk and shared by the accumulators.
    """

    def __init__(self, stream: Stream, blocks, keep_samples: bool = True):
        self.stream, self.blocks = stream, blocks
        self.sizes = [size for _, size in blocks]
        if len(set(self.sizes)) != 1:
            raise ValueError("a chunk holds RNG blocks of one size")
        #: :mod:`klsym.simulate.kernels` where they are used, else None (the array code runs)
        self.kernels = stream.kernels
        generators = [stream.backend.generator(stream.seed, *key) for key, _ in blocks]
        self.t, self.data = stream.sampler.draw(generators, self.sizes[0], self.kernels, keep_samples)
        self._clear_caches()

    def _clear_caches(self) -> None:
        """Nothing computed from the draws yet: values, weights, score, the Taylor index."""
        self._values: dict = {}
        self._weights: dict = {}
        self._shared_calls: dict = {}  # exp(t), expm1(t): computed once for every estimator (sharing_calls)
        self._summaries: dict = {}
        self._score = self._score_squared = self._near_zero = None
        #: batch size of the batch means that value summaries include (set by accumulators.feed)
        self.batch: int | None = None

    @property
    def rows(self) -> int:
        return len(self.blocks)

    def row_groups(self, rows: int) -> list:
        """The chunk's RNG blocks in groups of up to ``rows`` consecutive blocks, as chunks (views of this one's
        arrays)."""
        if self.rows <= rows:
            return [self]
        return [self._rows(start, min(start + rows, self.rows)) for start in range(0, self.rows, rows)]

    def _rows(self, start: int, stop: int) -> Chunk:
        view = object.__new__(Chunk)
        view.stream, view.blocks, view.sizes = self.stream, self.blocks[start:stop], self.sizes[start:stop]
        view.kernels, view.t = self.kernels, self.t[start:stop]
        view.data = None if self.data is None else self.data[start:stop]
        view._clear_caches()
        return view

    def near_zero(self):
        """Where |t| is below the Taylor radius (:func:`klsym.derive.generated.near_zero`): found once a chunk,
        when a function with a Taylor part first asks."""
        if self._near_zero is None:
            if self.kernels is not None:  # the same indices in one compiled pass
                self._near_zero = self.kernels.near_zero(self.t, TAYLOR_RADIUS)
            else:
                self._near_zero = near_zero(self.stream.xp, self.t)
        return self._near_zero

    def values(self, i: int):
        """Values k(e^t) of estimator ``i`` (one array per estimator: each stays in cache while it is reduced)."""
        if i not in self._values:
            with sharing_calls(self.t, self._shared_calls):
                self._values[i] = self.stream.values[i](self.t, self.near_zero)
        return self._values[i]

    def summary(self, i: int, batch: int | None = None) -> ValueSummary:
        """The :class:`~klsym.simulate.accumulators.ValueSummary` of estimator ``i``'s values (moments, extremes,
        means of batches of ``batch`` or :attr:`batch`), made once for every statistic that reads it."""
        summary = self._summaries.get(i)
        if summary is None or (batch is not None and summary.batch != batch):
            summary = ValueSummary(self.stream.xp, self.values(i), batch or self.batch, self.kernels)
            self._summaries[i] = summary
        return summary

    def weights(self, i: int, modes) -> dict:
        """Gradient weights of estimator ``i`` per mode (see :func:`klsym.derive.modes.gradient_weights`)."""
        missing = [m for m in modes if m not in self._weights.get(i, {})]
        if missing:
            values = self._values.get(i)
            shared = self.near_zero

            def value(t):
                return values if values is not None else self.stream.values[i](t, shared if t is self.t else None)

            def slope(t):
                return self.stream.slopes[i](t, shared if t is self.t else None)

            with sharing_calls(self.t, self._shared_calls):
                weights = gradient_weights(value, slope, self.t, missing)
            self._weights.setdefault(i, {}).update(weights)
        return self._weights[i]

    def forget(self, i: int) -> None:
        """Drop estimator ``i``'s values and weights (once every accumulator has them): the next estimator's
        arrays then reuse the same, cached, memory."""
        self._values.pop(i, None)
        self._weights.pop(i, None)
        self._summaries.pop(i, None)

    def score(self):
        """Gaussian score, (params, rows, size)."""
        if self._score is None:
            self._score = self.stream.sampler.score(self.data)
        return self._score

    def score_squared(self):
        """The score squared elementwise (for the gradients' second moments)."""
        if self._score_squared is None:
            score = self.score()
            self._score_squared = score * score
        return self._score_squared


# --- the driver --------------------------------------------------------------------------------

#: glibc ``mallopt`` settings (``M_MMAP_THRESHOLD``, ``M_TRIM_THRESHOLD``) applied once per process.
_MALLOC_SETTINGS = ((-3, 32 << 20), (-1, 128 << 20))
_malloc_tuned = False


def keep_freed_blocks() -> None:
    """Let glibc reuse freed block-sized arrays instead of returning them to the OS.

    By default glibc hands every freed array above 128 KiB back to the kernel and page-faults it in
    again on the next allocation: for the engine's 512 KiB temporaries that costs as much as the
    arithmetic. Arrays up to 32 MiB are now kept in the heap (at most 128 MiB of freed memory is held
    before trimming), so memory stays bounded and independent of ``n``. No effect outside glibc.
    """
    global _malloc_tuned
    if _malloc_tuned or not sys.platform.startswith("linux"):
        return
    _malloc_tuned = True
    try:
        libc = ctypes.CDLL("libc.so.6")
        for option, value in _MALLOC_SETTINGS:
            libc.mallopt(option, value)
    except (OSError, AttributeError):  # musl or another libc: keep its defaults
        pass


def _progress_bar(total: int | None):
    from tqdm import tqdm  # text bar: notebooks have no ipywidgets, and HTML reports keep text

    return tqdm(total=total, unit="sample", unit_scale=True, delay=2.0, leave=False)


class _NoBar:
    """The part of a tqdm bar the driver uses, for runs without one (importing tqdm takes ~70 ms of a CLI call)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        return False

    def update(self, count) -> None:
        pass


def default_threads() -> int:
    """Worker threads when none are asked for: one per core, at most 8."""
    return min(os.cpu_count() or 1, 8)


def stream_through(
    stream: Stream, plan, accumulators, threads: int | None = None, progress: bool = False, total: int | None = None
):
    """Feed every chunk of ``plan`` to fresh copies of ``accumulators`` on worker threads and merge them
    into ``accumulators`` in block order. Returns the accumulators."""
    keep_freed_blocks()

    def work(blocks):
        parts = [accumulator.empty() for accumulator in accumulators]
        feed(parts, stream.draw(blocks, needs_samples(accumulators)))
        return parts

    workers = max(1, threads or default_threads())
    bar = _progress_bar(total) if progress else _NoBar()
    with ThreadPoolExecutor(workers) as pool, bar:
        pending: deque = deque()

        def finish():
            blocks, future = pending.popleft()
            for accumulator, part in zip(accumulators, future.result()):
                accumulator.merge(part)
            bar.update(sum(size for _, size in blocks))

        for blocks in plan:
            pending.append((blocks, pool.submit(work, blocks)))
            while len(pending) > 2 * workers:  # bounded queue: memory independent of n
                finish()
        while pending:
            finish()
    return accumulators


__all__ = [
    "Stream",
    "Chunk",
    "stream_through",
    "make_sampler",
    "check_count",
    "check_seed",
    "check_modes",
    "DTYPES",
    "DEFAULT_CHUNK",
    "TRIALS_STREAM",
]
