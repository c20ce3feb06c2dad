r"""Compiled (numba) kernels of the NumPy engine: the same numbers as the array code, fewer passes over memory.

Each kernel does in one loop what the array code of :mod:`klsym.simulate.driver` and
:mod:`klsym.simulate.accumulators` does in several NumPy calls, with the same floating-point
operations in the same order, so its results are **bit-identical** to that code (tests compare them
on many pairs and seeds). The draws come from the block's own ``numpy.random.Generator``: numba's
``standard_normal`` and ``random`` run NumPy's algorithms (ziggurat, 53-bit doubles) on the same
PCG64 state, about three times faster than NumPy's per-call C path because they are inlined (5 against
17 ns a sample here); for normals and categorical draws the PCG64 step is inlined too (:func:`_on_pcg64`:
its 128-bit multiply as LLVM ``i128`` arithmetic, the state in registers), another 15-20 %. Estimator values
are not compiled: NumPy's AVX-512 ``expm1``/``log1p`` (2.5-3.6 ns) beat the scalar libm calls of a compiled
loop (22-24 ns). What is fused: the draws, the t-histogram, the Taylor index (:func:`near_zero`), and the
reduction of each estimator's values (:func:`value_summary`: mean, squared deviations, extremes and batch
means in two passes instead of eight NumPy calls), whose sums follow
:func:`klsym.simulate.accumulators.lane_sums`, an order LLVM vectorises without reassociating anything.

numba is imported by this module only, and this module only where the NumPy engine draws (the
driver falls back to the array code, which is also what the CuPy backend runs, where numba cannot be
imported). Compiled code is cached on disk by numba (``cache=True``: ``__pycache__`` next to this
file, or ``$NUMBA_CACHE_DIR``), so a process pays the compilation once per machine.
"""

from __future__ import annotations

import threading
from functools import cache

import numba
import numpy as np
from llvmlite import ir
from numba.extending import intrinsic
from numba.np.random._constants import fi_double, ki_double, wi_double, ziggurat_nor_inv_r, ziggurat_nor_r

_jit = numba.njit(nogil=True, cache=True)


@_jit
def _standard_normals(generator, out):
    # the ziggurat branches keep this loop scalar: nothing else is done in it
    for i in range(out.size):
        out[i] = generator.standard_normal()


#: PCG64's multiplier (NumPy's ``PCG_DEFAULT_MULTIPLIER_128``).
PCG64_MULTIPLIER = 0x2360ED051FC65DA44385DF649FCCF645
_U64 = np.uint64


@intrinsic
def _pcg64_step(typingctx, high, low, increment_high, increment_low):
    # (high, low) <- (high, low) * PCG64_MULTIPLIER + (increment_high, increment_low) mod 2^128, in LLVM's i128
    signature = numba.types.UniTuple(numba.types.uint64, 2)(*[numba.types.uint64] * 4)

    def codegen(context, builder, sig, args):
        i128, i64 = ir.IntType(128), ir.IntType(64)

        def join(h, lo):
            return builder.or_(builder.shl(builder.zext(h, i128), ir.Constant(i128, 64)), builder.zext(lo, i128))

        state = builder.add(
            builder.mul(join(args[0], args[1]), ir.Constant(i128, PCG64_MULTIPLIER)), join(args[2], args[3])
        )
        parts = [builder.trunc(builder.lshr(state, ir.Constant(i128, 64)), i64), builder.trunc(state, i64)]
        return context.make_tuple(builder, sig.return_type, parts)

    return signature, codegen


@_jit
def _pcg64_output(high, low):
    # PCG64's XSL-RR output of a state
    mixed = high ^ low
    rotation = high >> _U64(58)
    return (mixed >> rotation) | (mixed << ((_U64(64) - rotation) & _U64(63)))


@_jit
def _pcg64_double(high, low, increment_high, increment_low):
    # NumPy's pcg64_next_double: the next state, and its 53 high bits as a double in [0, 1)
    high, low = _pcg64_step(high, low, increment_high, increment_low)
    return high, low, np.float64(_pcg64_output(high, low) >> _U64(11)) * (1.0 / 9007199254740992.0)


@_jit
def _pcg64_standard_normals(state, out):
    # NumPy's random_standard_normal (the 256-layer ziggurat) on inlined PCG64 draws, state = [high, low,
    # increment high, increment low] (updated): the state stays in registers, no call through the bit
    # generator's function pointer
    high, low, increment_high, increment_low = state[0], state[1], state[2], state[3]
    for i in range(out.size):
        while True:
            high, low = _pcg64_step(high, low, increment_high, increment_low)
            r = _pcg64_output(high, low)
            layer = np.int64(r & _U64(0xFF))
            r >>= _U64(8)
            magnitude = (r >> _U64(1)) & _U64(0x000FFFFFFFFFFFFF)
            x = np.float64(magnitude) * wi_double[layer]
            if r & _U64(1):
                x = -x
            if magnitude < ki_double[layer]:
                break
            if layer == 0:  # the tail beyond ziggurat_nor_r
                while True:
                    high, low, u = _pcg64_double(high, low, increment_high, increment_low)
                    high, low, v = _pcg64_double(high, low, increment_high, increment_low)
                    xx = -ziggurat_nor_inv_r * np.log1p(-u)
                    yy = -np.log1p(-v)
                    if yy + yy > xx * xx:
                        break
                x = -(ziggurat_nor_r + xx) if (magnitude >> _U64(8)) & _U64(1) else ziggurat_nor_r + xx
                break
            high, low, u = _pcg64_double(high, low, increment_high, increment_low)
            if (fi_double[layer - 1] - fi_double[layer]) * u + fi_double[layer] < np.exp(-0.5 * x * x):
                break
        out[i] = x
    state[0], state[1] = high, low


def _on_pcg64(generator, inlined, through_generator, *args) -> None:
    """``inlined(state, *args)`` on ``generator``'s PCG64 state (four uint64 words, written back afterwards), or
    ``through_generator(generator, *args)`` for another bit generator: the same numbers either way."""
    bit_generator = generator.bit_generator
    if type(bit_generator) is not np.random.PCG64:
        through_generator(generator, *args)
        return
    state = bit_generator.state
    words, mask = state["state"], (1 << 64) - 1
    packed = np.array([words["state"] >> 64, words["state"] & mask, words["inc"] >> 64, words["inc"] & mask], _U64)
    inlined(packed, *args)
    words["state"] = (int(packed[0]) << 64) | int(packed[1])
    bit_generator.state = state


def standard_normals(generator, out: np.ndarray) -> None:
    """Fill ``out`` with ``generator.standard_normal(out.size)``'s numbers, advancing ``generator`` the same way
    (for NumPy's PCG64 on the inlined sampler, else through numba's ``Generator``)."""
    _on_pcg64(generator, _pcg64_standard_normals, _standard_normals, out)


@_jit
def _gaussian_log_ratio(z, x, t, mu_q, sigma_q, log_sigma_ratio, sigma_gap, mu_gap, sigma_p):
    # x = mu_q + sigma_q z and t as klsym.exact.families.log_ratio computes it, operation for operation.
    # Loops without branches over distinct arrays: LLVM vectorises them, divisions included (2x faster).
    # x is kept only where it has room (an empty x: the samples are not needed, only their log-ratios)
    if x.size == t.size:
        for i in range(t.size):
            x[i] = mu_q + sigma_q * z[i]
    for i in range(t.size):
        centred = (mu_q + sigma_q * z[i]) - mu_q
        difference = (centred * sigma_gap + mu_gap) / sigma_p
        t[i] = log_sigma_ratio + 0.5 * difference * (2 * (centred / sigma_q) - difference)


@_jit
def _inverse_cdf(cdf, last_token, u):
    # the first cdf entry > u (searchsorted side="right"), capped at the last token
    low, high = 0, cdf.size
    while low < high:
        middle = (low + high) >> 1
        if cdf[middle] <= u:
            low = middle + 1
        else:
            high = middle
    return min(low, last_token)


@_jit
def _categorical_row(generator, cdf, last_token, table, tokens, t):
    for i in range(t.size):
        tokens[i] = token = _inverse_cdf(cdf, last_token, generator.random())
        t[i] = table[token]


@_jit
def _pcg64_categorical_row(state, cdf, last_token, table, tokens, t):
    # _categorical_row on inlined PCG64 doubles (NumPy's Generator.random)
    high, low, increment_high, increment_low = state[0], state[1], state[2], state[3]
    for i in range(t.size):
        high, low, u = _pcg64_double(high, low, increment_high, increment_low)
        tokens[i] = token = _inverse_cdf(cdf, last_token, u)
        t[i] = table[token]
    state[0], state[1] = high, low


@_jit
def _count_keys(patterns, bits, counts, marks):
    # klsym.simulate.accumulators.histogram_keys (float32 bit pattern, made monotone, cut to `bits` bits),
    # counted in `counts`, each group of 64 keys met marked in `marks` (both all zero on entry and on exit);
    # returns the keys met, in increasing order, and their counts
    for i in range(patterns.size):
        p = np.int64(patterns[i])
        key = ((p ^ ((p >> 31) & 0x7FFFFFFF)) >> (32 - bits)) + (1 << (bits - 1))
        counts[key] += 1
        marks[key >> 6] = 1  # no branch in this loop: a test of counts[key] here costs twice the loop
    met = 0
    for group in range(marks.size):
        if marks[group]:
            for key in range(group << 6, min((group + 1) << 6, counts.size)):
                met += counts[key] != 0
    keys = np.empty(met, dtype=np.int64)
    found = np.empty(met, dtype=np.int64)
    j = 0
    for group in range(marks.size):
        if marks[group]:
            marks[group] = 0
            for key in range(group << 6, min((group + 1) << 6, counts.size)):
                if counts[key]:
                    keys[j], found[j] = key, counts[key]
                    counts[key] = 0
                    j += 1
    return keys, found


@_jit
def _near_zero(t, radius, found):
    count = 0
    for i in range(t.size):
        if abs(t[i]) < radius:  # rare: a predictable branch
            found[count] = i
            count += 1
    return count


def near_zero(t: np.ndarray, radius: float) -> np.ndarray:
    """Flat indices of the elements of ``t`` with ``|t| < radius``, as ``numpy.flatnonzero(abs(t) < radius)``
    gives them, in one pass without temporaries (:func:`klsym.derive.generated.near_zero`)."""
    found = _thread_buffer("near_zero", t.size, np.intp)
    return found[: _near_zero(np.ascontiguousarray(t).reshape(-1), radius, found)].copy()


#: Lanes of klsym's summation (:func:`klsym.simulate.accumulators.lane_sums`): element i goes to lane i mod LANES.
LANES = 128


@_jit
def _lane_total(lanes):
    # the LANES lanes as lane_sums adds them (NumPy's sum of 128 contiguous values): accumulator k takes
    # lanes k, k + 8, ... in order, then a fixed tree, then added to 0
    acc = lanes[:8].copy()
    for i in range(8, lanes.size, 8):
        for k in range(8):
            acc[k] += lanes[i + k]
    return 0.0 + (((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7])))


@_jit
def _lane_sum(v):
    lanes = np.zeros(LANES)
    full = v.size - v.size % LANES
    rows = v[:full].reshape(-1, LANES)
    for r in range(rows.shape[0]):
        row = rows[r]
        for j in range(LANES):  # over the lanes of one row: LLVM vectorises it, no reassociation needed
            lanes[j] += row[j]
    for j in range(v.size - full):
        lanes[j] += v[full + j]
    return _lane_total(lanes)


@_jit
def _sum_min_max(v, batch, batch_sums):
    # the lane sum, min and max of v, and the lane sum of each of its batch_sums.size batches of `batch`;
    # min and max are exact where v holds no NaN (the caller looks at them only where the sum is finite).
    # The loop bodies are written out for whole rows and for the tail: a shared helper looping over a row of
    # run-time length takes twice as long (LLVM vectorises the constant LANES trip count far better).
    lanes = np.zeros(LANES)
    low = np.full(LANES, np.inf)
    high = np.full(LANES, -np.inf)
    done = 0
    if batch % LANES == 0:  # whole rows: a batch's lanes are added up in the same pass
        part = np.empty(LANES)
        for b in range(batch_sums.size):
            part[:] = 0.0
            rows = v[done : done + batch].reshape(-1, LANES)
            for r in range(rows.shape[0]):
                row = rows[r]
                for j in range(LANES):
                    x = row[j]
                    lanes[j] += x
                    part[j] += x
                    low[j] = min(low[j], x)
                    high[j] = max(high[j], x)
            batch_sums[b] = _lane_total(part)
            done += batch
    else:  # batches that split rows (a batch size that is not a multiple of LANES): a pass of their own
        for b in range(batch_sums.size):
            batch_sums[b] = _lane_sum(v[b * batch : (b + 1) * batch])
    full = v.size - v.size % LANES
    rows = v[done:full].reshape(-1, LANES)
    for r in range(rows.shape[0]):
        row = rows[r]
        for j in range(LANES):
            x = row[j]
            lanes[j] += x
            low[j] = min(low[j], x)
            high[j] = max(high[j], x)
    for j in range(v.size - full):
        x = v[full + j]
        lanes[j] += x
        low[j] = min(low[j], x)
        high[j] = max(high[j], x)
    return _lane_total(lanes), low.min(), high.max()


@_jit
def _squared_deviations(v, mean, count_negative):
    # the lane sum of (v - mean)^2 (no fused multiply-add: the array code's bits), and the number of v < 0
    lanes = np.zeros(LANES)
    negative = np.zeros(LANES)
    full = v.size - v.size % LANES
    rows = v[:full].reshape(-1, LANES)
    if count_negative:
        for r in range(rows.shape[0]):
            row = rows[r]
            for j in range(LANES):
                x = row[j]
                deviation = x - mean
                lanes[j] += deviation * deviation
                negative[j] += x < 0
    else:
        for r in range(rows.shape[0]):
            row = rows[r]
            for j in range(LANES):
                deviation = row[j] - mean
                lanes[j] += deviation * deviation
    for j in range(v.size - full):
        x = v[full + j]
        deviation = x - mean
        lanes[j] += deviation * deviation
        negative[j] += x < 0
    return _lane_total(lanes), negative.sum() if count_negative else 0.0


@_jit
def _summarise_rows(values, batch, out, batch_sums):
    for row in range(values.shape[0]):
        v = values[row]
        total, low, high = _sum_min_max(v, batch, batch_sums[row])
        mean = total / v.size
        m2, negative = _squared_deviations(v, mean, low < 0)
        # -0.0 + 0.0 = 0.0: the sign of a zero min or max is the array code's whatever the order of comparisons
        out[row, 0], out[row, 1], out[row, 2], out[row, 3] = mean, m2, low + 0.0, high + 0.0
        out[row, 4], out[row, 5] = negative, 0.0


def value_summary(values: np.ndarray, batch: int | None):
    r"""``(stats, batch_sums)`` of each row of a (rows, size) float64 array in two passes: ``stats`` (rows, 6)
    holds the mean, the sum of squared deviations from it (both :func:`klsym.simulate.accumulators.lane_sums`),
    the min, the max, the number of negative and of non-finite (0) values; ``batch_sums`` (rows, size // batch)
    the lane sums of consecutive batches. Min, max and the counts hold only for rows whose mean is finite (no
    inf, no NaN): :class:`klsym.simulate.accumulators.ValueSummary` recounts the others.
    """
    rows, size = values.shape
    out = np.empty((rows, 6))
    batch_sums = np.empty((rows, size // batch if batch else 0))
    _summarise_rows(np.ascontiguousarray(values), batch or LANES, out, batch_sums)
    return out, batch_sums


_scratch = threading.local()  # per worker thread: the kernels run without the GIL


def _thread_buffer(name: str, size: int, dtype, zeroed: bool = False) -> np.ndarray:
    """This thread's scratch array ``name`` of ``size`` elements, reused from call to call (a ``zeroed`` one
    is all zeros when made, and its users leave it so)."""
    buffer = getattr(_scratch, name, None)
    if buffer is None or buffer.size < size or (zeroed and buffer.size != size):
        buffer = np.zeros(size, dtype=dtype) if zeroed else np.empty(size, dtype=dtype)
        setattr(_scratch, name, buffer)
    return buffer[:size]


def log_ratio_histogram(t: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    r"""``(keys, counts)``: the bit-pattern keys met among the ``t``, in increasing order, and how many of
    each, as :class:`klsym.simulate.accumulators.LogRatioHistogram` bins them.

    A block's keys span about 10^5 bins (those between its smallest and largest log-ratio, the subnormal
    float32 numbers around 0 included) but it meets only a few thousand: counting them in a zeroed
    per-thread table, with a mark per group of 64 keys, and returning only those keeps a partial small.
    """
    table = _thread_buffer("counts", 1 << bits, np.int64, zeroed=True)  # zero again after each call
    marks = _thread_buffer("marks", -(-(1 << bits) // 64), np.uint8, zeroed=True)
    with np.errstate(over="ignore"):  # beyond float32: the inf bins
        patterns = t.astype(np.float32).reshape(-1).view(np.int32)  # vectorised; a scalar cast in the loop is slower
    return _count_keys(patterns, bits, table, marks)


def gaussian_draw(generators, size: int, q, p, keep_samples: bool = True):
    r"""``(t, x)`` as ``(rows, size)`` float64 arrays, row ``i`` drawn from ``generators[i]``: the same
    bits as ``q.mu + q.sigma * g.standard_normal(size)`` and :func:`klsym.exact.families.log_ratio`.
    Without ``keep_samples``, x is not stored (``None``): one write pass less where only t is used.

    >>> from klsym.exact.families import Gaussian, log_ratio
    >>> q, p = Gaussian(0.0, 1.0), Gaussian(1.0, 1.5)
    >>> t, x = gaussian_draw([np.random.default_rng(5)], 1000, q, p)
    >>> bool((x[0] == np.random.default_rng(5).standard_normal(1000)).all() and (t == log_ratio(p, q, x)).all())
    True
    """
    from klsym.exact.families import _log_sigma_ratio

    x = np.empty((len(generators), size if keep_samples else 0))
    t = np.empty((len(generators), size))
    constants = (
        float(q.mu),
        float(q.sigma),
        float(_log_sigma_ratio(q.sigma, p.sigma)),
        float((p.sigma - q.sigma) / q.sigma),
        float(p.mu - q.mu),
        float(p.sigma),
    )
    z = _thread_buffer("normals", size, np.float64)
    for row, generator in enumerate(generators):
        standard_normals(generator, z)
        _gaussian_log_ratio(z, x[row], t[row], *constants)
    return t, (x if keep_samples else None)


def categorical_draw(generators, size: int, cdf: np.ndarray, last_token: int, table: np.ndarray):
    r"""``(t, tokens)`` as ``(rows, size)`` arrays: the same as ``searchsorted(cdf, g.random(size), "right")``
    capped at ``last_token``, and ``table[tokens]`` (float64 table).

    >>> cdf = np.cumsum([0.5, 0.3, 0.2]); table = np.log([0.2, 0.2, 0.6]) - np.log([0.5, 0.3, 0.2])
    >>> t, tokens = categorical_draw([np.random.default_rng(3)], 100, cdf, 2, table)
    >>> expected = np.minimum(np.searchsorted(cdf, np.random.default_rng(3).random(100), side="right"), 2)
    >>> bool((tokens[0] == expected).all() and (t[0] == table[expected]).all())
    True
    """
    tokens = np.empty((len(generators), size), dtype=np.intp)
    t = np.empty((len(generators), size), dtype=table.dtype)
    for row, generator in enumerate(generators):
        _on_pcg64(generator, _pcg64_categorical_row, _categorical_row, cdf, last_token, table, tokens[row], t[row])
    return t, tokens


@cache
def warm_up() -> None:
    """Load (or compile) every kernel now, outside any timing and before worker threads need them."""
    from klsym.exact.families import Gaussian

    generator = np.random.default_rng(0)
    gaussian_draw([generator], 8, Gaussian(0.0, 1.0), Gaussian(1.0, 1.0))
    categorical_draw([generator], 8, np.array([0.5, 1.0]), 1, np.array([0.0, 1.0]))
    log_ratio_histogram(np.zeros(8), 18)
    standard_normals(generator, np.empty(8))
    near_zero(np.zeros((1, 8)), 1e-3)
    value_summary(np.zeros((1, 8)), 4)
    value_summary(np.zeros((1, 3 * LANES)), LANES)
