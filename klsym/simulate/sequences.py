r"""Monte Carlo for autoregressive sequences: per-placement gradient estimates, streamed in constant memory.

Sequences :math:`y \sim q` are drawn token by token (inverse CDF of :math:`q(\cdot|y_{<t})`, one uniform per
position) in the engine's reproducible blocks: block ``b`` holds :data:`klsym.simulate.backend.NUMPY_BLOCK`
sequences from ``SeedSequence(seed, spawn_key=(b,))``; worker threads reduce blocks, and the reductions are added
in block order, so a result depends only on ``(seed, n)`` (not on ``chunk`` or the number of threads). Memory is
the accumulators (two per placement of size P V, two of size P) plus a few blocks, whatever ``n``.

Per sequence, the gradient of a placement is :math:`\sum_t w_t(y)\, s_t` with :math:`s_t = e_{(u_t, y_t)} -
q(\cdot|u_t)` in row :math:`u_t = y_{<t}` (weights :math:`w_t` in :mod:`klsym.rl.sequences`); a block is reduced to
:math:`\sum w` and :math:`\sum w^2` per (prefix, token) and per prefix, from which the mean and the per-coordinate
standard error follow (each sequence visits one row per depth, so coordinates of one row never mix positions).

>>> from klsym.exact.autoregressive import Autoregressive
>>> p = Autoregressive.random(2, 2, seed=0); q = p.perturbed(0.5, seed=1)
>>> out = gradient(q, p, "k1", n=20_000, seed=0, placements="reward-to-go")
>>> out["gradients"]["k1"]["reward-to-go"]["mean"].shape
(6,)
"""

from __future__ import annotations

import math
import os
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from klsym.derive.estimators import Estimator, get_estimators
from klsym.exact.autoregressive import Autoregressive, log_ratio
from klsym.rl.sequences import ALL_PLACEMENTS, _check_placements, sequence_summary
from klsym.simulate.backend import NUMPY_BLOCK, get_backend
from klsym.simulate.montecarlo import z_score

#: A coordinate's z counts in ``crosscheck`` only when its prefix was visited this often (CLT regime).
MIN_VISITS = 100
#: Sequences one worker task processes (whole RNG blocks); results do not depend on it.
DEFAULT_CHUNK = 1 << 16


def _positive_integer(value, what: str) -> int:
    if (
        isinstance(value, (bool, np.bool_))
        or not isinstance(value, (int, np.integer, float))
        or value != int(value)
        or value < (0 if what == "seed" else 1)
    ):
        kind = "a non-negative" if what == "seed" else "a positive"
        raise ValueError(f"{what} must be {kind} integer, got {value!r}")
    return int(value)


def _blocks(n: int, chunk: int):
    """Tasks: lists of (block index, block size); block b holds NUMPY_BLOCK sequences (the last may be short)."""
    per_task = max(1, chunk // NUMPY_BLOCK)
    sizes = [(b, min(NUMPY_BLOCK, n - b * NUMPY_BLOCK)) for b in range(-(-n // NUMPY_BLOCK))]
    for start in range(0, len(sizes), per_task):
        yield sizes[start : start + per_task]


def _stream_blocks(work, merge, n: int, chunk: int, threads: int | None) -> None:
    """``work(task)`` on worker threads, ``merge(result)`` in block order, at most 2 x threads tasks in flight."""
    workers = max(1, threads or min(os.cpu_count() or 1, 8))
    with ThreadPoolExecutor(workers) as pool:
        pending = deque()
        for task in _blocks(n, chunk):
            pending.append(pool.submit(work, task))
            while len(pending) > 2 * workers:
                merge(pending.popleft().result())
        while pending:
            merge(pending.popleft().result())


def sample(q: Autoregressive, generator: np.random.Generator, n: int):
    r"""``n`` sequences from q, token by token: (tokens, rows, alive), each (n, T) (``rows[:, t]`` = row of
    :math:`y_{<t}`; ``alive[:, t]`` False after the sequence's EOS, where tokens are padding). Token t is
    :math:`\#\{a : \text{cdf}(a | y_{<t}) \le u_t\}` for a uniform :math:`u_t`."""
    vocab, horizon = q.vocab_size, q.horizon
    cdf = np.cumsum(q.probs, axis=-1)
    uniforms = generator.random((n, horizon))
    tokens = np.empty((n, horizon), dtype=np.int64)
    rows = np.empty((n, horizon), dtype=np.int64)
    index = np.zeros(n, dtype=np.int64)  # the prefix's rank among the prefixes of its length
    for position in range(horizon):
        rows[:, position] = q.offsets[position] + index
        drawn = np.sum(cdf[rows[:, position]] <= uniforms[:, position, None], axis=-1)
        tokens[:, position] = np.minimum(drawn, vocab - 1)  # u past a rounded cdf[-1]
        index = index * vocab + tokens[:, position]
    alive = np.ones((n, horizon), dtype=bool)
    if q.eos is not None:  # positions after the first EOS are padding
        alive[:, 1:] = np.cumsum(tokens == q.eos, axis=1)[:, :-1] == 0
    return tokens, rows, alive


def _placement_weights(estimator: Estimator, log_ratios: np.ndarray, alive: np.ndarray, placements):
    """Yield (placement, w) with w of shape (n, T): the weight of each token's score (0 on padding)."""
    value = np.asarray(estimator.numeric(log_ratios), dtype=np.float64) * alive
    pathwise = -np.asarray(estimator.numeric_dt(log_ratios), dtype=np.float64) * alive
    to_go = np.cumsum(value[:, ::-1], axis=1)[:, ::-1]
    total = np.sum(log_ratios * alive, axis=1, keepdims=True)
    for name in placements:
        if name.startswith("sequence-ratio-"):
            mode = name.removeprefix("sequence-ratio-")
            whole = 0.0
            if mode in ("loss", "full"):
                whole = whole - np.asarray(estimator.numeric_dt(total), dtype=np.float64)
            if mode in ("reward", "full"):
                whole = whole + np.asarray(estimator.numeric(total), dtype=np.float64)
            yield name, whole * alive
        else:
            yield (
                name,
                {
                    "loss": lambda: pathwise,
                    "reward": lambda: value,
                    "reward-to-go": lambda: to_go,
                    "sequence-reward": lambda: value.sum(axis=1, keepdims=True) * alive,
                    "full": lambda: pathwise + to_go,
                    "loss+reward": lambda: pathwise + value,
                }[name](),
            )


def gradient(
    q: Autoregressive,
    p: Autoregressive,
    estimators="k1,k2,k3",
    n: int = 200_000,
    seed: int = 0,
    *,
    placements=None,
    chunk: int = DEFAULT_CHUNK,
    threads: int | None = None,
) -> dict:
    r"""Monte Carlo mean and standard error of every placement's gradient (flat, length P V).

    Returns
    -------
    dict
        ``n, seed, seconds, block_size``, ``visits`` (sequences through each prefix, length P),
        ``kl`` {``KL(q||p)``: {mean, se}} (the per-sequence sum of k1) and
        ``gradients: {estimator: {placement: {"mean", "se"}}}``.
    """
    q.check_pair(p)
    placements = _check_placements(ALL_PLACEMENTS if placements is None else placements)
    estimators = (
        get_estimators(estimators)
        if isinstance(estimators, str)
        else [e if isinstance(e, Estimator) else get_estimators([e])[0] for e in estimators]
    )
    if not estimators:
        raise ValueError("no estimators given")
    n, seed = _positive_integer(n, "n"), _positive_integer(seed, "seed")
    backend = get_backend("numpy")
    labels = [(e.name, name) for e in estimators for name in placements]
    width, n_rows = q.size, q.n_prefixes
    sums = np.zeros((len(labels), 2, width))  # sum w, sum w^2 per (prefix, token)
    row_sums = np.zeros((len(labels), 2, n_rows))  # sum w, sum w^2 per prefix
    visits = np.zeros(n_rows)
    kl = np.zeros(2)  # sum and sum of squares of sum_t k1_t
    token_t = log_ratio(q, p)  # the exact side's log-ratios (no cancellation near q = p)

    def work(blocks):
        reduced = []
        for block, size in blocks:
            tokens, rows, alive = sample(q, backend.generator(seed, block), size)
            cells = rows * q.vocab_size + tokens
            log_ratios = token_t[rows, tokens]
            cell_keys, cell_index = np.unique(cells, return_inverse=True)
            row_keys, row_index = np.unique(rows, return_inverse=True)
            cell_index, row_index = cell_index.ravel(), row_index.ravel()
            per_label = []
            for estimator in estimators:
                for _, w in _placement_weights(estimator, log_ratios, alive, placements):
                    w = np.ascontiguousarray(w).ravel()
                    squared = w * w
                    per_label.append(
                        (
                            np.bincount(cell_index, w, cell_keys.size),
                            np.bincount(cell_index, squared, cell_keys.size),
                            np.bincount(row_index, w, row_keys.size),
                            np.bincount(row_index, squared, row_keys.size),
                        )
                    )
            penalty = -np.sum(log_ratios * alive, axis=1)
            visited = np.bincount(row_index, alive.ravel().astype(np.float64), row_keys.size)
            reduced.append(
                (cell_keys, row_keys, visited, per_label, (float(penalty.sum()), float(np.dot(penalty, penalty))))
            )
        return reduced

    def merge(reduced):
        for cell_keys, row_keys, counts, per_label, penalty in reduced:  # block order
            visits[row_keys] += counts
            for i, (s1, s2, r1, r2) in enumerate(per_label):
                sums[i, 0, cell_keys] += s1
                sums[i, 1, cell_keys] += s2
                row_sums[i, 0, row_keys] += r1
                row_sums[i, 1, row_keys] += r2
            kl[:] += penalty

    started = time.perf_counter()
    _stream_blocks(work, merge, n, chunk, threads)
    seconds = time.perf_counter() - started
    probs = q.probs.ravel()
    prefix_of_cell = np.repeat(np.arange(n_rows), q.vocab_size)
    out: dict = {}
    for i, (name, placement) in enumerate(labels):
        # g_(u,b) = w (1[y = b] - q_b) on the sequences through u: sum g^2 = (1 - 2 q_b) S2 + q_b^2 R2
        mean = (sums[i, 0] - probs * row_sums[i, 0, prefix_of_cell]) / n
        second = ((1.0 - 2.0 * probs) * sums[i, 1] + probs * probs * row_sums[i, 1, prefix_of_cell]) / n
        variance = np.maximum(second - mean * mean, 0.0) * (n / max(n - 1, 1))
        out.setdefault(name, {})[placement] = {"mean": mean, "se": np.sqrt(variance / n)}
    kl_mean = kl[0] / n
    kl_se = math.sqrt(max(kl[1] / n - kl_mean**2, 0.0) * (n / max(n - 1, 1)) / n)
    return {
        "n": n,
        "seed": seed,
        "seconds": seconds,
        "block_size": NUMPY_BLOCK,
        "visits": visits,
        "kl": {"KL(q||p)": {"mean": kl_mean, "se": kl_se}},
        "gradients": out,
    }


def crosscheck(
    q: Autoregressive,
    p: Autoregressive,
    estimators="k1,k2,k3",
    n: int = 200_000,
    seed: int = 0,
    *,
    placements=None,
    z_limit: float = 5.0,
    exact: dict | None = None,
    **options,
) -> dict:
    r"""z-scores of the Monte Carlo gradients against the exact ones (:func:`klsym.rl.sequences.sequence_summary`).

    A coordinate counts where its prefix had at least :data:`MIN_VISITS` sequences and a positive standard error
    (logits are finite, so every weight is bounded and the CLT applies); the sequence KL(q||p) (mean of
    :math:`\sum_t k_{1,t}`) is checked too.

    Returns
    -------
    dict
        ``n, seed, seconds, z_limit, passed, max_abs_z, checked`` (coordinates counted), ``kl`` {KL(q||p): {mc, se,
        exact, z}} and ``estimators: {name: {placement: {gradient, se, max_abs_z}}}``.
    """
    placements = ALL_PLACEMENTS if placements is None else placements
    if exact is None:
        exact = sequence_summary(q, p, estimators, placements)
    sampled = gradient(q, p, estimators, n, seed, placements=placements, **options)
    visited = np.repeat(sampled["visits"] >= MIN_VISITS, q.vocab_size)
    out = {
        "n": sampled["n"],
        "seed": sampled["seed"],
        "seconds": sampled["seconds"],
        "z_limit": z_limit,
        "min_visits": MIN_VISITS,
        "estimators": {},
    }
    counted = []
    for name, by_placement in sampled["gradients"].items():
        entry = out["estimators"][name] = {}
        for placement, mc in by_placement.items():
            z = z_score(mc["mean"], exact["estimators"][name][placement]["gradient"], mc["se"])
            mask = visited & (mc["se"] > 0)
            counted.append(z[mask])
            entry[placement] = {
                "gradient": mc["mean"],
                "se": mc["se"],
                "max_abs_z": float(np.max(np.abs(z[mask]))) if mask.any() else 0.0,
            }
    kl = sampled["kl"]["KL(q||p)"]
    kl_z = float(z_score(kl["mean"], exact["kl"]["KL(q||p)"], kl["se"]))
    out["kl"] = {"KL(q||p)": {"mc": kl["mean"], "se": kl["se"], "exact": exact["kl"]["KL(q||p)"], "z": kl_z}}
    every = np.abs(np.concatenate(counted + [np.array([kl_z])]))
    out["checked"] = int(every.size)
    out["max_abs_z"] = float(every.max())
    out["passed"] = bool(out["max_abs_z"] < z_limit)
    return out


def mc_table(
    q: Autoregressive, p: Autoregressive, estimators="k1,k2,k3", n: int = 200_000, seed: int = 0, placements=None
):
    """One row per (estimator, placement): |exact gradient|, |MC - exact|, mean se, max |z| (a DataFrame)."""
    import pandas as pd

    placements = ALL_PLACEMENTS if placements is None else placements
    exact = sequence_summary(q, p, estimators, placements)
    check = crosscheck(q, p, estimators, n, seed, placements=placements, exact=exact)
    return pd.DataFrame(
        [
            {
                "estimator": name,
                "placement": placement,
                "|exact|": float(np.linalg.norm(exact["estimators"][name][placement]["gradient"])),
                "|MC - exact|": float(
                    np.linalg.norm(entry["gradient"] - exact["estimators"][name][placement]["gradient"])
                ),
                "mean se": float(np.mean(entry["se"])),
                "max |z|": entry["max_abs_z"],
            }
            for name, by_placement in check["estimators"].items()
            for placement, entry in by_placement.items()
        ]
    )


__all__ = ["sample", "gradient", "crosscheck", "mc_table", "MIN_VISITS"]
