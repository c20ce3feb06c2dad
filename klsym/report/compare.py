r"""Comparison tables: one place where a number is shown three (or four) ways.

Every table here is tidy (one row per estimator, pair, quantity, mode and parameter) and puts side by
side what the layers of klsym say about the same quantity:

* ``symbolic``: what SymPy derives (:func:`klsym.derive.symbolic.analyze`): the divergence
  :math:`\mathbb{E}_q[k]` equals, the divergence each gradient mode follows;
* ``exact``: the exact layer (:mod:`klsym.exact.expectations`: closed form, exact sum or quadrature);
* ``mc``: the streaming Monte Carlo engine (:mod:`klsym.simulate.montecarlo`), with its standard
  error ``se`` and :math:`z = (\text{mc} - \text{exact}) / \text{se}`;
* ``published``: a published table (:mod:`klsym.report.published`), with the z-score of the published
  number and whether it equals the exact value to the digits printed.

Notebooks call these functions and narrate; they do not build tables themselves.

>>> from klsym.exact.families import Gaussian
>>> table = compare("k1,k3", Gaussian(0, 1), Gaussian(0.5, 1), n=20_000, seed=0)
>>> table[["estimator", "direction", "exact"]].round(6).values.tolist()
[['k1', 'KL(q||p)', 0.125], ['k3', 'KL(q||p)', 0.125]]
>>> bool(table["z"].abs().max() < 5)
True
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import pandas as pd
import sympy as sp

from klsym.derive.divergences import REGISTRY
from klsym.derive.estimators import Estimator, bregman, from_formula, get_estimator, get_estimators
from klsym.derive.symbolic import analyze, derivation_rows, derivatives_at_one, is_zero, mode_coefficient
from klsym.derive.symbols import alpha, r
from klsym.exact.expectations import (
    KL_PQ,
    KL_QP,
    MODES,
    estimator_gradient,
    estimator_gradient_std,
    estimator_stats,
    kl_divergences,
    true_gradients,
)
from klsym.exact.families import Gaussian
from klsym.report.published import exact_value, half_unit, load_rows, monte_carlo_se, pair
from klsym.simulate import montecarlo
from klsym.simulate.montecarlo import z_score

WHAT = ("symbolic", "exact", "mc")
LAYERS = (*WHAT, "published")
PARAMS = ("mu", "sigma")
# an exact gradient "equals" a true gradient when the whole vector agrees to these tolerances
RTOL, ATOL = 1e-7, 1e-9


def _names(estimators) -> list[Estimator]:
    return get_estimators(estimators) if isinstance(estimators, str) else [get_estimator(e) for e in estimators]


def _param_names(q) -> list[str]:
    return list(PARAMS) if isinstance(q, Gaussian) else [f"logit {i}" for i in range(len(q.logits))]


def _label(entry: dict) -> str:
    return entry["divergence"] or f"g(r) = {entry['generator']}"


def _equals(vector, true: dict) -> str:
    """Which true gradient an exact expected gradient is (the whole vector, to RTOL/ATOL)."""
    vector = np.asarray(vector, dtype=np.float64)
    if np.allclose(vector, 0.0, atol=ATOL):
        return "zero"
    for label, target in (
        (f"grad {KL_QP}", true[KL_QP]),
        (f"grad {KL_PQ}", true[KL_PQ]),
        (f"-grad {KL_PQ}", -true[KL_PQ]),
        (f"-grad {KL_QP}", -true[KL_QP]),
    ):
        if np.allclose(vector, target, rtol=RTOL, atol=ATOL):
            return label
    return "neither"


def _agrees(follows: str | None, equals: str) -> bool:
    """SymPy's label and the exact gradient tell the same story (KL(q||p), KL(p||q), zero, or neither)."""
    named = {KL_QP: f"grad {KL_QP}", KL_PQ: f"grad {KL_PQ}", "zero": "zero"}
    return named.get(follows) == equals if follows in named else equals not in named.values()


# --- one pair: symbolic, exact and Monte Carlo --------------------------------------------------


def compare(
    estimators,
    q,
    p,
    what=WHAT,
    *,
    n: int | None = None,
    seed: int = 0,
    modes=(),
    z_se: str = "sample",
    dtype: str = "float64",
) -> pd.DataFrame:
    r"""Values (and gradients, for ``modes``) of each estimator on one pair, every layer side by side.

    Parameters
    ----------
    estimators : str or list
        ``"k1,k3"``, names or :class:`~klsym.derive.estimators.Estimator` objects.
    q, p : Gaussian or Categorical
        Sampler and reference.
    what : sequence of {"symbolic", "exact", "mc", "published"}
        Layers to show; ``"mc"`` needs ``n``. ``"published"`` adds one row per published number for this pair
        and these estimators (Schulman, Zhang, Yang's loss-mode gradients): ``quantity`` as published,
        ``direction`` the document's "true" KL, ``published, exact`` (under the document's definition),
        ``published_matches_digits``, ``published_se, z_published, z_beyond_rounding``; our own Monte Carlo
        reproduction of a whole table is :func:`reproduce`.
    n, seed : int
        Monte Carlo sample size and seed (:func:`klsym.simulate.montecarlo.run`, and
        :func:`~klsym.simulate.montecarlo.gradient` with the same seed for ``modes``).
    modes : sequence of {"loss", "reward", "full"}
        Gradient modes to add, one row per mode and parameter of q.
    z_se : {"sample", "exact"}
        Standard error of the value's z: the sample one, or the exact :math:`\mathrm{sd}_q(k)/\sqrt n`
        (falling back to the sample one where :math:`\mathbb{E}_q[k^2] = \infty`). Gradients always use
        the sample standard error of the per-sample gradient.
    dtype : {"float64", "float32"}
        Monte Carlo precision.

    Returns
    -------
    pandas.DataFrame
        Value rows (``quantity == "value"``): ``estimator, quantity, mode, param, direction`` (what SymPy
        says :math:`\mathbb{E}_q[k]` equals, else the estimator's target), ``symbolic``, ``true`` (the
        exact divergence in that direction), ``exact, exact_std, method, prob_negative``, the exact
        ``KL(q||p)`` and ``KL(p||q)``, ``mc, mc_std, se, z, infinite_variance``. Gradient rows:
        ``direction`` (the divergence the mode follows), ``exact``, ``equals`` (which true gradient
        the exact vector is), ``symbolic_agrees`` (that and SymPy's label agree), ``true`` (that direction's
        true gradient, or NaN), ``mc, se, z`` and the estimator's ``infinite_variance``. Published rows:
        see ``what``.
    """
    what = tuple(what)
    unknown = sorted(set(what) - set(LAYERS))
    if unknown:
        raise ValueError(f"what: unknown layer(s) {unknown}; choose from {list(LAYERS)}")
    if "mc" in what and n is None:
        raise ValueError("what includes 'mc': give the sample size n")
    if z_se not in ("sample", "exact"):
        raise ValueError(f"z_se must be 'sample' or 'exact', not {z_se!r}")
    estimators, modes = _names(estimators), tuple(modes)
    kl = kl_divergences(q, p)
    true = true_gradients(q, p) if modes else {}
    sampled = grads = {}
    if "mc" in what:
        sampled = montecarlo.run(q, p, estimators, n=n, seed=seed, dtype=dtype, quantiles=(), batch_size=None)[
            "estimators"
        ]
        if modes:
            grads = montecarlo.gradient(q, p, estimators, n=n, seed=seed, modes=modes, dtype=dtype)["gradients"]
    rows = []
    for estimator in estimators:
        derived = analyze(estimator) if "symbolic" in what else None
        stats = estimator_stats(estimator, q, p)
        direction = derived["value"]["divergence"] if derived else estimator.target
        row = {
            "estimator": estimator.name,
            "quantity": "value",
            "mode": "",
            "param": "",
            "direction": direction,
            "symbolic": _label(derived["value"]) if derived else None,
            "true": kl.get(direction, np.nan),
            "exact": stats["mean"],
            "exact_std": stats["std"],
            "exact_second_moment": stats["second_moment"],
            "method": stats["method"],
            "prob_negative": stats["prob_negative"],
            KL_QP: kl[KL_QP],
            KL_PQ: kl[KL_PQ],
            "exact_equals_true": bool(np.isclose(stats["mean"], kl.get(direction, np.nan), rtol=RTOL, atol=ATOL)),
        }
        if "mc" in what:
            mc = sampled[estimator.name]
            infinite = not math.isfinite(stats["second_moment"])
            se = mc["se"] if z_se == "sample" or infinite else math.sqrt(max(stats["std"], 0.0) ** 2 / n)
            row.update(
                mc=mc["mean"],
                mc_std=mc["std"],
                se=se,
                z=float(z_score(mc["mean"], stats["mean"], se)),
                infinite_variance=infinite,
            )
        rows.append(row)
        for mode in modes:
            exact = np.asarray(estimator_gradient(estimator, q, p, mode), dtype=np.float64)
            follows = derived["gradient"][mode]["divergence"] if derived else None
            target = true.get(follows)
            mc_grad = grads.get(estimator.name, {}).get(mode)
            z = z_score(mc_grad["mean"], exact, mc_grad["se"]) if mc_grad is not None else None
            for i, param in enumerate(_param_names(q)):
                row = {
                    "estimator": estimator.name,
                    "quantity": "gradient",
                    "mode": mode,
                    "param": param,
                    "direction": follows,
                    "symbolic": _label(derived["gradient"][mode]) if derived else None,
                    "true": target[i] if target is not None else (0.0 if follows == "zero" else np.nan),
                    "exact": exact[i],
                    "equals": _equals(exact, true),
                    "symbolic_agrees": _agrees(follows, _equals(exact, true)) if derived else None,
                    f"grad {KL_QP}": true[KL_QP][i],
                    f"grad {KL_PQ}": true[KL_PQ][i],
                }
                if mc_grad is not None:
                    row.update(
                        mc=float(mc_grad["mean"][i]),
                        se=float(mc_grad["se"][i]),
                        z=float(z[i]),
                        infinite_variance=not math.isfinite(stats["second_moment"]),
                    )
                rows.append(row)
    if "published" in what:
        rows += _published_rows(estimators, q, p)
    return pd.DataFrame(rows)


def _published_rows(estimators, q, p) -> list[dict]:
    """Rows of every published table for this pair and these estimators, with the digits check and z."""
    names = {estimator.name for estimator in estimators}
    rows = []
    for row in load_rows():
        if row["estimator"] not in names or pair(row) != (q, p):
            continue
        exact = exact_value(row)
        rows.append(
            {
                "estimator": row["estimator"],
                "quantity": row["quantity"],
                "mode": "loss" if row["parameter"] else "",
                "param": row["parameter"],
                "direction": row["published_true_direction"].split(" ")[0],
                "table": row["table"],
                **_published_columns(row, exact, monte_carlo_se(row)),
            }
        )
    return rows


def compare_pairs(
    estimators, pairs: Mapping, what=("exact",), *, n: int | None = None, seed=0, key: str = "pair", **options
) -> pd.DataFrame:
    """:func:`compare` over several pairs, one after the other, with a column ``key`` naming the pair.

    Parameters
    ----------
    pairs : mapping
        label -> ``(q, p)`` (e.g. :func:`gaussian_path`, :func:`with_reference`).
    seed : int or sequence of int
        One seed for every pair, or one per pair (in order).
    """
    seeds = [int(seed)] * len(pairs) if np.ndim(seed) == 0 else [int(s) for s in seed]
    if len(seeds) != len(pairs):
        raise ValueError(f"{len(seeds)} seeds for {len(pairs)} pairs")
    frames = [
        compare(estimators, q, p, what, n=n, seed=s, **options).assign(**{key: label})
        for (label, (q, p)), s in zip(pairs.items(), seeds)
    ]
    table = pd.concat(frames, ignore_index=True)
    return table[[key, *[c for c in table.columns if c != key]]]


def gaussian_path(grid, q=(0.0, 1.0), direction=(1.0, 0.0), origin=None) -> dict:
    r"""Pairs along a straight line of references: x -> (q, p_x), p_x = N(o_mu + x d_mu, o_sigma + x d_sigma).

    ``origin`` defaults to q, so ``direction = (p.mu - q.mu, p.sigma - q.sigma)`` reaches p at x = 1.

    >>> [(x, p.mu, p.sigma) for x, (q, p) in gaussian_path([0.5, 1.0], direction=(1.0, 0.5)).items()]
    [(0.5, 0.5, 1.25), (1.0, 1.0, 1.5)]
    """
    sampler = q if isinstance(q, Gaussian) else Gaussian(*q)
    origin = sampler if origin is None else (origin if isinstance(origin, Gaussian) else Gaussian(*origin))
    return {
        float(x): (sampler, Gaussian(float(origin.mu + x * direction[0]), float(origin.sigma + x * direction[1])))
        for x in np.asarray(grid, dtype=np.float64)
    }


def with_reference(policies: Mapping, p) -> dict:
    """label -> (q, p) for several samplers q against one reference p."""
    return {label: (q, p) for label, q in policies.items()}


def relative(table: pd.DataFrame, direction: str = KL_QP) -> pd.DataFrame:
    r"""Value rows with bias and spread relative to one KL direction: (E[k] - KL)/KL, sd/KL, and the same for MC."""
    out = table[table["quantity"] == "value"].copy()
    true = out[direction]
    out["relative bias"] = (out["exact"] - true) / true
    out["relative std"] = out["exact_std"] / true
    out["E[k]/KL"] = out["exact"] / true
    if "mc" in out:
        out["MC relative bias"] = (out["mc"] - true) / true
        out["MC relative std"] = out["mc_std"] / true
        out["MC E[k]/KL"] = out["mc"] / true
        out["relative se"] = out["se"] / true
    return out


def gradient_error(estimator, q, p, mode: str, direction: str = KL_QP) -> float:
    r"""Relative distance of an exact expected gradient from a true one,
    :math:`\|\mathbb{E}[\hat g] - \nabla D\| / \|\nabla D\|` (Euclidean norm over the parameters of q)."""
    target = true_gradients(q, p)[direction]
    return float(np.linalg.norm(estimator_gradient(estimator, q, p, mode) - target) / np.linalg.norm(target))


def ratios(table: pd.DataFrame) -> pd.DataFrame:
    r"""Value rows with :math:`\mathbb{E}_q[k]` relative to both KL directions: ``E[k]/KL(q||p)``,
    ``E[k]/KL(p||q)`` and, with Monte Carlo, ``MC E[k]/...`` and ``se/...``."""
    out = table[table["quantity"] == "value"].copy()
    for direction in (KL_QP, KL_PQ):
        out[f"E[k]/{direction}"] = out["exact"] / out[direction]
        if "mc" in out:
            out[f"MC E[k]/{direction}"] = out["mc"] / out[direction]
            out[f"se/{direction}"] = out["se"] / out[direction]
    return out


def path_sweep(
    estimators, paths: Mapping, picks, *, n: int, seed, seed_step: int = 1000, key: str = "x"
) -> tuple[pd.DataFrame, pd.DataFrame]:
    r"""Exact values along each path (``label -> {x: (q, p)}``, e.g. :func:`gaussian_path`) and Monte Carlo at the
    points ``picks`` (indices into each path) with seeds ``seed + seed_step * index_of_path``; both with
    :func:`ratios`. Returns ``(curves, points)``, a column ``path`` naming the path."""
    curves, points = [], []
    for index, (label, path) in enumerate(paths.items()):
        items = list(path.items())
        curves.append(compare_pairs(estimators, path, ("exact",), key=key).assign(path=label))
        picked = dict(items[i] for i in np.asarray(picks, dtype=int))
        points.append(
            compare_pairs(
                estimators, picked, ("exact", "mc"), n=n, seed=np.asarray(seed) + seed_step * index, key=key
            ).assign(path=label)
        )
    return ratios(pd.concat(curves, ignore_index=True)), ratios(pd.concat(points, ignore_index=True))


def support_table(estimators, q, p) -> pd.DataFrame:
    """Exact infimum and supremum of each estimator over the ratios a Gaussian pair can produce."""
    from klsym.report.published import support_bounds

    return pd.DataFrame(
        [
            dict(zip(("inf k (exact)", "sup k (exact)"), support_bounds(e.name, q, p)), estimator=e.name)
            for e in _names(estimators)
        ]
    ).set_index("estimator")


# --- SymPy tables ------------------------------------------------------------------------------


def symbolic_table(estimators, modes=MODES) -> pd.DataFrame:
    r"""What SymPy derives, one row per estimator and gradient mode.

    Columns: ``k(r)``, ``k(1)``, ``k'(1)``, ``k''(1)``, ``k'''(1)``, ``k >= 0``, ``convex``, ``E_q[k] is``,
    ``mode``, ``h(r)`` (expected gradient :math:`\mathbb{E}_q[h(r)\,s]`), ``g(r)`` (solving
    :math:`g - r g' = h + c`), ``follows`` (the divergence :math:`D_g`), ``g''(1)`` and
    ``g - r g' = h + c`` (SymPy's check that its g satisfies the ODE: the derivative in r vanishes).
    """
    rows = []
    for estimator in _names(estimators):
        derived = analyze(estimator)
        for mode in modes:
            h = mode_coefficient(estimator, mode)
            gradient = derived["gradient"][mode]
            g = sp.sympify(gradient["generator"], locals={"r": r})
            rows.append(
                {
                    "estimator": estimator.name,
                    "k(r)": derived["expr"],
                    "k(1)": derived["f1"],
                    "k'(1)": derived["df1"],
                    "k''(1)": derived["d2f1"],
                    "k'''(1)": derived["d3f1"],
                    "k >= 0": derived["nonnegative"],
                    "convex": derived["convex"],
                    "E_q[k] is": derived["value"]["divergence"] or "(unnamed)",
                    "mode": mode,
                    "h(r)": sp.sstr(h),
                    "g(r)": gradient["generator"],
                    "follows": gradient["divergence"] or "(unnamed)",
                    "g''(1)": gradient["d2g1"],
                    "g - r g' = h + c": is_zero(sp.diff(g - r * sp.diff(g, r) - h, r)),
                }
            )
    return pd.DataFrame(rows)


def formulas_latex(estimators) -> str:
    r"""One aligned LaTeX block: each estimator's own SymPy expression (``sympy.latex``, nothing retyped).

    >>> formulas_latex("k3")
    '\\begin{aligned}\\mathrm{k3}:\\quad k(r) &= r - \\log{\\left(r \\right)} - 1\\end{aligned}'
    """
    lines = [
        rf"\mathrm{{{e.name.replace('_', chr(92) + '_')}}}:\quad k(r) &= {sp.latex(e.expr)}" for e in _names(estimators)
    ]
    return r"\begin{aligned}" + r"\\".join(lines) + r"\end{aligned}"


def derivation_markdown(estimators=None) -> str:
    """The derivation table (value and gradient-mode divergences) as Markdown with LaTeX cells."""

    def cell(text):
        return text.replace("|", r"\|")

    lines = [
        r"| estimator | $k(r)$ | $k(1)$ | $k'(1)$ | $k''(1)$ | $k'''(1)$ | $k \ge 0$ | convex "
        r"| $\mathbb{E}_q[k]$ equals | `loss` follows | `reward` follows | `full` follows |",
        "|" + "---|" * 12,
    ]
    for row in derivation_rows(estimators):
        entries = [row["value"]] + [row["gradient"][mode] for mode in MODES]
        lines.append(
            "| "
            + " | ".join(
                [row["name"], f"${row['latex']}$"]
                + [f"${sp.latex(sp.sympify(row[key]))}$" for key in ("f1", "df1", "d2f1", "d3f1")]
                + [str(row["nonnegative"]), str(row["convex"])]
                + [cell(e["divergence"] or f"$g(r) = {sp.latex(sp.sympify(e['generator']))}$") for e in entries]
            )
            + " |"
        )
    return "\n".join(lines)


# --- f-divergences (notebook 03) --------------------------------------------------------------


def registry_table(amari_alpha: float = 0.5) -> pd.DataFrame:
    r"""klsym's registry of generators (:data:`klsym.derive.divergences.REGISTRY`), the Amari alpha evaluated
    at ``amari_alpha``, with SymPy's derivatives at r = 1 (None where not differentiable there).

    Columns ``name, label, generator`` (SymPy), ``f(1), f'(1), f''(1), f'''(1)`` and ``smooth``
    (twice differentiable at 1 with :math:`f''(1) \ne 0`: it has a quadratic local expansion).
    """
    rows = []
    for name, divergence in REGISTRY.items():
        generator = divergence.generator.subs(alpha, sp.nsimplify(amari_alpha))
        derivatives = derivatives_at_one(generator, 3)
        rows.append(
            {
                "name": name,
                "label": divergence.label,
                "generator": generator,
                **dict(zip(("f(1)", "f'(1)", "f''(1)", "f'''(1)"), derivatives)),
                "smooth": derivatives[2] is not None and derivatives[2] != 0,
            }
        )
    return pd.DataFrame(rows)


def registry_markdown(registry: pd.DataFrame) -> str:
    """:func:`registry_table` as Markdown with LaTeX cells ("—": not differentiable at r = 1)."""
    lines = ["| name | label | $f(r)$ | $f(1)$ | $f'(1)$ | $f''(1)$ | $f'''(1)$ |", "|---|---|---|---|---|---|---|"]
    for row in registry.to_dict("records"):
        values = [row[key] for key in ("f(1)", "f'(1)", "f''(1)", "f'''(1)")]
        lines.append(
            f"| `{row['name']}` | {row['label'].replace('|', chr(92) + '|')} | ${sp.latex(row['generator'])}$ | "
            + " | ".join("—" if value is None else f"${sp.latex(value)}$" for value in values)
            + " |"
        )
    return "\n".join(lines)


def local_expansion_table(
    registry: pd.DataFrame, fisher_form, deltas, direction, *, n: int | None = None, seed: int = 0
) -> pd.DataFrame:
    r"""Exact :math:`D_f` (the mean of each smooth generator's Bregman estimator) against the quadratic form
    :math:`\frac{f''(1)}{2}\,\delta^2\, d^\top F d`, q = N(0, 1), p = N(δ d_mu, 1 + δ d_sigma); with ``n``,
    Monte Carlo at each δ too (seed + index): ``mc, se, z`` against the exact :math:`D_f`."""
    smooth = registry[registry["smooth"]]
    estimators = [bregman(row["generator"], name=row["name"]) for row in smooth.to_dict("records")]
    curvature = dict(zip(smooth["name"], smooth["f''(1)"]))
    what = ("exact", "mc") if n is not None else ("exact",)
    seeds = seed + np.arange(len(np.atleast_1d(deltas)))
    table = compare_pairs(estimators, gaussian_path(deltas, direction=direction), what, n=n, seed=seeds, key="delta")
    table = table.rename(columns={"estimator": "generator", "exact": "exact D_f"})
    table.insert(2, "SymPy f''(1)", table["generator"].map(curvature).astype(str))
    table["quadratic form"] = [
        float(curvature[name]) / 2 * step**2 * float(fisher_form)
        for name, step in zip(table["generator"], table["delta"])
    ]
    table["ratio"] = table["exact D_f"] / table["quadratic form"]
    table["|ratio - 1|"] = (table["ratio"] - 1).abs()
    return table


def bias_series_table(deltas, directions: Mapping, cubic, quartic, estimator="k2") -> pd.DataFrame:
    r"""Exact bias :math:`\mathbb{E}_q[k] - \mathrm{KL}(q\|p)` against the series terms
    :math:`c_3\,\mathbb{E}_q[(r-1)^3] + c_4\,\mathbb{E}_q[(r-1)^4]` (moments exact, from :math:`\mathbb{E}_q[r^a]`
    and :math:`\mathbb{E}_q[r] = 1`) along each direction ``label -> (d_mu, d_sigma)`` from q = N(0, 1)."""
    third, fourth = from_formula("r**3", name="r^3"), from_formula("r**4", name="r^4")
    rows = []
    for label, direction in directions.items():
        for step, (q, p) in gaussian_path(deltas, direction=direction).items():
            rows.append(
                {
                    "direction": label,
                    "delta": step,
                    "exact bias": estimator_stats(estimator, q, p)["mean"] - kl_divergences(q, p)[KL_QP],
                    # rev_k2 is k = r: its second moment is E_q[r^2]
                    "m2": estimator_stats("rev_k2", q, p)["second_moment"],
                    "m3": estimator_stats(third, q, p)["mean"],
                    "m4": estimator_stats(fourth, q, p)["mean"],
                }
            )
    table = pd.DataFrame(rows)
    table["series terms"] = float(cubic) * (table.m3 - 3 * table.m2 + 2) + float(quartic) * (
        table.m4 - 4 * table.m3 + 6 * table.m2 - 3
    )
    return table


def small_delta_slopes(
    table: pd.DataFrame, x: str = "delta", y: str = "exact bias", by: str = "direction", reference: str = "series terms"
) -> pd.DataFrame:
    """Per group: the log-log slope of |y| between the two smallest x, and y / reference at the smallest x."""
    rows = []
    for label, curve in table.groupby(by, sort=False):
        first, second = curve.iloc[0], curve.iloc[1]
        rows.append(
            {
                by: label,
                "log-log slope at small delta": np.log(abs(second[y] / first[y])) / np.log(second[x] / first[x]),
                x: first[x],
                f"{y} / {reference}": first[y] / first[reference],
            }
        )
    return pd.DataFrame(rows).set_index(by)


# --- published tables --------------------------------------------------------------------------


def _published_columns(row, exact: float, se: float) -> dict:
    printed = row["published_value"]
    published = float(printed)
    finite = math.isfinite(se)
    # only the distance beyond half a unit of the last printed digit is evidence against the number
    beyond = np.sign(published - exact) * max(abs(published - exact) - half_unit(printed), 0.0)
    return {
        "published": printed,
        "exact": exact,
        "exact, published digits": f"{exact:.{len(printed.partition('.')[2])}f}",
        # relative slack 1e-9: an exact value on the rounding boundary (0.0025 printed as 0.002) agrees
        "published_matches_digits": abs(published - exact) <= half_unit(printed) * (1 + 1e-9),
        "published_se": se,
        "z_published": (published - exact) / se if finite else np.nan,
        "z_beyond_rounding": beyond / se if finite else np.nan,
    }


def _value_statistic(row, stats: dict, true: float) -> float:
    quantity = row["quantity"]
    if quantity in ("bias", "bias/true"):
        return (stats["mean"] - true) / true
    if quantity in ("std", "stdev/true"):
        return stats["std"] / true
    return stats[quantity]  # "min", "max": sample extremes


def _trial_statistic(row, per_trial: np.ndarray, true: float) -> float:
    return {
        "average_gradient": per_trial.mean(),
        "bias/true": abs(per_trial.mean() - true) / abs(true),
        "stdev/true": per_trial.std(ddof=1) / abs(true),
    }[row["quantity"]]


def reproduce(
    table: str,
    *,
    n: int,
    seed: int = 0,
    trials: int | None = None,
    direction: str | None = None,
    dtype: str = "float64",
) -> pd.DataFrame:
    r"""A published table next to its exact values and our own Monte Carlo reproduction.

    Parameters
    ----------
    table : str
        A file of :data:`klsym.report.published.TABLES` (``"schulman2020_tables.csv"``, ...).
    n, seed : int
        Our Monte Carlo sample size (per trial for gradient tables) and seed. Value tables run one
        :func:`~klsym.simulate.montecarlo.run` per setting, settings sorted by (q, p), with seed
        ``seed + index``; gradient tables (Yang) run :func:`~klsym.simulate.montecarlo.gradient_trials`
        in ``loss`` mode, the mode the publication back-propagates.
    trials : int, optional
        Trials for gradient tables.
    direction : str, optional
        Keep only rows whose published "true" direction is this one (``KL(q||p)`` or ``KL(p||q)``).
    dtype : {"float64", "float32"}
        Our Monte Carlo precision.

    Returns
    -------
    pandas.DataFrame
        Per published row: ``table, p, estimator, param, quantity, published, exact`` (the document's own
        definition), ``exact, published digits``, ``published_matches_digits`` (|published - exact| within
        half a unit of the last printed digit), ``published_se`` (the published run's standard error),
        ``z_published``, ``z_beyond_rounding`` (only the distance beyond the rounding counts), ``mc``
        (ours), ``exact_at_n`` (the exact value at our n and trials), ``mc_se`` and ``z_mc``.
    """
    rows = [
        row
        for row in load_rows((table,))
        if direction is None or row["published_true_direction"].split(" ")[0] == direction
    ]
    if not rows:
        raise ValueError(f"no published rows in {table!r}" + (f" with true direction {direction}" if direction else ""))
    gradients = rows[0]["file"] == "yang2025_gradients.csv"
    if gradients and trials is None:
        raise ValueError(f"{table} is a table of per-trial gradients: give trials")
    settings = sorted(
        {(row["q_mu"], row["q_sigma"], row["p_mu"], row["p_sigma"]) for row in rows},
        key=lambda s: tuple(float(v) for v in s),
    )
    sampled = {}
    for index, setting in enumerate(settings):
        members = [row for row in rows if (row["q_mu"], row["q_sigma"], row["p_mu"], row["p_sigma"]) == setting]
        names = list(dict.fromkeys(row["estimator"] for row in members if row["estimator"] != "true"))
        q, p = pair(members[0])
        if gradients:
            sampled[setting] = montecarlo.gradient_trials(
                q, p, names, n=n, trials=trials, seed=seed + index, modes="loss", dtype=dtype
            )["gradients"]
        else:
            sampled[setting] = montecarlo.run(
                q, p, names, n=n, seed=seed + index, dtype=dtype, quantiles=(), batch_size=None
            )["estimators"]
    out = []
    for row in rows:
        q, p = pair(row)
        setting = (row["q_mu"], row["q_sigma"], row["p_mu"], row["p_sigma"])
        true_direction = row["published_true_direction"].split(" ")[0]
        exact, se = exact_value(row), monte_carlo_se(row)
        entry = {
            "table": row["table"],
            "p": f"N({p.mu:g}, {p.sigma:g})",
            "estimator": row["estimator"],
            "param": row["parameter"],
            "quantity": row["quantity"],
            **_published_columns(row, exact, se),
        }
        if gradients:
            ours = dict(row, sample_size=str(n), trials=str(trials))
            exact_ours, mc_se = exact_value(ours), monte_carlo_se(ours)
            if row["estimator"] == "true":
                mc, mc_se = np.nan, np.nan
            else:
                i = PARAMS.index(row["parameter"])
                mc = _trial_statistic(
                    row, sampled[setting][row["estimator"]]["loss"][:, i], true_gradients(q, p)[true_direction][i]
                )
        else:
            exact_ours = exact
            mc = _value_statistic(row, sampled[setting][row["estimator"]], kl_divergences(q, p)[true_direction])
            # the published run's standard error, rescaled to our sample size
            mc_se = se * np.sqrt(float(row["sample_size"]) / n) if math.isfinite(se) else np.nan
        entry.update(mc=mc, exact_at_n=exact_ours, mc_se=mc_se, z_mc=(mc - exact_ours) / mc_se)
        out.append(entry)
    return pd.DataFrame(out)


# --- per-trial gradients -----------------------------------------------------------------------


def trial_gradients(estimators, q, p, *, n: int, trials: int, seed: int = 0, mode: str = "loss") -> pd.DataFrame:
    r"""Per-trial gradient estimates (one row per estimator, parameter and trial) with the exact mean.

    Columns: ``estimator, param, trial, gradient`` (the trial's mean gradient over ``n`` samples),
    ``exact`` (the exact expected gradient), ``exact per-sample std``.
    """
    estimators = _names(estimators)
    sampled = montecarlo.gradient_trials(q, p, estimators, n=n, trials=trials, seed=seed, modes=mode)["gradients"]
    frames = []
    for estimator in estimators:
        exact = estimator_gradient(estimator, q, p, mode)
        std = estimator_gradient_std(estimator, q, p, mode)
        for i, param in enumerate(_param_names(q)):
            frames.append(
                pd.DataFrame(
                    {
                        "estimator": estimator.name,
                        "param": param,
                        "trial": np.arange(trials),
                        "gradient": sampled[estimator.name][mode][:, i],
                        "exact": exact[i],
                        "exact per-sample std": std[i],
                    }
                )
            )
    return pd.concat(frames, ignore_index=True)


def trial_summary(trials_table: pd.DataFrame, n: int) -> pd.DataFrame:
    r"""Mean and spread over trials against the exact values: per estimator and parameter, the MC mean, its
    z against the exact mean (se: sd over trials / sqrt(trials)) and the per-sample std (sd over trials
    times sqrt(n)) next to the exact one."""
    grouped = trials_table.groupby(["estimator", "param"], sort=False)
    out = grouped.agg(
        exact=("exact", "first"),
        mc=("gradient", "mean"),
        trial_sd=("gradient", lambda g: g.std(ddof=1)),
        trials=("gradient", "size"),
        exact_std=("exact per-sample std", "first"),
    ).reset_index()
    out["z"] = (out["mc"] - out["exact"]) / (out["trial_sd"] / np.sqrt(out["trials"]))
    out["MC per-sample std"] = out["trial_sd"] * np.sqrt(n)
    return out


__all__ = [
    "compare",
    "compare_pairs",
    "gaussian_path",
    "with_reference",
    "relative",
    "ratios",
    "path_sweep",
    "support_table",
    "gradient_error",
    "symbolic_table",
    "formulas_latex",
    "derivation_markdown",
    "registry_table",
    "registry_markdown",
    "local_expansion_table",
    "bias_series_table",
    "small_delta_slopes",
    "reproduce",
    "trial_gradients",
    "trial_summary",
    "WHAT",
    "LAYERS",
    "PARAMS",
]
