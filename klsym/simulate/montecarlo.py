r"""Streaming Monte Carlo for KL estimators: values, batch spread and gradients, in constant memory.

Samples :math:`x \sim q` are drawn in fixed RNG blocks (:data:`klsym.simulate.backend.NUMPY_BLOCK` samples;
block ``b`` from ``SeedSequence(seed, spawn_key=(b,))``), turned into log-ratios
:math:`t = \log p(x) - \log q(x)` and into estimator values through the registry's own SymPy
expressions (:meth:`klsym.derive.estimators.Estimator.numeric` and ``numeric_dt``). Each block is reduced
to a few numbers (count, mean, sum of squared deviations) and the blocks are merged in block order
(Chan et al.'s pairwise update), so every result depends only on ``(seed, n)``: not on ``chunk``
(how many blocks one worker takes at once), nor on the number of threads. Memory is a few chunks,
whatever ``n``.

Quantiles (of the finite values) are read from a fixed histogram whose bins are the float32
numbers with their mantissa cut to 7 bits: a quantile is exact up to the width of one bin, a relative error of at most
:math:`2^{-7} \approx 0.8\%` (linear interpolation inside the bin usually does better) for
:math:`10^{-38} < |k| < 3 \cdot 10^{38}`; values closer to zero than that are resolved only to
:math:`10^{-38}`, larger ones fall in the ``inf`` bin.

Gradient modes (score :math:`s = \nabla_\theta \log q_\theta(x)`, samples held fixed):
``loss`` averages :math:`-\frac{d k_{sur}}{dt}(t)\, s`, ``reward`` averages :math:`k(e^t)\, s`,
``full`` is their sum.

>>> from klsym.exact.families import Gaussian
>>> result = run(Gaussian(0, 1), Gaussian(1, 1), "k1,k3", n=10_000, seed=0)
>>> result["estimators"]["k3"]["frac_negative"]
0.0
>>> abs(result["estimators"]["k1"]["mean"] - 0.5) < 5 * result["estimators"]["k1"]["se"]
True
"""
from __future__ import annotations

import math
import os
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from klsym.simulate.backend import Backend, get_backend
from klsym.derive.estimators import Estimator, get_estimators
from klsym.exact.families import Categorical, Gaussian, check_same_family, log_ratio

DTYPES = {"float64": np.float64, "float32": np.float32}
GRADIENT_MODES = ("loss", "reward", "full")
DEFAULT_QUANTILES = (0.01, 0.05, 0.5, 0.95, 0.99)
#: Samples in one batch of the batch statistics (what one RL step averages over).
DEFAULT_BATCH = 1024
#: Samples one worker processes at once (rounded to whole RNG blocks); one block keeps arrays in cache.
DEFAULT_CHUNK = 1 << 16
#: First spawn key of the per-trial streams (streaming blocks use the 1-tuple ``(b,)``).
TRIALS_STREAM = 1
#: Largest trials x V array :func:`gradient_trials` returns for a categorical sampler.
MAX_TRIAL_ENTRIES = 1 << 24

_HIST_BITS = 16  # float32 bits kept: sign, 8 exponent bits, 7 mantissa bits
_HIST_SHIFT = 32 - _HIST_BITS
_HIST_BINS = 1 << _HIST_BITS


# --- samplers ----------------------------------------------------------------------------------

class _GaussianSampler:
    """Draws x = mu + sigma z from q and returns (t, x); the score comes from the family."""

    def __init__(self, q: Gaussian, p: Gaussian, backend: Backend, dtype):
        self.q, self.p, self.backend, self.dtype = q, p, backend, dtype
        self.param_names = q.param_names
        self.size = len(q.param_names)

    def draw(self, generator, size):
        z = generator.standard_normal(size, dtype=self.dtype)
        x = self.q.mu + self.q.sigma * z
        return log_ratio(self.p, self.q, x), x

    def score(self, x):
        """Score as a contiguous (n_params, *x.shape) array."""
        xp = self.backend.xp
        return xp.ascontiguousarray(xp.moveaxis(xp.asarray(self.q.score(x)), -1, 0))


class _CategoricalSampler:
    """Inverse-CDF sampling of token ids from a precomputed CDF (O(log V) per sample)."""

    def __init__(self, q: Categorical, p: Categorical, backend: Backend, dtype):
        xp = backend.xp
        self.q, self.p, self.backend, self.dtype = q, p, backend, dtype
        self.param_names = None
        self.size = q.size
        self.probs = q.probs
        self.cdf = xp.asarray(np.cumsum(self.probs))
        self.last_token = int(np.flatnonzero(self.probs > 0)[-1])  # u past a rounded cdf[-1]
        self.table = xp.asarray((p.log_probs - q.log_probs).astype(dtype))

    def draw(self, generator, size):
        xp = self.backend.xp
        u = generator.random(size)
        tokens = xp.minimum(xp.searchsorted(self.cdf, u, side="right"), self.last_token)
        return self.table[tokens], tokens


def _make_sampler(q, p, backend: Backend, dtype):
    check_same_family(q, p)
    if isinstance(q, Gaussian):
        return _GaussianSampler(q, p, backend, dtype)
    if isinstance(q, Categorical):
        return _CategoricalSampler(q, p, backend, dtype)
    raise ValueError(f"no Monte Carlo sampler for the family {type(q).__name__}")


# --- block plan and the streaming loop ---------------------------------------------------------

def _check_count(value, what: str) -> int:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a positive integer, got {value!r}") from None
    if not (math.isfinite(number) and number >= 1 and number == int(number)):
        raise ValueError(f"{what} must be a positive integer, got {value!r}")
    return int(number)


def _check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    return int(seed)


def _chunks(n: int, block: int, chunk: int):
    """Lists of (block index, block size); full blocks grouped by chunk, a partial last block alone."""
    per_chunk = max(1, chunk // block)
    full, rest = divmod(n, block)
    for start in range(0, full, per_chunk):
        yield [(b, block) for b in range(start, min(full, start + per_chunk))]
    if rest:
        yield [(full, rest)]


def _draw_rows(sampler, backend: Backend, seed: int, blocks):
    """Log-ratios (and score data) of the given blocks as (n_blocks, block_size) arrays."""
    xp = backend.xp
    drawn = [sampler.draw(backend.generator(seed, b), size) for b, size in blocks]
    return xp.stack([d[0] for d in drawn]), xp.stack([d[1] for d in drawn])


def _stream(work, merge, n: int, seed: int, backend: Backend, chunk: int, threads: int | None,
            progress: bool) -> None:
    """Run ``work(blocks)`` on worker threads, ``merge(blocks, result)`` in block order."""
    from tqdm import tqdm  # text bar: notebooks have no ipywidgets, and HTML reports keep text

    workers = max(1, threads or min(os.cpu_count() or 1, 8))
    bar = tqdm(total=n, unit="sample", unit_scale=True, delay=2.0, disable=not progress, leave=False)
    with ThreadPoolExecutor(workers) as pool, bar:
        pending = deque()
        for blocks in _chunks(n, backend.block_size, chunk):
            pending.append((blocks, pool.submit(work, blocks)))
            while len(pending) > 2 * workers:  # bounded queue: memory independent of n
                _finish(pending.popleft(), merge, bar)
        while pending:
            _finish(pending.popleft(), merge, bar)


def _finish(item, merge, bar) -> None:
    blocks, future = item
    merge(blocks, future.result())
    bar.update(sum(size for _, size in blocks))


class _Moments:
    """Count, mean and sum of squared deviations, merged block by block (Chan et al. 1979)."""

    def __init__(self, width: int):
        self.count = 0.0
        self.mean = np.zeros(width)
        self.m2 = np.zeros(width)

    def merge(self, counts, means, m2s) -> None:
        """Merge blocks in order; ``means``/``m2s`` are (n_blocks, width), ``counts`` (n_blocks,)."""
        for count, mean, m2 in zip(counts, means, m2s):
            if count == 0:
                continue
            total = self.count + count
            delta = mean - self.mean
            self.mean = self.mean + delta * (count / total)
            self.m2 = self.m2 + m2 + delta * delta * (self.count * count / total)
            self.count = total

    def std(self) -> np.ndarray:
        return np.sqrt(self.m2 / max(self.count - 1.0, 1.0))


def _block_moments(xp, values):
    """Per-row (count, mean, M2) of a (rows, size) array, accumulated in float64."""
    size = values.shape[-1]
    means = values.sum(axis=-1, dtype=xp.float64) / size
    deviations = values - means[..., None]
    # a pairwise sum per row: the same bits whatever the number of rows (einsum's are not)
    return means, (deviations * deviations).sum(axis=-1)


def _histogram_keys(xp, values):
    """Monotone bin index of each value: its float32 bit pattern cut to ``_HIST_BITS`` bits."""
    with np.errstate(over="ignore"):
        bits = values.astype(xp.float32).view(xp.int32)
    monotone = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # negative floats: reverse the magnitude order
    return ((monotone >> _HIST_SHIFT) + _HIST_BINS // 2).ravel()


def _bin_edges(key: int) -> tuple[float, float]:
    monotone = np.array([(key - _HIST_BINS // 2) << _HIST_SHIFT,
                         ((key - _HIST_BINS // 2 + 1) << _HIST_SHIFT) - 1], dtype=np.int64)
    monotone = monotone.astype(np.int32)
    bits = monotone ^ ((monotone >> 31) & 0x7FFFFFFF)
    low, high = bits.view(np.float32).astype(np.float64)
    return (float(low), float(high)) if low <= high else (float(high), float(low))


def _quantiles_from_histogram(counts: np.ndarray, levels) -> dict:
    cumulative = np.cumsum(counts)
    total = cumulative[-1] if cumulative.size else 0
    out = {}
    for level in levels:
        if total == 0:
            out[str(level)] = float("nan")
            continue
        target = level * total
        key = int(np.searchsorted(cumulative, max(target, 1e-12), side="left"))
        below = cumulative[key - 1] if key else 0
        low, high = _bin_edges(key)
        if not (math.isfinite(low) and math.isfinite(high)):
            out[str(level)] = low if math.isfinite(low) or low == high else high
            continue
        inside = (target - below) / counts[key] if counts[key] else 0.5
        out[str(level)] = float(low + (high - low) * min(max(float(inside), 0.0), 1.0))
    return out


# --- values ------------------------------------------------------------------------------------

def _resolve(q, p, estimators, n, seed, backend, dtype):
    estimators = get_estimators(estimators) if isinstance(estimators, str) else [
        e if isinstance(e, Estimator) else get_estimators([e])[0] for e in estimators]
    if not estimators:
        raise ValueError("no estimators given")
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of: {', '.join(DTYPES)}")
    backend = get_backend(backend)
    return (estimators, _check_count(n, "n"), _check_seed(seed), backend,
            _make_sampler(q, p, backend, DTYPES[dtype]))


def run(q, p, estimators="k1,k2,k3", n: int = 1_000_000, seed: int = 0, *, chunk: int = DEFAULT_CHUNK,
        backend: str | Backend | None = None, dtype: str = "float64", quantiles=DEFAULT_QUANTILES,
        batch_size: int | None = DEFAULT_BATCH, threads: int | None = None, progress: bool = False,
        square_moments: bool = False) -> dict:
    r"""Stream ``n`` samples of ``x ~ q`` and summarise each estimator :math:`k(r(x))`.

    Parameters
    ----------
    q, p : klsym.exact.families.Gaussian or klsym.exact.families.Categorical
        The sampler and the reference (same family).
    estimators : str or list
        Names (``"k1,k3"``) or :class:`~klsym.derive.estimators.Estimator` objects.
    n, seed : int
        Sample size and seed; the result depends only on these (and the backend).
    chunk : int
        Samples a worker processes at once, rounded to whole RNG blocks; does not change results.
    backend : str, optional
        ``"numpy"`` or ``"cupy"``; default ``$KLSYM_BACKEND`` or NumPy.
    dtype : {"float64", "float32"}
        Precision of samples, log-ratios and estimator values (sums are always float64).
    quantiles : sequence of float
        Levels of the approximate quantiles (see the module notes); empty to skip the histogram.
    batch_size : int or None
        Size B of the batches whose mean's spread is reported (consecutive samples inside an RNG
        block; a block's incomplete last batch is left out); ``None`` to skip.
    threads : int, optional
        Worker threads (default: all cores); does not change results.
    progress : bool
        Show a tqdm bar when the run takes more than two seconds.
    square_moments : bool
        Also report ``square: {mean, se}`` of :math:`k^2` (to check :math:`\mathbb{E}_q[k^2]`).

    Returns
    -------
    dict
        ``n, seed, seconds, backend, dtype, block_size`` and ``estimators: {name: {target, mean,
        std, se, min, max, frac_negative, n_nonfinite, quantiles, batch}}``.

    Examples
    --------
    >>> from klsym.exact.families import Gaussian
    >>> out = run(Gaussian(0, 1), Gaussian(0.1, 1), "k1", n=1000, seed=1, quantiles=(0.5,))
    >>> sorted(out["estimators"]["k1"])
    ['batch', 'frac_negative', 'max', 'mean', 'min', 'n_nonfinite', 'quantiles', 'se', 'std', 'target']
    """
    estimators, n, seed, backend, sampler = _resolve(q, p, estimators, n, seed, backend, dtype)
    xp, width = backend.xp, len(estimators)
    functions = [backend.value_function(e) for e in estimators]
    levels = tuple(float(level) for level in quantiles or ())
    if any(not 0.0 <= level <= 1.0 for level in levels):
        raise ValueError(f"quantile levels must lie in [0, 1], got {levels}")
    if batch_size is not None:
        batch_size = _check_count(batch_size, "batch_size")
        if batch_size > backend.block_size:
            raise ValueError(f"batch_size must be at most the RNG block size {backend.block_size}")

    def work(blocks):
        t, _ = _draw_rows(sampler, backend, seed, blocks)
        out = {"means": [], "m2s": [], "min": [], "max": [], "negative": [], "nonfinite": [],
               "hist": [], "batch_means": [], "batch_m2s": [], "batch_negative": [], "sq_means": [],
               "sq_m2s": []}
        for function in functions:
            values = function(t)
            means, m2s = _block_moments(xp, values)
            # A finite block sum means every value is finite: skip the isfinite pass.
            finite = None if bool(xp.isfinite(means).all()) else xp.isfinite(values)
            out["means"].append(means)
            out["m2s"].append(m2s)
            if square_moments:
                for key, value in zip(("sq_means", "sq_m2s"), _block_moments(xp, values * values)):
                    out[key].append(value)
            out["min"].append(values.min())
            out["max"].append(values.max())
            out["negative"].append(xp.count_nonzero(values < 0))
            out["nonfinite"].append(xp.asarray(0) if finite is None else values.size - finite.sum())
            if levels:
                keys = _histogram_keys(xp, values if finite is None else values[finite])
                out["hist"].append(xp.bincount(keys, minlength=_HIST_BINS))
            if batch_size is not None:
                per_block = values.shape[1] // batch_size
                batches = values[:, :per_block * batch_size].reshape(len(blocks), per_block, batch_size)
                batch_values = batches.mean(axis=-1, dtype=xp.float64)
                if per_block:
                    batch_means, batch_m2s = _block_moments(xp, batch_values)
                else:
                    batch_means = batch_m2s = xp.zeros(len(blocks))
                out["batch_means"].append(batch_means)
                out["batch_m2s"].append(batch_m2s)
                out["batch_negative"].append((batch_values < 0).sum())
        return {key: backend.host(xp.stack(value)) if value else None for key, value in out.items()}

    moments, batch_moments, square = _Moments(width), _Moments(width), _Moments(width)
    totals = {"min": np.full(width, np.inf), "max": np.full(width, -np.inf), "negative": np.zeros(width),
              "nonfinite": np.zeros(width), "batch_negative": np.zeros(width),
              "hist": np.zeros((width, _HIST_BINS), dtype=np.int64)}

    def merge(blocks, out):
        sizes = [size for _, size in blocks]
        moments.merge(sizes, out["means"].T, out["m2s"].T)
        if square_moments:
            square.merge(sizes, out["sq_means"].T, out["sq_m2s"].T)
        totals["min"] = np.minimum(totals["min"], out["min"])
        totals["max"] = np.maximum(totals["max"], out["max"])
        for key in ("negative", "nonfinite"):
            totals[key] += out[key]
        if levels:
            totals["hist"] += out["hist"]
        if batch_size is not None:
            batch_moments.merge([size // batch_size for size in sizes], out["batch_means"].T,
                                out["batch_m2s"].T)
            totals["batch_negative"] += out["batch_negative"]

    started = time.perf_counter()
    _stream(work, merge, n, seed, backend, chunk, threads, progress)
    seconds = time.perf_counter() - started
    std = moments.std()
    results = {}
    for i, estimator in enumerate(estimators):
        entry = {
            "target": estimator.target,
            "mean": float(moments.mean[i]), "std": float(std[i]), "se": float(std[i] / math.sqrt(n)),
            "min": float(totals["min"][i]), "max": float(totals["max"][i]),
            "frac_negative": float(totals["negative"][i] / n), "n_nonfinite": int(totals["nonfinite"][i]),
            "quantiles": _quantiles_from_histogram(totals["hist"][i], levels) if levels else {},
            "batch": None,
        }
        if batch_size is not None and batch_moments.count:
            entry["batch"] = {"size": batch_size, "count": int(batch_moments.count),
                              "mean_std": float(batch_moments.std()[i]),
                              "frac_negative": float(totals["batch_negative"][i] / batch_moments.count)}
        if square_moments:
            entry["square"] = {"mean": float(square.mean[i]), "se": float(square.std()[i] / math.sqrt(n))}
        results[estimator.name] = entry
    return {"n": n, "seed": seed, "seconds": seconds, "backend": backend.name, "dtype": dtype,
            "block_size": backend.block_size, "estimators": results}


# --- gradients ---------------------------------------------------------------------------------

def _check_modes(modes) -> tuple[str, ...]:
    modes = tuple(m.strip() for m in modes.split(",")) if isinstance(modes, str) else tuple(modes)
    unknown = [m for m in modes if m not in GRADIENT_MODES]
    if unknown or not modes:
        raise ValueError(f"unknown gradient mode(s) {unknown or modes}; choose from: {', '.join(GRADIENT_MODES)}")
    return modes


def _mode_weights(backend: Backend, estimators, modes):
    """Per (estimator, mode), a function t -> w(t) with per-sample gradient w(t) * score."""
    plans = []
    for estimator in estimators:
        value, slope = backend.value_function(estimator), backend.derivative_function(estimator)
        for mode in modes:
            plans.append((estimator.name, mode, value, slope))

    def weights(t):
        """Yield w(t) label by label (one estimator's loss/reward weights kept at a time)."""
        cache: dict = {}
        for name, mode, value, slope in plans:
            if cache.get("name") != name:
                cache = {"name": name}
            if mode in ("loss", "full") and "loss" not in cache:
                cache["loss"] = -slope(t)
            if mode in ("reward", "full") and "reward" not in cache:
                cache["reward"] = value(t)
            yield cache[mode] if mode != "full" else cache["loss"] + cache["reward"]

    return [(name, mode) for name, mode, _, _ in plans], weights


def gradient(q, p, estimators="k1,k2,k3", n: int = 1_000_000, seed: int = 0, *, modes=GRADIENT_MODES,
             chunk: int = DEFAULT_CHUNK, backend: str | Backend | None = None, dtype: str = "float64",
             threads: int | None = None, progress: bool = False) -> dict:
    r"""Monte Carlo gradients w.r.t. q's parameters, per estimator and mode, with standard errors.

    The per-sample gradient is :math:`w(t)\, s(x)` with :math:`w = -\frac{d k_{sur}}{dt}` (``loss``),
    :math:`w = k` (``reward``) or their sum (``full``). For a categorical q the score w.r.t. the
    logits is :math:`e_x - q`, accumulated with ``bincount`` per block (no n x V matrix).

    Returns
    -------
    dict
        ``n, seed, seconds, backend, dtype, params`` (names, or the vocabulary size) and
        ``gradients: {name: {mode: {"mean": ndarray, "se": ndarray}}}``.

    Examples
    --------
    >>> from klsym.exact.families import Gaussian
    >>> g = gradient(Gaussian(0, 1), Gaussian(1, 1), "k1", n=20_000, seed=0, modes="loss")
    >>> g["gradients"]["k1"]["loss"]["mean"].shape       # E[-(-1) s] = E[s] = 0 for k1
    (2,)
    """
    estimators, n, seed, backend, sampler = _resolve(q, p, estimators, n, seed, backend, dtype)
    modes = _check_modes(modes)
    xp = backend.xp
    labels, weights = _mode_weights(backend, estimators, modes)
    categorical = isinstance(sampler, _CategoricalSampler)
    width = sampler.size
    sums = np.zeros((len(labels), width))
    squares = np.zeros((len(labels), width))
    weight_sums = np.zeros((len(labels), 2))  # categorical: sum w, sum w^2

    def work(blocks):
        t, data = _draw_rows(sampler, backend, seed, blocks)
        if not categorical:
            score = sampler.score(data)  # (params, rows, size)
            score_squared = score * score
            firsts, seconds_ = [], []
            for w in weights(t):  # sums over each block of w s and (w s)^2, one block at a time so
                squared = w * w     # that the bits do not depend on how many blocks a task holds
                firsts.append(xp.stack([xp.einsum("n,pn->p", w[row], score[:, row], dtype=xp.float64)
                                        for row in range(len(blocks))], axis=-1))
                seconds_.append(xp.stack([xp.einsum("n,pn->p", squared[row], score_squared[:, row],
                                                    dtype=xp.float64) for row in range(len(blocks))], axis=-1))
            return backend.host(xp.stack(firsts)), backend.host(xp.stack(seconds_))
        ws = xp.stack(list(weights(t)))  # (labels, rows, size); categorical runs are small
        per_block = []
        for row in range(len(blocks)):
            tokens, inverse = xp.unique(data[row], return_inverse=True)
            w = ws[:, row].astype(xp.float64)
            s1 = xp.stack([xp.bincount(inverse, weights=wi, minlength=tokens.size) for wi in w])
            s2 = xp.stack([xp.bincount(inverse, weights=wi * wi, minlength=tokens.size) for wi in w])
            per_block.append(tuple(backend.host(a) for a in (tokens, s1, s2, w.sum(axis=-1), (w * w).sum(axis=-1))))
        return per_block

    def merge(blocks, out):
        nonlocal sums, squares
        if not categorical:
            for row in range(len(blocks)):  # block order: same sums whatever the chunk
                sums += out[0][:, :, row]
                squares += out[1][:, :, row]
            return
        for tokens, s1, s2, w1, w2 in out:
            sums[:, tokens] += s1
            squares[:, tokens] += s2
            weight_sums[:, 0] += w1
            weight_sums[:, 1] += w2

    started = time.perf_counter()
    _stream(work, merge, n, seed, backend, chunk, threads, progress)
    seconds = time.perf_counter() - started
    if categorical:
        probs = sampler.probs
        means = (sums - probs * weight_sums[:, :1]) / n
        second = ((1.0 - 2.0 * probs) * squares + probs * probs * weight_sums[:, 1:]) / n
    else:
        means, second = sums / n, squares / n
    variance = np.maximum(second - means * means, 0.0) * (n / max(n - 1, 1))
    se = np.sqrt(variance / n)
    out: dict = {}
    for i, (name, mode) in enumerate(labels):
        out.setdefault(name, {})[mode] = {"mean": means[i], "se": se[i]}
    return {"n": n, "seed": seed, "seconds": seconds, "backend": backend.name, "dtype": dtype,
            "params": sampler.param_names or sampler.size, "gradients": out}


def gradient_trials(q, p, estimators="k1,k2,k3", n: int = 50_000, trials: int = 1000, seed: int = 0, *,
                    modes=GRADIENT_MODES, backend: str | Backend | None = None, dtype: str = "float64",
                    threads: int | None = None, progress: bool = False) -> dict:
    r"""Independent gradient estimates, one per trial of ``n`` samples (Yang's violin plots).

    Trial ``i`` draws from ``SeedSequence(seed, spawn_key=(1, i))``; trials are processed in
    groups as (trials, n) arrays, so 1000 trials of 50 000 samples take seconds.

    Returns
    -------
    dict
        ``n, trials, seed, seconds, params`` and ``gradients: {name: {mode: ndarray (trials,
        n_params or V)}}``.

    Examples
    --------
    >>> from klsym.exact.families import Gaussian
    >>> out = gradient_trials(Gaussian(0, 1), Gaussian(1, 1.1), "k3", n=500, trials=4, seed=0)
    >>> out["gradients"]["k3"]["full"].shape
    (4, 2)
    """
    estimators, n, seed, backend, sampler = _resolve(q, p, estimators, n, seed, backend, dtype)
    trials = _check_count(trials, "trials")
    modes = _check_modes(modes)
    xp = backend.xp
    categorical = isinstance(sampler, _CategoricalSampler)
    width = sampler.size
    if categorical and trials * width > MAX_TRIAL_ENTRIES:
        raise ValueError(f"trials x V = {trials * width} exceeds {MAX_TRIAL_ENTRIES}; use fewer trials "
                         "or the streaming gradient()")
    labels, weights = _mode_weights(backend, estimators, modes)
    group = max(1, min(trials, (1 << 17) // n))  # trials per task: arrays of ~1 MiB stay in cache
    result = np.zeros((len(labels), trials, width))

    def work(first):
        rows = range(first, min(trials, first + group))
        drawn = [sampler.draw(backend.generator(seed, TRIALS_STREAM, i), n) for i in rows]
        t, data = xp.stack([d[0] for d in drawn]), xp.stack([d[1] for d in drawn])
        if not categorical:
            score = sampler.score(data)  # (params, rows, n)
            means = [xp.einsum("rn,prn->rp", w, score, dtype=xp.float64) / n for w in weights(t)]
            return backend.host(xp.stack(means))
        offsets = data + (xp.arange(len(rows))[:, None] * width)
        probs = xp.asarray(sampler.probs)
        out = []
        for w in weights(t):
            w = w.astype(xp.float64)
            counts = xp.bincount(offsets.ravel(), weights=w.ravel(), minlength=len(rows) * width)
            out.append((counts.reshape(len(rows), width) - w.sum(axis=-1)[:, None] * probs) / n)
        return backend.host(xp.stack(out))

    started = time.perf_counter()
    workers = max(1, threads or min(os.cpu_count() or 1, 8))
    with ThreadPoolExecutor(workers) as pool:
        for first, part in zip(range(0, trials, group), pool.map(work, range(0, trials, group))):
            result[:, first:first + part.shape[1]] = part
    seconds = time.perf_counter() - started
    out: dict = {}
    for i, (name, mode) in enumerate(labels):
        out.setdefault(name, {})[mode] = result[i]
    return {"n": n, "trials": trials, "seed": seed, "seconds": seconds, "backend": backend.name,
            "dtype": dtype, "params": sampler.param_names or sampler.size, "gradients": out}


__all__ = ["run", "gradient", "gradient_trials", "crosscheck", "DTYPES", "GRADIENT_MODES", "DEFAULT_QUANTILES",
           "DEFAULT_BATCH", "DEFAULT_CHUNK"]


# --- cross-check against the exact layer -------------------------------------------------------

def _z(estimate, exact, se):
    """z-score; 0 where estimate and exact agree exactly with zero spread, inf where they do not."""
    estimate, exact, se = (np.asarray(a, dtype=np.float64) for a in (estimate, exact, se))
    with np.errstate(divide="ignore", invalid="ignore"):
        z = (estimate - exact) / se
    return np.where((se == 0) & (estimate == exact), 0.0, z)


def crosscheck(q, p, estimators="k1,k2,k3", n: int = 200_000, seed: int = 0, *, modes=(),
               z_limit: float = 5.0, **options) -> dict:
    r"""z-scores of Monte Carlo means (and second moments, gradients) against :mod:`klsym.exact.expectations`.

    The mean's z uses the exact standard error :math:`\sqrt{\mathrm{Var}_q[k]/n}`; where
    :math:`\mathbb{E}_q[k^2] = \infty` the estimator is flagged ``infinite_variance`` (the sample
    mean converges, slowly, but has no CLT error bar), its z uses the sample standard error and is
    not counted in ``passed``. Second moments are compared where finite, with the sample standard
    error of :math:`k^2` (meaningful only when :math:`\mathbb{E}_q[k^4] < \infty`, so reported, not
    counted). Gradients (``modes``) use the sample standard error of the per-sample gradient.

    Returns
    -------
    dict
        ``n, seed, z_limit, passed, max_abs_z`` and per estimator ``mean``, ``second_moment``,
        ``infinite_variance``, ``gradients: {mode: {mc, exact, se, z}}``.

    Examples
    --------
    >>> from klsym.exact.families import Gaussian
    >>> check = crosscheck(Gaussian(0, 1), Gaussian(0.5, 1), "k1,k3", n=20_000, seed=0)
    >>> check["passed"]
    True
    """
    from klsym.exact import expectations as exact  # the exact layer is only needed here

    modes = _check_modes(modes) if modes else ()
    estimators, n, seed, _, _ = _resolve(q, p, estimators, n, seed, options.get("backend"),
                                         options.get("dtype", "float64"))
    values = run(q, p, estimators, n, seed, quantiles=(), batch_size=None, square_moments=True, **options)
    grads = gradient(q, p, estimators, n, seed, modes=modes, **options)["gradients"] if modes else {}
    out = {"n": n, "seed": seed, "z_limit": z_limit, "estimators": {}}
    counted = []
    for estimator in estimators:
        mc = values["estimators"][estimator.name]
        reference = exact.estimator_stats(estimator, q, p)
        infinite = not math.isfinite(reference["second_moment"])
        se = mc["se"] if infinite else math.sqrt(max(reference["std"], 0.0) ** 2 / n)
        entry = {"target": estimator.target, "infinite_variance": infinite,
                 "mean": {"mc": mc["mean"], "exact": reference["mean"], "se": se,
                          "z": float(_z(mc["mean"], reference["mean"], se))},
                 "second_moment": None, "gradients": {}}
        if not infinite:
            counted.append(entry["mean"]["z"])
            square = mc["square"]
            entry["second_moment"] = {"mc": square["mean"], "exact": reference["second_moment"],
                                      "se": square["se"],
                                      "z": float(_z(square["mean"], reference["second_moment"], square["se"]))}
        for mode in modes:
            mc_grad = grads[estimator.name][mode]
            exact_grad = np.asarray(exact.estimator_gradient(estimator, q, p, mode), dtype=np.float64)
            z = _z(mc_grad["mean"], exact_grad, mc_grad["se"])
            entry["gradients"][mode] = {"mc": mc_grad["mean"], "exact": exact_grad, "se": mc_grad["se"], "z": z}
            if not infinite:  # E[k^2] = inf: the gradient's spread is heavy-tailed too
                counted.extend(np.ravel(z).tolist())
        out["estimators"][estimator.name] = entry
    max_abs = float(np.max(np.abs(counted))) if counted else 0.0
    out["max_abs_z"] = max_abs
    out["passed"] = bool(max_abs < z_limit)
    return out
