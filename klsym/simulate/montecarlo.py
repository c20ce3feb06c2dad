r"""Streaming Monte Carlo for KL estimators: values, batch spread and gradients, in constant memory.

Samples :math:`x \sim q` are drawn in fixed RNG blocks (:data:`klsym.simulate.backend.NUMPY_BLOCK` samples;
block ``b`` from ``SeedSequence(seed, spawn_key=(b,))``, see :mod:`klsym.simulate.driver`), turned into log-ratios
:math:`t = \log p(x) - \log q(x)` and into estimator values through the registry's own SymPy
expressions, lambdified once and kept with each estimator's plan (:attr:`klsym.exact.plans.Plan.numeric` and
``numeric_dt``, the functions of :attr:`klsym.derive.estimators.Estimator.numeric`). Each block is reduced
to a few numbers by the accumulators of :mod:`klsym.simulate.accumulators` (count, mean, sum of squared
deviations, extremes, histogram, batch spread, gradient sums) and the blocks are merged in block order
(Chan et al.'s pairwise update), so every result depends only on ``(seed, n)``: not on ``chunk``
(how many blocks one worker takes at once), nor on the number of threads. Memory is a few chunks,
whatever ``n``.

Quantiles (of the finite values) of every estimator come from one histogram of :math:`t` whose bins are
the float32 numbers with their mantissa cut to 9 bits (:class:`~klsym.simulate.accumulators.LogRatioHistogram`):
:math:`k` is a function of :math:`t`, so each bin of :math:`t` maps to a known interval of :math:`k` and the
sample quantile is bracketed by about one bin's image, a relative error of at most about
:math:`|t\,k'(t)/k(t)|\, 2^{-9}` (:math:`2^{-9} \approx 0.2\%` for k1, :math:`2^{-8}` for k2; interpolation
inside the bracket usually does much better; see
:func:`~klsym.simulate.accumulators.quantiles_of_function`).

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
import time

import numpy as np

from klsym.derive.modes import MODES
from klsym.exact.families import Categorical, Gaussian  # noqa: F401  (doctests and users)
from klsym.simulate.accumulators import BatchSpread, Extremes, GradientSums, LogRatioHistogram, Moments, TrialGradients
from klsym.simulate.backend import Backend
from klsym.simulate.driver import DEFAULT_CHUNK, DTYPES, TRIALS_STREAM, Stream, check_count, check_modes, stream_through

GRADIENT_MODES = MODES
DEFAULT_QUANTILES = (0.01, 0.05, 0.5, 0.95, 0.99)
#: Samples in one batch of the batch statistics (what one RL step averages over).
DEFAULT_BATCH = 1024
#: Largest trials x V array :func:`gradient_trials` returns for a categorical sampler.
MAX_TRIAL_ENTRIES = 1 << 24


def _timed(stream: Stream, plan, accumulators, threads, progress, total):
    started = time.perf_counter()
    stream_through(stream, plan, accumulators, threads, progress, total)
    return time.perf_counter() - started


def _header(stream: Stream, n: int, seconds: float) -> dict:
    return {"n": n, "seed": stream.seed, "seconds": seconds, "backend": stream.backend.name, "dtype": stream.dtype}


# --- values ------------------------------------------------------------------------------------


def run(
    q,
    p,
    estimators="k1,k2,k3",
    n: int = 1_000_000,
    seed: int = 0,
    *,
    chunk: int | None = None,
    backend: str | Backend | None = None,
    dtype: str = "float64",
    quantiles=DEFAULT_QUANTILES,
    batch_size: int | None = DEFAULT_BATCH,
    threads: int | None = None,
    progress: bool = False,
    square_moments: bool = False,
) -> dict:
    r"""Stream ``n`` samples of ``x ~ q`` and summarise each estimator :math:`k(r(x))`.

    Parameters
    ----------
    q, p : klsym.exact.families.Gaussian or klsym.exact.families.Categorical
        The sampler and the reference (same family).
    estimators : str or list
        Names (``"k1,k3"``), :class:`~klsym.derive.estimators.Estimator` objects or their plans
        (:func:`klsym.exact.plans.plan_of`); built-in names need no SymPy once the cache is warm.
    n, seed : int
        Sample size and seed; the result depends only on these (and the backend).
    chunk : int, optional
        Samples a worker processes at once, rounded to whole RNG blocks; does not change results. Default:
        up to :data:`~klsym.simulate.driver.DEFAULT_CHUNK`, fewer for a small n (every thread gets work).
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
    stream = limits_at_zero_probability(Stream(q, p, estimators, seed, backend, dtype))
    n = check_count(n, "n")
    statistics = ValueStatistics(stream, quantiles, batch_size, square_moments)
    seconds, done = _interruptible(stream, stream.streaming_plan(n, chunk), statistics, threads, progress, n)
    out = {
        **_header(stream, done, seconds),
        "block_size": stream.backend.block_size,
        "estimators": statistics.summary(done),
    }
    if done < n:
        out["interrupted"] = {"requested": n, "done": done}
    return out


def _interruptible(stream: Stream, plan, statistics, threads, progress, n):
    """Stream, and on Ctrl-C keep the blocks merged so far: ``(seconds, samples merged)``."""
    started = time.perf_counter()
    try:
        stream_through(stream, plan, statistics.accumulators, threads, progress, n)
    except KeyboardInterrupt:
        done = int(statistics.moments.count)
        if done == 0:
            raise
        return time.perf_counter() - started, done
    return time.perf_counter() - started, n


def limits_at_zero_probability(stream: Stream) -> Stream:
    r"""Make values and slopes at :math:`t = -\infty` (p(x) = 0 < q(x)) the limits of the formulas.

    :math:`0 \log 0 = 0`: rev_k1 = :math:`r \log r` is 0 there, not ``0 * -inf = nan``; k1 is
    ``+inf`` (counted in ``n_nonfinite``), as in the exact layer, whose limits these are
    (:meth:`klsym.exact.plans.Plan.limit`). Only a categorical p with a -inf logit on q's support has
    such samples, so only then are the functions wrapped.
    """
    if not _zero_probability_on_support(stream.q, stream.p):
        return stream
    for i, plan in enumerate(stream.estimators):
        stream.values[i] = _with_limit(stream.values[i], plan.limit("value"), stream.xp)
        stream.slopes[i] = _with_limit(stream.slopes[i], plan.limit("slope"), stream.xp)
    return stream


def _zero_probability_on_support(q, p) -> bool:
    """Whether samples of q can have p(x) = 0 (t = -inf): a categorical p with a -inf logit on q's support."""
    return isinstance(p, Categorical) and bool((np.isneginf(p.log_probs) & np.isfinite(q.log_probs)).any())


def _with_limit(function, limit: float, xp):
    """``function`` with the value at t = -inf replaced by ``limit``."""
    return lambda t, near_zero=None: xp.where(xp.isneginf(t), limit, function(t, near_zero))


def _host_value_function(stream: Stream, plan):
    """k(e^t) on host (NumPy) arrays, with the limit at t = -inf where such samples occur: the t-histogram's
    bins are on the host whatever the backend."""
    if _zero_probability_on_support(stream.q, stream.p):
        return _with_limit(plan.numeric, plan.limit("value"), np)
    return plan.numeric


class ValueStatistics:
    """The accumulators :func:`run` streams the values through, and the summary it reports from them.

    ``accumulators`` is the list handed to the driver (or, in a sweep, filled by remote tasks and
    merged in block order); :meth:`summary` is the ``estimators`` entry of :func:`run`'s result.
    """

    def __init__(
        self,
        stream: Stream,
        quantiles=DEFAULT_QUANTILES,
        batch_size: int | None = DEFAULT_BATCH,
        square_moments: bool = False,
    ):
        width = len(stream.estimators)
        self.stream = stream
        self.levels = tuple(float(level) for level in quantiles or ())
        if any(not 0.0 <= level <= 1.0 for level in self.levels):
            raise ValueError(f"quantile levels must lie in [0, 1], got {self.levels}")
        if batch_size is not None:
            batch_size = check_count(batch_size, "batch_size")
            if batch_size > stream.backend.block_size:
                raise ValueError(f"batch_size must be at most the RNG block size {stream.backend.block_size}")
        self.batch_size = batch_size
        self.moments, self.extremes = Moments(width), Extremes(width)
        self.histogram = LogRatioHistogram() if self.levels else None  # one histogram of t serves every estimator
        self.batches = BatchSpread(width, batch_size) if batch_size is not None else None
        self.square = Moments(width, square=True) if square_moments else None
        self.accumulators = [
            a for a in (self.moments, self.extremes, self.histogram, self.batches, self.square) if a is not None
        ]

    def summary(self, n: int) -> dict:
        """``{name: {target, mean, std, se, min, max, frac_negative, n_nonfinite, quantiles, batch}}``."""
        stream, moments, extremes, histogram = self.stream, self.moments, self.extremes, self.histogram
        batches, square, levels, batch_size = self.batches, self.square, self.levels, self.batch_size
        with np.errstate(invalid="ignore", over="ignore"):
            std = np.asarray(moments.std(), dtype=np.float64)
        results = {}
        for i, estimator in enumerate(stream.estimators):
            low, high = float(extremes.min[i]), float(extremes.max[i])
            mean = float(moments.mean[i])
            spread = float(std[i]) if n >= 2 else math.nan  # one sample has no spread
            if math.isinf(high) != math.isinf(low):  # samples at +inf (or -inf) only: the mean is that infinity
                mean = math.inf if math.isinf(high) else -math.inf
                spread = math.inf if n >= 2 else math.nan
            # over all samples: t = -inf (p(x) = 0) enters with the limit of k there, inf values count as inf
            quantiles = histogram.quantiles(_host_value_function(stream, estimator), levels) if levels else {}
            entry = {
                "target": estimator.target,
                "mean": mean,
                "std": spread,
                "se": spread / math.sqrt(n),
                "min": low,
                "max": high,
                "frac_negative": float(extremes.negative[i] / n),
                "n_nonfinite": int(extremes.nonfinite[i]),
                "quantiles": {
                    level: min(max(value, low), high) if math.isfinite(value) else value
                    for level, value in quantiles.items()
                },
                "batch": None,
            }
            if batches is not None and batches.count:
                batch_spread = float(batches.moments.std()[i])
                if math.isinf(high) != math.isinf(low):  # batch means at one infinity: no finite spread
                    batch_spread = math.inf
                entry["batch"] = {
                    "size": batch_size,
                    "count": int(batches.count),
                    "mean_std": batch_spread,
                    "frac_negative": float(batches.negative[i] / batches.count),
                }
            if square is not None:
                entry["square"] = {"mean": float(square.mean[i]), "se": float(square.std()[i] / math.sqrt(n))}
            results[estimator.name] = entry
        return results


# --- gradients ---------------------------------------------------------------------------------


def _by_label(stream: Stream, modes, rows) -> dict:
    """``{name: {mode: rows[label]}}`` for labels ordered estimator-major."""
    out: dict = {}
    for i, estimator in enumerate(stream.estimators):
        for j, mode in enumerate(modes):
            out.setdefault(estimator.name, {})[mode] = rows(i * len(modes) + j)
    return out


def gradient(
    q,
    p,
    estimators="k1,k2,k3",
    n: int = 1_000_000,
    seed: int = 0,
    *,
    modes=GRADIENT_MODES,
    chunk: int | None = None,
    backend: str | Backend | None = None,
    dtype: str = "float64",
    threads: int | None = None,
    progress: bool = False,
) -> dict:
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
    stream = limits_at_zero_probability(Stream(q, p, estimators, seed, backend, dtype))
    n, modes, sampler = check_count(n, "n"), check_modes(modes), stream.sampler
    sums = gradient_sums(stream, modes)
    seconds = _timed(stream, stream.streaming_plan(n, chunk), [sums], threads, progress, n)
    return {
        **_header(stream, n, seconds),
        "params": sampler.param_names or sampler.size,
        "gradients": gradient_summary(stream, sums, n),
    }


def gradient_sums(stream: Stream, modes) -> GradientSums:
    """The accumulator :func:`gradient` streams the samples through."""
    sampler = stream.sampler
    return GradientSums(len(stream.estimators), check_modes(modes), sampler.size, sampler.categorical)


def gradient_summary(stream: Stream, sums: GradientSums, n: int) -> dict:
    """``{name: {mode: {"mean", "se"}}}``: the ``gradients`` entry of :func:`gradient`'s result."""
    sampler = stream.sampler
    means, se = sums.result(n, sampler.probs if sampler.categorical else None)
    return _by_label(stream, sums.modes, lambda k: {"mean": means[k], "se": se[k]})


def gradient_trials(
    q,
    p,
    estimators="k1,k2,k3",
    n: int = 50_000,
    trials: int = 1000,
    seed: int = 0,
    *,
    modes=GRADIENT_MODES,
    backend: str | Backend | None = None,
    dtype: str = "float64",
    threads: int | None = None,
    progress: bool = False,
) -> dict:
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
    stream = limits_at_zero_probability(Stream(q, p, estimators, seed, backend, dtype))
    n, trials, modes, sampler = check_count(n, "n"), check_count(trials, "trials"), check_modes(modes), stream.sampler
    if sampler.categorical and trials * sampler.size > MAX_TRIAL_ENTRIES:
        raise ValueError(
            f"trials x V = {trials * sampler.size} exceeds {MAX_TRIAL_ENTRIES}; use fewer trials "
            "or the streaming gradient()"
        )
    group = max(1, min(trials, (1 << 17) // n))  # trials per task: arrays of ~1 MiB stay in cache
    per_trial = TrialGradients(len(stream.estimators), modes, sampler.size, sampler.categorical, trials)
    seconds = _timed(stream, stream.trials_plan(n, trials, group), [per_trial], threads, progress, n * trials)
    return {
        **_header(stream, n, seconds),
        "trials": trials,
        "params": sampler.param_names or sampler.size,
        "gradients": _by_label(stream, modes, lambda k: per_trial.result[k]),
    }


__all__ = [
    "run",
    "gradient",
    "gradient_trials",
    "crosscheck",
    "z_score",
    "ValueStatistics",
    "gradient_sums",
    "gradient_summary",
    "DTYPES",
    "GRADIENT_MODES",
    "DEFAULT_QUANTILES",
    "DEFAULT_BATCH",
    "DEFAULT_CHUNK",
    "TRIALS_STREAM",
    "MAX_TRIAL_ENTRIES",
]


# --- cross-check against the exact layer -------------------------------------------------------

#: Units in the last place a float64 mean may be off by rounding alone (the floor of the z-scores' se).
ROUNDING_ULPS = 64


def z_score(estimate, exact, se):
    """z-score, with ``se`` floored at the rounding of float64 means (``ROUNDING_ULPS`` ulps of the
    larger of the two): a 1-ulp difference is not a failed check when the spread is below rounding."""
    estimate, exact, se = (np.asarray(a, dtype=np.float64) for a in (estimate, exact, se))
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        floor = ROUNDING_ULPS * np.finfo(np.float64).eps * np.maximum(np.abs(estimate), np.abs(exact))
        se = np.maximum(se, np.where(np.isfinite(floor), floor, 0.0))
        z = (estimate - exact) / se
    return np.where(estimate == exact, 0.0, z)  # equal, infinities included: no deviation


def crosscheck(
    q, p, estimators="k1,k2,k3", n: int = 200_000, seed: int = 0, *, modes=(), z_limit: float = 5.0, **options
) -> dict:
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

    modes = check_modes(modes) if modes else ()
    n = check_count(n, "n")
    stream = Stream(q, p, estimators, seed, options.get("backend"), options.get("dtype", "float64"))
    estimators, seed = stream.estimators, stream.seed
    values = run(q, p, estimators, n, seed, quantiles=(), batch_size=None, square_moments=True, **options)
    grads = gradient(q, p, estimators, n, seed, modes=modes, **options)["gradients"] if modes else {}
    out = {"n": n, "seed": seed, "z_limit": z_limit, "estimators": {}}
    counted = []
    for estimator in estimators:
        mc = values["estimators"][estimator.name]
        reference = exact.estimator_stats(estimator, q, p)
        # E[k^2] = inf by its existence condition; a finite E[k^2] beyond float64 has a finite log
        infinite = not math.isfinite(reference.get("log_second_moment", reference["second_moment"]))
        se = mc["se"] if infinite else max(reference["std"], 0.0) / math.sqrt(n)
        entry = {
            "target": estimator.target,
            "infinite_variance": infinite,
            "mean": {
                "mc": mc["mean"],
                "exact": reference["mean"],
                "se": se,
                "z": float(z_score(mc["mean"], reference["mean"], se)),
            },
            "second_moment": None,
            "gradients": {},
        }
        if not infinite:
            counted.append(entry["mean"]["z"])
        if math.isfinite(reference["second_moment"]):
            square = mc["square"]
            entry["second_moment"] = {
                "mc": square["mean"],
                "exact": reference["second_moment"],
                "se": square["se"],
                "z": float(z_score(square["mean"], reference["second_moment"], square["se"])),
            }
        for mode in modes:
            mc_grad = grads[estimator.name][mode]
            exact_grad = np.asarray(exact.estimator_gradient(estimator, q, p, mode), dtype=np.float64)
            z = z_score(mc_grad["mean"], exact_grad, mc_grad["se"])
            entry["gradients"][mode] = {"mc": mc_grad["mean"], "exact": exact_grad, "se": mc_grad["se"], "z": z}
            if not infinite:  # E[k^2] = inf: the gradient's spread is heavy-tailed too
                counted.extend(np.ravel(z).tolist())
        out["estimators"][estimator.name] = entry
    max_abs = float(np.max(np.abs(counted))) if counted else 0.0
    out["max_abs_z"] = max_abs
    out["passed"] = bool(max_abs < z_limit)
    return out
