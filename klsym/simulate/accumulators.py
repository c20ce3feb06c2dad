r"""Mergeable accumulators: each statistic of the Monte Carlo stream, as ``update(chunk)`` and ``merge(other)``.

An accumulator fed by :meth:`Accumulator.update` keeps one *partial* per RNG block of the chunk (computed
vectorised over the chunk's rows); :meth:`Accumulator.merge` folds another accumulator's partials into
this one's state, block after block. The driver (:func:`klsym.simulate.driver.stream_through`) gives
each chunk fresh copies (:meth:`Accumulator.empty`) on worker threads and merges them in block order,
so every statistic is bit-identical for any chunking and number of threads; a distributed sweep can
merge the same partials in the same order.

:class:`ValueSummary` reduces one estimator's values in a block once for the moments, the extremes and the batch
means (with :mod:`klsym.simulate.kernels`: two compiled passes, the same bits).

Statistics (``width`` = number of estimators, vectorised):

- :class:`Moments` -- count, mean and sum of squared deviations (per block: two passes of :func:`lane_sums`;
  across blocks: Chan et al.'s 1979 pairwise update), of the values :math:`k` or of :math:`k^2`;
- :class:`Extremes` -- min, max, the number of negative and of non-finite values;
- :class:`Histogram` -- counts of the values in float32 bit-pattern bins (see :func:`histogram_keys`);
- :class:`LogRatioHistogram` -- one finer histogram of :math:`t = \log r` that gives the quantiles of every
  estimator :math:`k(e^t)` (see :func:`quantiles_of_function`);
- :class:`BatchSpread` -- moments of the means of consecutive batches of ``B`` samples;
- :class:`GradientSums` -- sums of :math:`w s` and :math:`(w s)^2` per (estimator, mode);
- :class:`TrialGradients` -- one gradient estimate per block (a trial).
"""

from __future__ import annotations

import math

import numpy as np

_HIST_BITS = 16  # float32 bits kept: sign, 8 exponent bits, 7 mantissa bits
_HIST_SHIFT = 32 - _HIST_BITS
HIST_BINS = 1 << _HIST_BITS
#: Bits kept by :class:`LogRatioHistogram`: 9 mantissa bits, bins of relative width at most 2^-9 in t.
T_HIST_BITS = 18


#: Infinite and undefined values are counted and reported explicitly (``n_nonfinite``, ``inf`` means), so the
#: arithmetic on them runs without NumPy's RuntimeWarnings.
_QUIET = {"over": "ignore", "invalid": "ignore", "divide": "ignore"}


class Accumulator:
    """Base class: subclasses define ``fold(partial)``, a result, and either ``piece(chunk, i)`` (the part of
    estimator ``i``) with ``assemble(chunk, pieces)`` (the per-block partials), or ``partials(chunk)`` for a
    statistic of the whole chunk (``by_estimator = False``)."""

    #: Whether the chunk's partials are built from one ``piece`` per estimator (see :func:`feed`).
    by_estimator = True
    #: Whether it reads the samples x (the chunk's ``data``: scores, tokens), not only their log-ratios t.
    needs_samples = False
    #: The batch size whose means it reads from :meth:`klsym.simulate.driver.Chunk.summary` (None: none).
    summary_batch = None

    def __init__(self, *config):
        self._config = config
        self._partials: list = []

    def empty(self) -> Accumulator:
        """A fresh accumulator with the same configuration."""
        return type(self)(*self._config)

    def piece(self, chunk, i: int):
        raise NotImplementedError

    def assemble(self, chunk, pieces: list) -> list:
        raise NotImplementedError

    def partials(self, chunk) -> list:
        """One partial per RNG block of ``chunk``."""
        return self.assemble(chunk, [self.piece(chunk, i) for i in range(self.width)])

    def fold(self, partial) -> None:
        raise NotImplementedError

    def update(self, chunk) -> Accumulator:
        """Add a chunk of RNG blocks (kept as per-block partials until merged)."""
        with np.errstate(**_QUIET):
            self._partials.extend(self.partials(chunk))
        return self

    def merge(self, other: Accumulator) -> Accumulator:
        """Fold ``other``'s blocks, which come after this accumulator's, into this one."""
        self._fold_pending()
        with np.errstate(**_QUIET):
            for partial in other._partials:
                self.fold(partial)
        return self

    def _fold_pending(self) -> None:
        pending, self._partials = self._partials, []
        with np.errstate(**_QUIET):
            for partial in pending:
                self.fold(partial)


def needs_samples(accumulators) -> bool:
    """Whether any of ``accumulators`` reads the samples themselves (else a chunk may keep only t)."""
    return any(a.needs_samples for a in accumulators)


#: RNG blocks :func:`feed` reduces together (2 MiB arrays of values): four blocks a step take 0.90-0.94 of the
#: wall time of one block a step at 1e7 samples on 2 cores (fewer Python calls a sample, less waiting for the GIL);
#: the whole chunk of eight takes longer again.
FEED_BLOCKS = 4


def feed(accumulators, chunk) -> None:
    """Add ``chunk`` to every accumulator: the statistics of the whole chunk at once (the t-histogram), then
    :data:`FEED_BLOCKS` blocks at a time and in each group one estimator at a time, each estimator's values (and
    gradient weights) reduced by every accumulator while they are in a core's cache, then dropped
    (:meth:`Chunk.forget`). Partials stay one per block.

    The same numbers as ``accumulator.update(chunk)`` for each accumulator.
    """
    by_estimator = [a for a in accumulators if a.by_estimator]
    with np.errstate(**_QUIET):
        for a in accumulators:
            if not a.by_estimator:
                a._partials.extend(a.partials(chunk))
        batch = next((a.summary_batch for a in by_estimator if a.summary_batch), None)
        for group in chunk.row_groups(FEED_BLOCKS) if by_estimator else ():
            group.batch = batch  # each estimator's value summary is made once, with the batch means asked for
            pieces: list[list] = [[] for _ in by_estimator]
            for i in range(max(a.width for a in by_estimator)):
                for a, got in zip(by_estimator, pieces):
                    if i < a.width:
                        got.append(a.piece(group, i))
                group.forget(i)
            for a, got in zip(by_estimator, pieces):
                a._partials.extend(a.assemble(group, got))


# --- values ------------------------------------------------------------------------------------


#: Lanes of klsym's summation (:func:`lane_sums`); the compiled kernels use the same number.
SUM_LANES = 128


def lane_sums(xp, values):
    r"""Sums over the last axis of ``values`` (in float64), in klsym's fixed order: element :math:`i` of a
    sequence is added to lane :math:`i \bmod 128` (each lane starts at 0 and adds its elements in order); lane
    :math:`j` then goes to accumulator :math:`j \bmod 8` (in order, from the first), and the eight accumulators
    are added as :math:`((a_0 + a_1) + (a_2 + a_3)) + ((a_4 + a_5) + (a_6 + a_7))`, to 0.

    That order vectorises in a compiled loop without reassociation (the kernels of
    :mod:`klsym.simulate.kernels` give these bits), and NumPy computes it in two calls: a reduction over rows of
    128, then its own (pairwise) sum of 128 contiguous lanes, which is this 8-accumulator order (a test checks
    both against the definition). A block of 65536 samples puts 512 in a lane: a rounding error of at most
    about :math:`530\,\epsilon \sum |x_i|` (NumPy's pairwise sum: about :math:`16\,\epsilon \sum |x_i|`),
    typically :math:`\sqrt{530}\,\epsilon`; both are far below any Monte Carlo standard error.

    >>> import numpy as np
    >>> x = np.arange(300.0)
    >>> lanes = [sum(x[j::128]) for j in range(128)]
    >>> a = [sum(lanes[k::8]) for k in range(8)]
    >>> bool(lane_sums(np, x) == ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7])) == x.sum())
    True
    """
    values = values.astype(xp.float64, copy=False)
    size = values.shape[-1]
    full = size - size % SUM_LANES
    rows = values[..., :full].reshape(*values.shape[:-1], full // SUM_LANES, SUM_LANES)
    lanes = rows.sum(axis=-2)  # row after row: each lane in order
    if size > full:
        lanes[..., : size - full] += values[..., full:]
    return lanes.sum(axis=-1)  # 128 contiguous values: NumPy's 8 accumulators


def block_moments(xp, values):
    """Per-row (mean, M2) of a (rows, size) array: float64 :func:`lane_sums` of the values and of the squared
    deviations from their mean."""
    means = lane_sums(xp, values) / values.shape[-1]
    deviations = values - means[..., None]
    xp.multiply(deviations, deviations, out=deviations)  # in place: one temporary, not two
    return means, lane_sums(xp, deviations)


def extremes_of(xp, values):
    """Per-row min, max, number of negative values and number of non-finite values of a (rows, size) array,
    as a (4, rows) float64 array on the host; min and max are NaN in a row with a NaN, -0.0 is reported as 0.0."""
    out = np.zeros((4, values.shape[0]))
    for row, v in enumerate(values):  # whole-array reductions: along an axis NumPy takes 2-3x longer
        low, high = float(v.min()) + 0.0, float(v.max()) + 0.0
        out[:2, row] = low, high
        # the counts take a pass over the values only where min and max say there is something to count
        if not low >= 0:
            out[2, row] = int(xp.count_nonzero(v < 0))
        if not (math.isfinite(low) and math.isfinite(high)):
            out[3, row] = v.size - int(xp.count_nonzero(xp.isfinite(v)))
    return out


class ValueSummary:
    r"""What the value statistics need from one estimator's values in a chunk, per row (RNG block): ``means``
    and ``m2s`` (:func:`block_moments`), ``low``, ``high``, ``negative``, ``nonfinite``
    (:func:`extremes_of`) and, for a ``batch`` size, ``batch_means`` (rows, size // batch): the mean of each
    whole batch (:func:`lane_sums` / batch).

    With :mod:`klsym.simulate.kernels` (``kernels``) all of it comes from two compiled passes over the
    values, with the same bits as the array code.
    """

    def __init__(self, xp, values, batch: int | None = None, kernels=None):
        self.batch = batch
        if kernels is not None:
            stats, batch_sums = kernels.value_summary(values, batch)
            self.means, self.m2s, self.extremes = stats[:, 0], stats[:, 1], stats.T[2:]
            broken = [row for row, mean in enumerate(self.means.tolist()) if not math.isfinite(mean)]
            if broken:  # an inf or a NaN in these rows: the kernel's extremes do not hold there
                self.extremes[:, broken] = extremes_of(xp, values[broken])
        else:
            self.means, self.m2s = block_moments(xp, values)
            self.extremes = extremes_of(xp, values)
            if batch:
                per_row = values.shape[-1] // batch
                batch_sums = lane_sums(xp, values[..., : per_row * batch].reshape(*values.shape[:-1], per_row, batch))
        #: (4, rows) on the host: min, max, number of negative and of non-finite values
        self.low, self.high, self.negative, self.nonfinite = self.extremes
        self.batch_means = batch_sums / batch if batch else None


def host_stack(chunk, arrays) -> np.ndarray:
    """``arrays`` (of ``chunk``'s backend) stacked along a new first axis, on the host; for NumPy arrays one
    ``np.array`` call (a few microseconds less than ``np.stack``, which counts for every block)."""
    xp = chunk.stream.xp
    return np.array(arrays) if xp is np else chunk.stream.backend.host(xp.stack(arrays))


class Moments(Accumulator):
    r"""Count, mean and sum of squared deviations of each estimator's values (``square``: of :math:`k^2`)."""

    def __init__(self, width: int, square: bool = False):
        super().__init__(width, square)
        self.width, self.square = width, square
        self.count = 0.0
        self.mean = np.zeros(width)
        self.m2 = np.zeros(width)

    def piece(self, chunk, i: int):
        if self.square:
            values = chunk.values(i)
            summary = ValueSummary(chunk.stream.xp, values * values, kernels=chunk.kernels)
        else:
            summary = chunk.summary(i)
        return summary.means, summary.m2s

    def assemble(self, chunk, stats):
        means = host_stack(chunk, [m for m, _ in stats])  # (width, rows)
        m2s = host_stack(chunk, [v for _, v in stats])
        return [(size, means[:, row], m2s[:, row]) for row, size in enumerate(chunk.sizes)]

    def fold(self, partial) -> None:
        count, mean, m2 = partial
        if count == 0:
            return
        total = self.count + count
        delta = mean - self.mean
        self.mean = self.mean + delta * (count / total)
        self.m2 = self.m2 + m2 + delta * delta * (self.count * count / total)
        self.count = total

    def std(self) -> np.ndarray:
        self._fold_pending()
        return np.sqrt(self.m2 / max(self.count - 1.0, 1.0))


class Extremes(Accumulator):
    """Min, max, and the counts of negative and of non-finite values, per estimator (exact whatever the
    grouping: one partial for all the blocks it is given at once)."""

    def __init__(self, width: int):
        super().__init__(width)
        self.width = width
        self.min = np.full(width, np.inf)
        self.max = np.full(width, -np.inf)
        self.negative = np.zeros(width)
        self.nonfinite = np.zeros(width)

    def piece(self, chunk, i: int):
        low, high, negative, nonfinite = extremes = chunk.summary(i).extremes
        if extremes.shape[1] == 1:  # one block: its own numbers
            return extremes[:, 0]
        return np.array([low.min(), high.max(), negative.sum(), nonfinite.sum()])

    def assemble(self, chunk, pieces):
        return [np.array(pieces)]

    def fold(self, partial) -> None:
        self.min = np.minimum(self.min, partial[:, 0])
        self.max = np.maximum(self.max, partial[:, 1])
        self.negative += partial[:, 2]
        self.nonfinite += partial[:, 3]


def histogram_keys(xp, values, bits: int = _HIST_BITS):
    """Monotone bin index of each value: its float32 bit pattern cut to ``bits`` bits."""
    with np.errstate(over="ignore"):
        pattern = values.astype(xp.float32).view(xp.int32)
    monotone = pattern ^ ((pattern >> 31) & 0x7FFFFFFF)  # negative floats: reverse the magnitude order
    return ((monotone >> (32 - bits)) + (1 << (bits - 1))).ravel()


def bin_edges(keys, bits: int = _HIST_BITS) -> tuple[np.ndarray, np.ndarray]:
    """Lowest and highest float32 value of the bins ``keys`` (arrays; NaN for the NaN bins)."""
    keys = np.asarray(keys, dtype=np.int64) - (1 << (bits - 1))
    shift = 32 - bits
    monotone = np.stack([keys << shift, ((keys + 1) << shift) - 1]).astype(np.int32)
    pattern = monotone ^ ((monotone >> 31) & 0x7FFFFFFF)
    with np.errstate(invalid="ignore"):  # the NaN bins' patterns
        first, last = pattern.view(np.float32).astype(np.float64)
    return np.fmin(first, last), np.fmax(first, last)


def _bin_edges(key: int) -> tuple[float, float]:
    low, high = bin_edges([key])
    return float(low[0]), float(high[0])


def quantiles_from_histogram(counts: np.ndarray, levels) -> dict:
    """Quantiles at ``levels`` from bin counts, interpolated linearly inside a bin."""
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


class Histogram(Accumulator):
    """Counts of the finite values in float32 bit-pattern bins (relative width :math:`2^{-7}`); integer counts
    are exact whatever the grouping, so a partial covers all the blocks it is given at once."""

    def __init__(self, width: int):
        super().__init__(width)
        self.width = width
        self.counts = np.zeros((width, HIST_BINS), dtype=np.int64)

    def piece(self, chunk, i: int):
        xp, values = chunk.stream.xp, chunk.values(i)
        finite = xp.isfinite(values)
        kept = values if bool(finite.all()) else values[finite]
        return xp.bincount(histogram_keys(xp, kept), minlength=HIST_BINS)

    def assemble(self, chunk, pieces):
        return [host_stack(chunk, pieces)]

    def fold(self, partial) -> None:
        self.counts += partial

    def quantiles(self, i: int, levels) -> dict:
        self._fold_pending()
        return quantiles_from_histogram(self.counts[i], levels)


class BatchSpread(Accumulator):
    """Moments of the means of consecutive batches of ``batch_size`` samples inside each RNG block
    (a block's incomplete last batch is left out), and the number of negative batch means."""

    def __init__(self, width: int, batch_size: int):
        super().__init__(width, batch_size)
        self.width, self.batch_size = width, batch_size
        self.summary_batch = batch_size  # its pieces are the value summaries' batch means
        self.moments = Moments(width)
        self.negative = np.zeros(width)

    def piece(self, chunk, i: int):
        return chunk.summary(i, self.batch_size).batch_means  # (rows, batches): small

    def assemble(self, chunk, pieces):
        per_block = chunk.t.shape[1] // self.batch_size
        if per_block:  # (width, rows, batches) batch means: small, reduced on the host
            batch_values = host_stack(chunk, pieces).reshape(-1, per_block)
            summary = ValueSummary(np, batch_values, kernels=chunk.kernels)
            means, m2s, negative = (
                a.reshape(self.width, chunk.rows) for a in (summary.means, summary.m2s, summary.negative)
            )
        else:
            means = m2s = negative = np.zeros((self.width, chunk.rows))
        return [
            (size // self.batch_size, means[:, row], m2s[:, row], negative[:, row])
            for row, size in enumerate(chunk.sizes)
        ]

    def fold(self, partial) -> None:
        count, mean, m2, negative = partial
        self.moments.fold((count, mean, m2))
        self.negative = self.negative + negative

    @property
    def count(self) -> float:
        self._fold_pending()
        return self.moments.count


class LogRatioHistogram(Accumulator):
    r"""Counts of the log-ratios :math:`t` in float32 bit-pattern bins of ``bits`` bits (relative width
    :math:`2^{-(bits - 9)}`), from which the quantiles of every estimator :math:`k(e^t)` follow
    (:func:`quantiles_of_function`): one pass over the samples instead of one histogram per estimator.

    A chunk's partial holds only the keys its log-ratios fall in, and their counts.
    """

    by_estimator = False

    def __init__(self, bits: int = T_HIST_BITS):
        super().__init__(bits)
        self.bits = bits
        self._counts = None  # 2 MiB: allocated when first folded into, not in every worker's empty copy
        self._met = None  # (keys, counts) of the bins met, once asked for

    @property
    def counts(self) -> np.ndarray:
        if self._counts is None:
            self._counts = np.zeros(1 << self.bits, dtype=np.int64)
        return self._counts

    def partials(self, chunk):
        xp, host = chunk.stream.xp, chunk.stream.backend.host
        if chunk.kernels is not None:  # the same counts in one compiled pass
            return [chunk.kernels.log_ratio_histogram(chunk.t, self.bits)]
        # monotone keys: the bins of a block's t, which straddles 0, form one short run (~10^5 bins)
        keys = histogram_keys(xp, chunk.t, self.bits)
        first = int(keys.min())
        keys -= first
        counts = xp.bincount(keys)
        met = xp.flatnonzero(counts)
        return [(host(met + first), host(counts[met]))]  # integer counts: exact whatever the grouping

    def fold(self, partial) -> None:
        keys, counts = partial  # each key once
        self.counts[keys] += counts
        self._met = None

    def coalesce(self) -> LogRatioHistogram:
        """Sum the pending partials into one (integer counts: exact), e.g. before shipping them elsewhere."""
        if len(self._partials) > 1:
            total = np.zeros(1 << self.bits, dtype=np.int64)
            for keys, counts in self._partials:
                total[keys] += counts
            met = np.flatnonzero(total)
            self._partials = [(met, total[met])]
        return self

    def quantiles(self, function, levels, bracket: bool = False) -> dict:
        """Quantiles of ``function(t)`` over the samples (see :func:`quantiles_of_function`)."""
        self._fold_pending()
        if self._met is None:  # the bins met, found once for every estimator's quantiles
            keys = np.flatnonzero(self.counts)
            self._met = keys, self.counts[keys]
        return quantiles_of_function(*self._met, function, levels, self.bits, bracket)


def quantiles_of_function(keys, counts, function, levels, bits: int = T_HIST_BITS, bracket: bool = False) -> dict:
    r"""Quantiles of :math:`k(t)` from counts of :math:`t` in the bit-pattern bins ``keys`` (:func:`histogram_keys`).

    Bin :math:`j` holds :math:`c_j` samples with :math:`t \in [t_j^-, t_j^+]`, hence
    :math:`k \in [a_j, b_j]`, the range of :math:`k` at the bin's edges and midpoint (exact where
    :math:`k` is monotone inside the bin; a bin never contains :math:`t = 0`, where the built-ins turn).
    With :math:`L(x) = \sum_{b_j \le x} c_j \le n F_n(x) \le U(x) = \sum_{a_j \le x} c_j`, the sample
    quantile at level :math:`\ell` lies in the *bracket*
    :math:`[\min\{a_j : U(a_j) \ge \ell n\},\ \min\{b_j : L(b_j) \ge \ell n\}]`, about one bin wide in
    :math:`k`: a relative error of at most about :math:`|t\, k'(t) / k(t)|\, 2^{-(bits - 9)}` (for 18
    bits :math:`2^{-9}` for k1; :math:`2^{-8}` for k2, and for k3, k4 near :math:`t = 0`). Inside the
    bracket each bin's count is spread uniformly over :math:`[a_j, b_j]` and the level is solved for,
    which is usually much closer. Quantiles are over all samples: :math:`\pm\infty` values of :math:`k` (k1 at
    :math:`t = -\infty`, where p(x) = 0) count as such; only bins where :math:`k` is NaN are left out.

    Returns ``{str(level): value}``, or ``{str(level): (low, high)}`` brackets when ``bracket``.
    """
    low, high = bin_edges(keys, bits)
    low, high = np.where(np.isnan(low), high, low), np.where(np.isnan(high), low, high)
    middle = np.where(np.isfinite(low) & np.isfinite(high), 0.5 * low + 0.5 * high, low)
    with np.errstate(all="ignore"):
        image = [np.asarray(function(v), dtype=np.float64) for v in (low, middle, high)]
        # fmin/fmax skip NaN, as nanmin/nanmax would (and are 30x faster on the subnormal values near t = 0)
        a, b = np.fmin(np.fmin(image[0], image[1]), image[2]), np.fmax(np.fmax(image[0], image[1]), image[2])
    c = np.asarray(counts, dtype=np.float64)
    keep = ~np.isnan(a)  # bins where k is NaN at every point
    if not keep.all():
        a, b, c = a[keep], b[keep], c[keep]
    total = c.sum()
    by_low, by_high = np.argsort(a, kind="stable"), np.argsort(b, kind="stable")
    a_sorted, b_sorted = a[by_low], b[by_high]
    upper, lower = np.cumsum(c[by_low]), np.cumsum(c[by_high])
    out = {}
    for level in levels:
        if total == 0:
            out[str(level)] = (math.nan, math.nan) if bracket else math.nan
            continue
        target = max(level * total, 0.5)  # level 0: the smallest value
        x_lo = float(a_sorted[min(np.searchsorted(upper, target), a.size - 1)])
        x_hi = float(b_sorted[min(np.searchsorted(lower, target), b.size - 1)])
        if bracket:
            out[str(level)] = (x_lo, x_hi)
            continue
        below = np.searchsorted(b_sorted, x_lo, side="right")
        base = float(lower[below - 1]) if below else 0.0
        inside = (a < x_hi) & (b > x_lo)
        out[str(level)] = _solve_uniform_mixture(a[inside], b[inside], c[inside], target - base, x_lo, x_hi)
    return out


def _solve_uniform_mixture(a, b, c, target, low, high) -> float:
    r"""The smallest x in [low, high] with :math:`F(x) = \sum_j c_j\, \mathrm{clip}((x - a_j) / (b_j - a_j), 0, 1) \ge`
    ``target`` (a bin with :math:`a_j = b_j` is a step at :math:`a_j`). F is piecewise linear with its kinks and
    steps at the :math:`a_j, b_j`: evaluated there (value and left limit), the crossing segment is solved exactly."""
    points = np.unique(np.clip(np.concatenate([[low, high], a, b]), low, high))
    offsets, width = points[:, None] - a, b - a
    with np.errstate(all="ignore"):
        ramps = np.clip(offsets / width, 0.0, 1.0)
    value = np.where(width > 0, ramps, offsets >= 0) @ c
    below = np.where(width > 0, ramps, offsets > 0) @ c  # left limits: a step counts from its point on
    i = int(np.searchsorted(value, target, side="left"))  # F is non-decreasing
    if i == 0:
        return float(points[0])
    if i == points.size:
        return float(high)
    x0, x1, f0, f1 = points[i - 1], points[i], value[i - 1], below[i]
    if f0 < target <= f1:  # continuous on [x0, x1): the straight line crosses the level
        return float(min(max(x0 + (x1 - x0) * ((target - f0) / (f1 - f0)), x0), x1))
    return float(x1)  # a step at x1 crosses it


# --- gradients ---------------------------------------------------------------------------------


class GradientSums(Accumulator):
    r"""Sums of the per-sample gradients :math:`w(t)\, s(x)` and of their squares, per (estimator, mode).

    Gaussian: one einsum per block. Categorical: the score w.r.t. the logits is :math:`e_x - q`, so the
    sums are kept as per-token sums of :math:`w` and :math:`w^2` (``bincount``; no n x V matrix) plus
    :math:`\sum w` and :math:`\sum w^2`.
    """

    needs_samples = True

    def __init__(self, width: int, modes, size: int, categorical: bool):
        super().__init__(width, modes, size, categorical)
        self.width, self.modes, self.size, self.categorical = width, tuple(modes), size, categorical
        labels = width * len(self.modes)
        self.sums = np.zeros((labels, size))
        self.squares = np.zeros((labels, size))
        self.weight_sums = np.zeros((labels, 2))  # categorical: sum w, sum w^2

    def piece(self, chunk, i: int):
        weights = chunk.weights(i, self.modes)
        ws = [weights[mode] for mode in self.modes]
        if self.categorical:
            return ws  # categorical runs are small: summed per token in assemble
        xp = chunk.stream.xp
        score, score_squared = chunk.score(), chunk.score_squared()  # (params, rows, size)
        sums = []
        for w in ws:  # one block at a time: the bits do not depend on the chunk
            squared = w * w
            first = [xp.einsum("n,pn->p", w[row], score[:, row], dtype=xp.float64) for row in range(chunk.rows)]
            second = [
                xp.einsum("n,pn->p", squared[row], score_squared[:, row], dtype=xp.float64) for row in range(chunk.rows)
            ]
            sums.append((xp.stack(first, axis=-1), xp.stack(second, axis=-1)))
        return sums

    def assemble(self, chunk, pieces):
        xp, host = chunk.stream.xp, chunk.stream.backend.host
        labels = [label for piece in pieces for label in piece]  # estimator-major, then mode
        if not self.categorical:
            firsts, seconds = host(xp.stack([f for f, _ in labels])), host(xp.stack([s for _, s in labels]))
            return [(firsts[:, :, row], seconds[:, :, row]) for row in range(chunk.rows)]
        ws = xp.stack(labels)  # (labels, rows, size)
        out = []
        for row in range(chunk.rows):
            tokens, inverse = xp.unique(chunk.data[row], return_inverse=True)
            w = ws[:, row].astype(xp.float64)
            s1 = xp.stack([xp.bincount(inverse, weights=wi, minlength=tokens.size) for wi in w])
            s2 = xp.stack([xp.bincount(inverse, weights=wi * wi, minlength=tokens.size) for wi in w])
            out.append(tuple(host(a) for a in (tokens, s1, s2, w.sum(axis=-1), (w * w).sum(axis=-1))))
        return out

    def fold(self, partial) -> None:
        if not self.categorical:
            self.sums += partial[0]
            self.squares += partial[1]
            return
        tokens, s1, s2, w1, w2 = partial
        self.sums[:, tokens] += s1
        self.squares[:, tokens] += s2
        self.weight_sums[:, 0] += w1
        self.weight_sums[:, 1] += w2

    def result(self, n: int, probs=None) -> tuple[np.ndarray, np.ndarray]:
        """Mean gradient and its standard error, (labels, params), labels ordered estimator-major."""
        self._fold_pending()
        with np.errstate(**_QUIET):
            if self.categorical:
                means = (self.sums - probs * self.weight_sums[:, :1]) / n
                second = ((1.0 - 2.0 * probs) * self.squares + probs * probs * self.weight_sums[:, 1:]) / n
            else:
                means, second = self.sums / n, self.squares / n
            variance = np.maximum(second - means * means, 0.0) * (n / max(n - 1, 1))
            return means, np.sqrt(variance / n)


class TrialGradients(Accumulator):
    r"""One gradient estimate per block (a trial of ``n`` samples): the block mean of :math:`w\, s`."""

    needs_samples = True

    def __init__(self, width: int, modes, size: int, categorical: bool, trials: int):
        super().__init__(width, modes, size, categorical, trials)
        self.width, self.modes, self.size, self.categorical = width, tuple(modes), size, categorical
        self.trials = trials
        self.result = np.zeros((width * len(self.modes), trials, size))
        self._next = 0

    def piece(self, chunk, i: int):
        xp = chunk.stream.xp
        n, rows = chunk.t.shape[1], chunk.rows
        weights = chunk.weights(i, self.modes)
        if not self.categorical:
            score = chunk.score()  # (params, rows, n)
            return [xp.einsum("rn,prn->rp", weights[mode], score, dtype=xp.float64) / n for mode in self.modes]
        offsets = (chunk.data + (xp.arange(rows)[:, None] * self.size)).ravel()
        probs = xp.asarray(chunk.stream.sampler.probs)
        out = []
        for mode in self.modes:
            w = weights[mode].astype(xp.float64)
            counts = xp.bincount(offsets, weights=w.ravel(), minlength=rows * self.size)
            out.append((counts.reshape(rows, self.size) - w.sum(axis=-1)[:, None] * probs) / n)
        return out

    def assemble(self, chunk, pieces):
        xp = chunk.stream.xp
        # trials are independent: no arithmetic across blocks
        return [chunk.stream.backend.host(xp.stack([mean for piece in pieces for mean in piece]))]

    def fold(self, partial) -> None:
        rows = partial.shape[1]
        self.result[:, self._next : self._next + rows] = partial
        self._next += rows


__all__ = [
    "Accumulator",
    "feed",
    "FEED_BLOCKS",
    "needs_samples",
    "Moments",
    "Extremes",
    "Histogram",
    "LogRatioHistogram",
    "BatchSpread",
    "GradientSums",
    "TrialGradients",
    "block_moments",
    "lane_sums",
    "extremes_of",
    "ValueSummary",
    "SUM_LANES",
    "histogram_keys",
    "bin_edges",
    "quantiles_from_histogram",
    "quantiles_of_function",
    "HIST_BINS",
    "T_HIST_BITS",
]
