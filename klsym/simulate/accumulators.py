r"""Mergeable accumulators: each statistic of the Monte Carlo stream, as ``update(chunk)`` and ``merge(other)``.

An accumulator fed by :meth:`Accumulator.update` keeps one *partial* per RNG block of the chunk (computed
vectorised over the chunk's rows); :meth:`Accumulator.merge` folds another accumulator's partials into
this one's state, block after block. The driver (:func:`klsym.simulate.driver.stream_through`) gives
each chunk fresh copies (:meth:`Accumulator.empty`) on worker threads and merges them in block order,
so every statistic is bit-identical for any chunking and number of threads; a distributed sweep can
merge the same partials in the same order.

Statistics (``width`` = number of estimators, vectorised):

- :class:`Moments` -- count, mean and sum of squared deviations (Chan et al. 1979 pairwise update),
  of the values :math:`k` or of :math:`k^2`;
- :class:`Extremes` -- min, max, the number of negative and of non-finite values;
- :class:`Histogram` -- the approximate quantiles (float32 bit-pattern bins, see :func:`histogram_keys`);
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


class Accumulator:
    """Base class: subclasses define ``partials(chunk)`` (one per block), ``fold(partial)`` and ``result()``."""

    def __init__(self, *config):
        self._config = config
        self._partials: list = []

    def empty(self) -> "Accumulator":
        """A fresh accumulator with the same configuration."""
        return type(self)(*self._config)

    def partials(self, chunk) -> list:
        raise NotImplementedError

    def fold(self, partial) -> None:
        raise NotImplementedError

    def update(self, chunk) -> "Accumulator":
        """Add a chunk of RNG blocks (kept as per-block partials until merged)."""
        self._partials.extend(self.partials(chunk))
        return self

    def merge(self, other: "Accumulator") -> "Accumulator":
        """Fold ``other``'s blocks, which come after this accumulator's, into this one."""
        self._fold_pending()
        for partial in other._partials:
            self.fold(partial)
        return self

    def _fold_pending(self) -> None:
        pending, self._partials = self._partials, []
        for partial in pending:
            self.fold(partial)


# --- values ------------------------------------------------------------------------------------

def block_moments(xp, values):
    """Per-row (mean, M2) of a (rows, size) array, accumulated in float64."""
    size = values.shape[-1]
    means = values.sum(axis=-1, dtype=xp.float64) / size
    deviations = values - means[..., None]
    # a pairwise sum per row: the same bits whatever the number of rows (einsum's are not)
    return means, (deviations * deviations).sum(axis=-1)


class Moments(Accumulator):
    r"""Count, mean and sum of squared deviations of each estimator's values (``square``: of :math:`k^2`)."""

    def __init__(self, width: int, square: bool = False):
        super().__init__(width, square)
        self.width, self.square = width, square
        self.count = 0.0
        self.mean = np.zeros(width)
        self.m2 = np.zeros(width)


    def partials(self, chunk):
        xp, host = chunk.stream.xp, chunk.stream.backend.host
        stats = []
        for i in range(self.width):
            values = chunk.values(i)
            stats.append(block_moments(xp, values * values if self.square else values))
        means = host(xp.stack([m for m, _ in stats]))  # (width, rows)
        m2s = host(xp.stack([v for _, v in stats]))
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


class _PerChunk(Accumulator):
    """A statistic that is exact whatever the grouping (extremes, integer counts): one partial per chunk,
    ``summarise(xp, values)`` applied to each estimator's values."""

    def partials(self, chunk):
        xp = chunk.stream.xp
        return [chunk.stream.backend.host(xp.stack([self.summarise(xp, chunk.values(i)) for i in range(self.width)]))]


class Extremes(_PerChunk):
    """Min, max, and the counts of negative and of non-finite values, per estimator."""

    def __init__(self, width: int):
        super().__init__(width)
        self.width = width
        self.min = np.full(width, np.inf)
        self.max = np.full(width, -np.inf)
        self.negative = np.zeros(width)
        self.nonfinite = np.zeros(width)


    @staticmethod
    def summarise(xp, values):
        return xp.stack([values.min(), values.max(), xp.count_nonzero(values < 0),
                         values.size - xp.count_nonzero(xp.isfinite(values))])

    def fold(self, partial) -> None:
        self.min = np.minimum(self.min, partial[:, 0])
        self.max = np.maximum(self.max, partial[:, 1])
        self.negative += partial[:, 2]
        self.nonfinite += partial[:, 3]


def histogram_keys(xp, values):
    """Monotone bin index of each value: its float32 bit pattern cut to ``_HIST_BITS`` bits."""
    with np.errstate(over="ignore"):
        bits = values.astype(xp.float32).view(xp.int32)
    monotone = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # negative floats: reverse the magnitude order
    return ((monotone >> _HIST_SHIFT) + HIST_BINS // 2).ravel()


def _bin_edges(key: int) -> tuple[float, float]:
    monotone = np.array([(key - HIST_BINS // 2) << _HIST_SHIFT,
                         ((key - HIST_BINS // 2 + 1) << _HIST_SHIFT) - 1], dtype=np.int64)
    monotone = monotone.astype(np.int32)
    bits = monotone ^ ((monotone >> 31) & 0x7FFFFFFF)
    low, high = bits.view(np.float32).astype(np.float64)
    return (float(low), float(high)) if low <= high else (float(high), float(low))


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


class Histogram(_PerChunk):
    """Counts of the finite values in float32 bit-pattern bins (relative width :math:`2^{-7}`)."""

    def __init__(self, width: int):
        super().__init__(width)
        self.width = width
        self.counts = np.zeros((width, HIST_BINS), dtype=np.int64)


    @staticmethod
    def summarise(xp, values):
        finite = xp.isfinite(values)
        kept = values if bool(finite.all()) else values[finite]
        return xp.bincount(histogram_keys(xp, kept), minlength=HIST_BINS)

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
        self.moments = Moments(width)
        self.negative = np.zeros(width)


    def partials(self, chunk):
        xp, host = chunk.stream.xp, chunk.stream.backend.host
        per_block = chunk.t.shape[1] // self.batch_size
        means, m2s, negative = [], [], []
        for i in range(self.width):
            values = chunk.values(i)
            batches = values[:, :per_block * self.batch_size].reshape(chunk.rows, per_block, self.batch_size)
            batch_values = batches.mean(axis=-1, dtype=xp.float64)
            if per_block:
                batch_means, batch_m2s = block_moments(xp, batch_values)
            else:
                batch_means = batch_m2s = xp.zeros(chunk.rows)
            means.append(batch_means)
            m2s.append(batch_m2s)
            negative.append((batch_values < 0).sum())
        means, m2s, negative = host(xp.stack(means)), host(xp.stack(m2s)), host(xp.stack(negative))
        return [(size // self.batch_size, means[:, row], m2s[:, row], negative if row == 0 else 0)
                for row, size in enumerate(chunk.sizes)]

    def fold(self, partial) -> None:
        count, mean, m2, negative = partial
        self.moments.fold((count, mean, m2))
        self.negative = self.negative + negative

    @property
    def count(self) -> float:
        self._fold_pending()
        return self.moments.count


# --- gradients ---------------------------------------------------------------------------------

class GradientSums(Accumulator):
    r"""Sums of the per-sample gradients :math:`w(t)\, s(x)` and of their squares, per (estimator, mode).

    Gaussian: one einsum per block. Categorical: the score w.r.t. the logits is :math:`e_x - q`, so the
    sums are kept as per-token sums of :math:`w` and :math:`w^2` (``bincount``; no n x V matrix) plus
    :math:`\sum w` and :math:`\sum w^2`.
    """

    def __init__(self, width: int, modes, size: int, categorical: bool):
        super().__init__(width, modes, size, categorical)
        self.width, self.modes, self.size, self.categorical = width, tuple(modes), size, categorical
        labels = width * len(self.modes)
        self.sums = np.zeros((labels, size))
        self.squares = np.zeros((labels, size))
        self.weight_sums = np.zeros((labels, 2))  # categorical: sum w, sum w^2


    def _weights(self, chunk):
        for i in range(self.width):
            weights = chunk.weights(i, self.modes)
            for mode in self.modes:
                yield weights[mode]

    def partials(self, chunk):
        xp, host = chunk.stream.xp, chunk.stream.backend.host
        if not self.categorical:
            score = chunk.score()  # (params, rows, size)
            score_squared = score * score
            firsts, seconds = [], []
            for w in self._weights(chunk):  # one block at a time: the bits do not depend on the chunk
                squared = w * w
                firsts.append(xp.stack([xp.einsum("n,pn->p", w[row], score[:, row], dtype=xp.float64)
                                        for row in range(chunk.rows)], axis=-1))
                seconds.append(xp.stack([xp.einsum("n,pn->p", squared[row], score_squared[:, row],
                                                   dtype=xp.float64) for row in range(chunk.rows)], axis=-1))
            firsts, seconds = host(xp.stack(firsts)), host(xp.stack(seconds))
            return [(firsts[:, :, row], seconds[:, :, row]) for row in range(chunk.rows)]
        ws = xp.stack(list(self._weights(chunk)))  # (labels, rows, size); categorical runs are small
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
        if self.categorical:
            means = (self.sums - probs * self.weight_sums[:, :1]) / n
            second = ((1.0 - 2.0 * probs) * self.squares + probs * probs * self.weight_sums[:, 1:]) / n
        else:
            means, second = self.sums / n, self.squares / n
        variance = np.maximum(second - means * means, 0.0) * (n / max(n - 1, 1))
        return means, np.sqrt(variance / n)


class TrialGradients(Accumulator):
    r"""One gradient estimate per block (a trial of ``n`` samples): the block mean of :math:`w\, s`."""

    def __init__(self, width: int, modes, size: int, categorical: bool, trials: int):
        super().__init__(width, modes, size, categorical, trials)
        self.width, self.modes, self.size, self.categorical = width, tuple(modes), size, categorical
        self.trials = trials
        self.result = np.zeros((width * len(self.modes), trials, size))
        self._next = 0


    def partials(self, chunk):
        xp, host = chunk.stream.xp, chunk.stream.backend.host
        n, rows = chunk.t.shape[1], chunk.rows
        weights = [chunk.weights(i, self.modes)[mode] for i in range(self.width) for mode in self.modes]
        if not self.categorical:
            score = chunk.score()  # (params, rows, n)
            means = [xp.einsum("rn,prn->rp", w, score, dtype=xp.float64) / n for w in weights]
            return [host(xp.stack(means))]
        offsets = chunk.data + (xp.arange(rows)[:, None] * self.size)
        probs = xp.asarray(chunk.stream.sampler.probs)
        out = []
        for w in weights:
            w = w.astype(xp.float64)
            counts = xp.bincount(offsets.ravel(), weights=w.ravel(), minlength=rows * self.size)
            out.append((counts.reshape(rows, self.size) - w.sum(axis=-1)[:, None] * probs) / n)
        return [host(xp.stack(out))]  # trials are independent: no arithmetic across blocks

    def fold(self, partial) -> None:
        rows = partial.shape[1]
        self.result[:, self._next:self._next + rows] = partial
        self._next += rows


__all__ = ["Accumulator", "Moments", "Extremes", "Histogram", "BatchSpread", "GradientSums", "TrialGradients",
           "block_moments", "histogram_keys", "quantiles_from_histogram", "HIST_BINS"]
