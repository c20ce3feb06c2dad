r"""Sweeps over many distribution pairs on Dask distributed: every grid point exactly what ``klsym mc`` prints.

A *spec* names the grid::

    {"pairs": [{"q": [0, 1], "p": [1, 1]},                       # Gaussian (mu, sigma)
               {"q_logits": "q.txt", "p_logits": "p.txt"},         # categorical, logits files (or lists)
               ...],
     "estimators": ["k1", "k2", "k3"], "n": 1000000, "seed": 0,
     "gradient": "loss,full"}                                      # optional

Grid point ``i`` (the ``i``-th pair) is sampled with seed ``S + i``. Its RNG blocks (see
:mod:`klsym.simulate.driver`) are cut into *tasks* of consecutive blocks; a task draws its blocks and
returns the engine's own accumulators (:mod:`klsym.simulate.accumulators`) holding one partial per
block, and the client merges them in block order, so every number is bit for bit what
``klsym mc --seed S+i`` (:func:`klsym.simulate.montecarlo.run` and ``gradient``) gives for that pair,
whatever the number of workers or the order in which tasks finish. The exact layer
(:mod:`klsym.exact.expectations`) runs as one more task per point. A task that fails is submitted again
(``retries`` times) and every failure is reported; a worker that dies is replaced by Dask, which reruns
its tasks. Nothing is dropped silently: a point whose task keeps failing is reported as failed.

Rows are tidy, one per (point, estimator): ``point, pair, family, q, p, estimator, target, n, seed,
mean, se, std, min, max, frac_negative, n_nonfinite, q<level>..., batch_mean_std``, the exact layer's
``exact_mean, exact_std, kl`` (the estimator's target KL), ``bias = mean - kl``, ``exact_bias``,
``z = (mean - exact_mean) / se``, and with gradients per mode ``grad_<mode>`` (+ ``_se``),
``exact_grad_<mode>``, ``true_grad`` (of the target KL) and the relative errors ``grad_error_<mode>``,
``exact_grad_error_<mode>``; plus the pair's ``tags`` (e.g. ``mean_gap``, ``temperature``).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from klsym.derive.registry import canonical_name, split_names
from klsym.exact.families import Categorical, Gaussian, check_same_family
from klsym.simulate.accumulators import feed, needs_samples
from klsym.simulate.driver import DEFAULT_CHUNK, Stream, check_count, check_modes, check_seed, keep_freed_blocks
from klsym.simulate.montecarlo import (
    DEFAULT_BATCH,
    DEFAULT_QUANTILES,
    ValueStatistics,
    gradient_summary,
    gradient_sums,
    limits_at_zero_probability,
)

#: Samples per task (rounded to whole RNG blocks): big enough to amortise scheduling, small enough to balance.
DEFAULT_TASK = 1 << 20
DEFAULT_RETRIES = 2


# --- the spec ------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Point:
    """One grid point: a pair, its seed, and what is measured (everything a task needs; picklable)."""

    index: int
    label: str
    q: Gaussian | Categorical
    p: Gaussian | Categorical
    estimators: tuple
    n: int
    seed: int
    modes: tuple = ()
    quantiles: tuple = DEFAULT_QUANTILES
    batch_size: int | None = DEFAULT_BATCH
    tags: dict = field(default_factory=dict)

    def stream(self) -> Stream:
        """The engine's stream for this point, as :func:`~klsym.simulate.montecarlo.run` builds it."""
        return limits_at_zero_probability(Stream(self.q, self.p, list(self.estimators), self.seed))

    def accumulators(self, stream: Stream):
        """Fresh accumulators: those of ``klsym mc`` (values; gradient sums when modes are given)."""
        values = ValueStatistics(stream, self.quantiles, self.batch_size)
        sums = gradient_sums(stream, self.modes) if self.modes else None
        return values, sums


@dataclass(frozen=True)
class Spec:
    points: tuple
    task_size: int = DEFAULT_TASK


def _family_pair(entry: dict, base: Path):
    if "q" in entry or "p" in entry:
        try:
            (q_mu, q_sigma), (p_mu, p_sigma) = entry["q"], entry["p"]
            numbers = [float(q_mu), float(q_sigma)], [float(p_mu), float(p_sigma)]
        except (KeyError, TypeError, ValueError):
            raise ValueError(f'a Gaussian pair needs "q": [mu, sigma] and "p": [mu, sigma], got {entry}') from None
        try:  # well-formed numbers that are not a Gaussian (sigma <= 0, nan): the family's own message
            q, p = Gaussian(*numbers[0]), Gaussian(*numbers[1])
        except ValueError as err:
            raise ValueError(f"pair {entry}: {err}") from None
        return q, p, f"q=N({q.mu:g},{q.sigma:g}^2) p=N({p.mu:g},{p.sigma:g}^2)"
    if "q_logits" in entry and "p_logits" in entry:
        q, p = (_logits(entry[key], base) for key in ("q_logits", "p_logits"))
        check_same_family(q, p)
        return q, p, entry.get("label") or f"categorical V={q.size}"
    raise ValueError(f"a pair needs q and p (Gaussian) or q_logits and p_logits (categorical), got {sorted(entry)}")


def _logits(value, base: Path) -> Categorical:
    if isinstance(value, str):
        path = Path(value)
        return Categorical.from_file(path if path.is_absolute() else base / path)
    return Categorical(np.asarray(value, dtype=np.float64))


def load_spec(spec, base: str | Path | None = None) -> Spec:
    """Validate a spec (a dict, or the path of a JSON file; logits paths are relative to it)."""
    if isinstance(spec, (str, Path)):
        path = Path(spec)
        try:
            spec, base = json.loads(path.read_text()), path.parent
        except FileNotFoundError:
            raise FileNotFoundError(f"spec file not found: {path}") from None
        except ValueError as err:
            raise ValueError(f"spec {path} is not valid JSON: {err}") from None
    if not isinstance(spec, dict):
        raise ValueError("a sweep spec is a JSON object with pairs, estimators, n and seed")
    unknown = set(spec) - {"pairs", "estimators", "n", "seed", "gradient", "quantiles", "batch_size", "task_size"}
    if unknown:
        raise ValueError(f"unknown spec keys: {', '.join(sorted(unknown))}")
    pairs = spec.get("pairs")
    if not isinstance(pairs, list) or not pairs:
        raise ValueError('spec needs a non-empty list "pairs"')
    estimators = spec.get("estimators", "k1,k2,k3")
    names = tuple(canonical_name(name) for name in split_names(estimators))
    if not names:
        raise ValueError("spec names no estimators")
    n, seed = check_count(spec.get("n", 1_000_000), "n"), check_seed(spec.get("seed", 0))
    modes = check_modes(spec["gradient"]) if spec.get("gradient") else ()
    quantiles = tuple(float(v) for v in spec.get("quantiles", DEFAULT_QUANTILES))
    batch_size = spec.get("batch_size", DEFAULT_BATCH)
    base = Path(base or ".")
    points = []
    for i, entry in enumerate(pairs):
        if not isinstance(entry, dict):
            raise ValueError(f"pair {i} must be an object, got {entry!r}")
        q, p, label = _family_pair(entry, base)
        tags = dict(entry.get("tags", {}))
        if isinstance(q, Gaussian):
            tags = {"mean_gap": p.mu - q.mu, "scale_ratio": p.sigma / q.sigma, **tags}
        points.append(Point(i, label, q, p, names, n, seed + i, modes, quantiles, batch_size, tags))
    return Spec(tuple(points), check_count(spec.get("task_size", DEFAULT_TASK), "task_size"))


# --- tasks (run on the workers) --------------------------------------------------------------------


def plan_tasks(point: Point, task_size: int) -> list[list]:
    """The point's streaming plan (:meth:`Stream.streaming_plan`) cut into tasks of about ``task_size`` samples
    (whole RNG blocks, at least one)."""
    stream = point.stream()
    block = stream.backend.block_size
    chunk = max(1, min(task_size, DEFAULT_CHUNK) // block) * block  # no chunk larger than a task
    per_task = max(1, task_size // chunk)
    stream_plan = list(stream.streaming_plan(point.n, chunk))
    return [stream_plan[i : i + per_task] for i in range(0, len(stream_plan), per_task)]


def run_blocks(point: Point, chunks) -> list:
    """Draw the task's chunks and return the accumulators, holding their per-block partials unmerged."""
    keep_freed_blocks()
    stream = point.stream()
    stream.samples = point.n  # the point's size decides whether loading the compiled kernels pays
    values, sums = point.accumulators(stream)
    accumulators = values.accumulators + ([sums] if sums is not None else [])
    for blocks in chunks:
        feed(accumulators, stream.draw(blocks, needs_samples(accumulators)))
    if values.histogram is not None:
        values.histogram.coalesce()  # integer counts: one partial per task is exact
    return accumulators


def exact_point(point: Point) -> dict:
    """The exact layer's numbers for one point; ``None`` where it has none (or fails)."""
    from klsym.exact import expectations as exact

    def attempt(compute, *args):
        try:
            value = compute(*args, point.q, point.p)
        except (ValueError, ArithmeticError, NotImplementedError, KeyError):
            return None
        if isinstance(value, dict):
            return {k: np.asarray(v).tolist() if isinstance(v, np.ndarray) else v for k, v in value.items()}
        return np.asarray(value, dtype=np.float64).tolist() if isinstance(value, np.ndarray) else value

    out = {
        "kl": attempt(exact.kl_divergences),
        "estimators": {},
        "true_gradients": attempt(exact.true_gradients) if point.modes else None,
    }
    for name in point.estimators:
        stats = attempt(exact.estimator_stats, name) or {}
        out["estimators"][name] = {
            "mean": stats.get("mean"),
            "std": stats.get("std"),
            "gradients": {mode: attempt(_estimator_gradient, name, mode) for mode in point.modes},
        }
    return out


def _estimator_gradient(name, mode, q, p):
    from klsym.exact.expectations import estimator_gradient

    return estimator_gradient(name, q, p, mode)


# --- the client ---------------------------------------------------------------------------------------


@dataclass
class SweepResult:
    rows: list
    failures: list
    seconds: float
    tasks: int

    @property
    def complete(self) -> bool:
        return not any(f["final"] for f in self.failures)


def _client(workers: int | None, scheduler: str | None):
    from distributed import Client, LocalCluster

    if scheduler:
        return Client(scheduler), None
    cluster = LocalCluster(
        n_workers=workers or 2, threads_per_worker=1, processes=True, dashboard_address=None, silence_logs=40
    )
    return Client(cluster), cluster


def sweep(
    spec,
    *,
    client=None,
    workers: int | None = None,
    scheduler: str | None = None,
    retries: int = DEFAULT_RETRIES,
    progress: bool = True,
    exact: bool = True,
) -> SweepResult:
    """Run a sweep on Dask: ``client`` (an existing one), else ``scheduler`` (an address), else a
    LocalCluster of ``workers`` processes. Returns rows (see the module notes) and the failures."""
    from distributed import as_completed
    from tqdm import tqdm

    spec = spec if isinstance(spec, Spec) else load_spec(spec)
    retries = int(retries)
    owned = None
    if client is None:
        client, owned = _client(workers, scheduler)
    started = time.perf_counter()
    try:
        jobs = {}  # key -> (kind, point, task index, chunks, attempt)
        futures = []

        def submit(kind, point, index, chunks, attempt):
            key = f"klsym-sweep-{kind}-{point.index}-{index}-{attempt}-{id(spec)}"
            function, args = (run_blocks, (point, chunks)) if kind == "mc" else (exact_point, (point,))
            future = client.submit(function, *args, key=key, pure=False)
            jobs[future.key] = (kind, point, index, chunks, attempt)
            return future

        for point in spec.points:
            for index, chunks in enumerate(plan_tasks(point, spec.task_size)):
                futures.append(submit("mc", point, index, chunks, 0))
            if exact:
                futures.append(submit("exact", point, 0, None, 0))
        results, failures = {}, []
        bar = tqdm(total=len(futures), unit="task", disable=not progress, leave=False, desc="sweep")
        completed = as_completed(futures)
        with bar:
            for future in completed:
                kind, point, index, chunks, attempt = jobs.pop(future.key)
                if future.status == "finished":
                    results[(kind, point.index, index)] = future.result()
                    bar.update(1)
                else:
                    error = future.exception()
                    final = attempt >= retries
                    failures.append(
                        {
                            "point": point.index,
                            "pair": point.label,
                            "task": f"{kind} {index}",
                            "attempt": attempt + 1,
                            "error": f"{type(error).__name__}: {error}",
                            "final": final,
                        }
                    )
                    if final:
                        bar.update(1)
                    else:
                        completed.add(submit(kind, point, index, chunks, attempt + 1))
                future.release()
        rows = []
        for point in spec.points:
            tasks = len(plan_tasks(point, spec.task_size))
            parts = [results.get(("mc", point.index, j)) for j in range(tasks)]
            if any(part is None for part in parts):
                continue  # reported in failures
            rows += point_rows(point, parts, results.get(("exact", point.index, 0)) if exact else None)
        task_count = sum(len(plan_tasks(p, spec.task_size)) + bool(exact) for p in spec.points)
        return SweepResult(rows, failures, time.perf_counter() - started, task_count)
    finally:
        if owned is not None:
            client.close()
            owned.close()


def merge_point(point: Point, parts) -> tuple:
    """Merge the tasks' accumulators in block order: (values summary, gradients summary or None)."""
    stream = point.stream()
    values, sums = point.accumulators(stream)
    accumulators = values.accumulators + ([sums] if sums is not None else [])
    for part in parts:
        for accumulator, other in zip(accumulators, part):
            accumulator.merge(other)
    return values.summary(point.n), (gradient_summary(stream, sums, point.n) if sums is not None else None)


def _norm(vector) -> float:
    return float(np.linalg.norm(np.asarray(vector, dtype=np.float64)))


def _relative_error(estimate, truth) -> float | None:
    if estimate is None or truth is None:
        return None
    scale = _norm(truth)
    error = _norm(np.asarray(estimate, dtype=np.float64) - np.asarray(truth, dtype=np.float64))
    return error / scale if scale > 0 else error


def point_rows(point: Point, parts, exact: dict | None) -> list[dict]:
    """Tidy rows of one point from its tasks' accumulators (in block order) and its exact numbers."""
    values, gradients = merge_point(point, parts)
    rows = []
    for name, entry in values.items():
        row = {
            "point": point.index,
            "pair": point.label,
            "family": type(point.q).__name__.lower(),
            "q": _params(point.q),
            "p": _params(point.p),
            **point.tags,
            "estimator": name,
            "target": entry["target"],
            "n": point.n,
            "seed": point.seed,
        }
        row.update({key: entry[key] for key in ("mean", "se", "std", "min", "max", "frac_negative", "n_nonfinite")})
        row.update({f"q{level}": value for level, value in entry["quantiles"].items()})
        row["batch_mean_std"] = entry["batch"]["mean_std"] if entry["batch"] else None
        reference = (exact or {}).get("estimators", {}).get(name, {})
        kl = ((exact or {}).get("kl") or {}).get(entry["target"])
        row["exact_mean"], row["exact_std"], row["kl"] = reference.get("mean"), reference.get("std"), kl
        row["bias"] = row["mean"] - kl if kl is not None else None
        row["exact_bias"] = row["exact_mean"] - kl if kl is not None and row["exact_mean"] is not None else None
        row["z"] = (
            (row["mean"] - row["exact_mean"]) / row["se"] if row["exact_mean"] is not None and row["se"] > 0 else None
        )
        if gradients is not None:
            true = ((exact or {}).get("true_gradients") or {}).get(entry["target"])
            row["true_grad"] = true
            for mode, grad in gradients[name].items():
                exact_grad = reference.get("gradients", {}).get(mode)
                row[f"grad_{mode}"], row[f"grad_{mode}_se"] = grad["mean"].tolist(), grad["se"].tolist()
                row[f"exact_grad_{mode}"] = exact_grad
                row[f"grad_error_{mode}"] = _relative_error(grad["mean"], true)
                row[f"exact_grad_error_{mode}"] = _relative_error(exact_grad, true)
        rows.append(row)
    return rows


def _params(family) -> list:
    return [family.mu, family.sigma] if isinstance(family, Gaussian) else np.asarray(family.logits).tolist()


# --- grids and tables for notebooks ---------------------------------------------------------------


def gaussian_pairs(mean_gaps, scale_ratios) -> list[dict]:
    r"""Spec pairs :math:`q = \mathcal{N}(0, 1)`, :math:`p = \mathcal{N}(\Delta, \rho^2)` over the grid
    (mean gap :math:`\Delta`, scale ratio :math:`\rho = \sigma_p / \sigma_q`).

    >>> gaussian_pairs([0.5], [1.0, 1.2])
    [{'q': [0.0, 1.0], 'p': [0.5, 1.0]}, {'q': [0.0, 1.0], 'p': [0.5, 1.2]}]
    """
    return [{"q": [0.0, 1.0], "p": [float(gap), float(ratio)]} for gap in mean_gaps for ratio in scale_ratios]


def llm_pairs(temperatures, perturbations, vocab: int = 64, zipf: float = 1.1, seed: int = 0) -> list[dict]:
    r"""LLM-shaped categorical spec pairs: Zipf-like base logits :math:`\ell` over ``vocab`` tokens; the
    reference is :math:`p = \mathrm{softmax}(\ell / T)` and the policy :math:`q = \mathrm{softmax}((\ell +
    \varepsilon g) / T)` with one fixed :math:`g \sim \mathcal{N}(0, I)` (perturbation :math:`\varepsilon`),
    for every temperature :math:`T` and :math:`\varepsilon` (tagged ``temperature``, ``perturbation``).

    >>> pair = llm_pairs([1.0], [0.5], vocab=4)[0]
    >>> pair["tags"], len(pair["q_logits"])
    ({'temperature': 1.0, 'perturbation': 0.5}, 4)
    """
    rng = np.random.default_rng(seed)
    base = -zipf * np.log(np.arange(1, vocab + 1)) + 0.3 * rng.standard_normal(vocab)
    direction = rng.standard_normal(vocab)
    return [
        {
            "q_logits": ((base + eps * direction) / temp).tolist(),
            "p_logits": (base / temp).tolist(),
            "label": f"T={temp:g} eps={eps:g}",
            "tags": {"temperature": float(temp), "perturbation": float(eps)},
        }
        for temp in temperatures
        for eps in perturbations
    ]


def sweep_frame(spec, **options):
    """:func:`sweep` as a pandas DataFrame (raises if a point failed for good)."""
    import pandas as pd

    result = sweep(spec, **options)
    if not result.complete:
        raise RuntimeError(f"sweep incomplete: {[f for f in result.failures if f['final']]}")
    return pd.DataFrame(result.rows)


#: Quantities :func:`side_by_side` can show: name -> (Monte Carlo column, exact column, scale).
QUANTITIES = {
    "bias/KL": ("bias", "exact_bias", "kl"),
    "sd/KL": ("std", "exact_std", "kl"),
    "gradient error (loss)": ("grad_error_loss", "exact_grad_error_loss", None),
    "gradient error (reward)": ("grad_error_reward", "exact_grad_error_reward", None),
    "gradient error (full)": ("grad_error_full", "exact_grad_error_full", None),
}


def side_by_side(frame, quantity: str, x: str, y: str):
    """Long table ``estimator, x, y, source (exact | Monte Carlo), value`` of one of :data:`QUANTITIES`."""
    import pandas as pd

    if quantity not in QUANTITIES:
        raise ValueError(f"unknown quantity {quantity!r}; choose from: {', '.join(QUANTITIES)}")
    mc, exact, scale = QUANTITIES[quantity]
    parts = []
    for source, column in (("exact", exact), ("Monte Carlo", mc)):
        values = pd.to_numeric(frame[column], errors="coerce")
        if scale is not None:
            values = values / pd.to_numeric(frame[scale], errors="coerce")
        parts.append(
            pd.DataFrame({"estimator": frame["estimator"], x: frame[x], y: frame[y], "source": source, "value": values})
        )
    return pd.concat(parts, ignore_index=True)


def heatmaps(frame, quantity: str, x: str, y: str, center: float | None = 0.0):
    """Heatmaps of a quantity over (x, y): one column per estimator, exact above Monte Carlo."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    table = side_by_side(frame, quantity, x, y)
    estimators, sources = list(dict.fromkeys(table["estimator"])), ["exact", "Monte Carlo"]
    finite = table["value"].replace([np.inf, -np.inf], np.nan).abs()
    limit = float(finite.max()) if finite.notna().any() else 1.0
    figure, axes = plt.subplots(
        len(sources),
        len(estimators),
        squeeze=False,
        figsize=(2.6 * len(estimators) + 1, 2.4 * len(sources)),
        sharex=True,
        sharey=True,
    )
    for row, source in enumerate(sources):
        for col, name in enumerate(estimators):
            part = table[(table["source"] == source) & (table["estimator"] == name)]
            grid = part.pivot_table(index=y, columns=x, values="value", aggfunc="first").sort_index(ascending=False)
            sns.heatmap(
                grid,
                ax=axes[row, col],
                cmap="RdBu_r" if center is not None else "viridis",
                center=center,
                vmin=-limit if center is not None else 0,
                vmax=limit,
                cbar=col == len(estimators) - 1,
                annot=grid.size <= 16,
                fmt=".2g",
            )
            axes[row, col].set_title(f"{name} ({source})", fontsize=9)
    figure.suptitle(quantity)
    figure.tight_layout()
    return figure


__all__ = [
    "Point",
    "Spec",
    "SweepResult",
    "load_spec",
    "plan_tasks",
    "run_blocks",
    "exact_point",
    "sweep",
    "merge_point",
    "point_rows",
    "gaussian_pairs",
    "llm_pairs",
    "sweep_frame",
    "side_by_side",
    "heatmaps",
    "QUANTITIES",
    "DEFAULT_TASK",
    "DEFAULT_RETRIES",
]
