"""The standard figures of the notebooks (matplotlib/seaborn), drawn from the tidy tables of
:mod:`klsym.report.compare`. Each function draws on ``ax`` (or a new figure) and returns the axes.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

from klsym.derive.estimators import get_estimator, get_estimators
from klsym.exact.expectations import KL_PQ, KL_QP


def _axes(ax, figsize=(8, 4.8)):
    return ax if ax is not None else plt.subplots(figsize=figsize)[1]


def _estimators(estimators):
    return get_estimators(estimators) if isinstance(estimators, str) else [get_estimator(e) for e in estimators]


def setup() -> None:
    """The notebooks' seaborn theme."""
    sns.set_theme(style="whitegrid", context="notebook")


def estimator_curves(estimators, log_ratio=None):
    r"""Left: :math:`k(e^t)` against :math:`t = \log r` (``Estimator.numeric``); right: :math:`dk_{sur}/dt`, the
    loss-mode weight of the score (``Estimator.numeric_dt``)."""
    t = np.linspace(-3.0, 3.0, 601) if log_ratio is None else np.asarray(log_ratio)
    figure, (value_axis, slope_axis) = plt.subplots(1, 2, figsize=(12, 4.5))
    for estimator in _estimators(estimators):
        value_axis.plot(t, estimator.numeric(t), label=estimator.name)
        slope_axis.plot(t, estimator.numeric_dt(t), label=estimator.name)
    value_axis.set(xlabel=r"$t = \log r$", ylabel=r"$k(e^t)$", ylim=(-3, 8), title="value")
    slope_axis.set(xlabel=r"$t = \log r$", ylabel=r"$d k_{sur}/dt$", ylim=(-5, 10), title="loss-mode weight")
    value_axis.legend(ncol=3, fontsize="small")
    figure.tight_layout()
    return value_axis, slope_axis


def value_vs_ratio(estimators, ratio=None, ax=None):
    r"""Each estimator as a function of :math:`r` (log axis), from its own expression."""
    ratio = np.geomspace(0.02, 8.0, 800) if ratio is None else np.asarray(ratio)
    ax = _axes(ax, (8, 4.5))
    for estimator in _estimators(estimators):
        ax.plot(ratio, estimator.numeric(np.log(ratio)), label=estimator.name)
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.axvline(1.0, color="grey", linewidth=0.8, linestyle=":")
    ax.set(xscale="log", xlabel=r"$r = p(x)/q(x)$", ylabel=r"$k(r)$", ylim=(-4, 6), title="value estimators")
    ax.legend()
    return ax


def bregman_gap(estimator="k3", ax=None):
    r""":math:`-\log r`, its tangent at :math:`r = 1` and the gap between them, with the registry's estimator."""
    ratio = np.linspace(0.15, 3.5, 400)
    curve, line = -np.log(ratio), 1.0 - ratio
    ax = _axes(ax, (8, 4.5))
    ax.plot(ratio, curve, label=r"$f(r) = -\log r$")
    ax.plot(ratio, line, label=r"tangent at $r = 1$: $1 - r$")
    ax.fill_between(ratio, line, curve, alpha=0.25, label=r"gap $= r - 1 - \log r$")
    ax.plot(
        ratio,
        get_estimator(estimator).numeric(np.log(ratio)),
        color="black",
        linestyle="--",
        linewidth=1,
        label=f"{get_estimator(estimator).name} (registry)",
    )
    ax.set(xlabel=r"$r$", ylabel="value", ylim=(-2.5, 2.5), title=r"Bregman gap of $-\log r$")
    ax.legend()
    return ax


def exact_and_mc(
    curves: pd.DataFrame,
    x: str,
    y: str,
    hue: str | None = "estimator",
    points=None,
    point_y: str | None = None,
    yerr: str | None = None,
    ax=None,
    absolute: bool = False,
    linestyle: str = "-",
    label: str = "{group} exact",
    colour=None,
    **axis,
):
    r"""Exact curves (lines, one per ``hue``, labelled ``label.format(group=...)``) and Monte Carlo points
    (``points``, with :math:`\pm 2` ``yerr`` bars) of the same quantity; ``absolute`` plots :math:`|y|`;
    ``colour`` fixes one colour for every group; ``axis`` goes to ``ax.set``."""
    ax = _axes(ax)
    point_y = point_y or y
    groups = curves.groupby(hue, sort=False) if hue else [(None, curves)]
    colours = dict(zip([g for g, _ in groups], sns.color_palette(n_colors=max(1, len(groups)))))
    colours = {group: colour for group in colours} if colour is not None else colours
    for group, curve in groups:
        values = curve[y].abs() if absolute else curve[y]
        ax.plot(
            curve[x],
            values,
            color=colours[group],
            linestyle=linestyle,
            label=label.format(group=group) if group is not None else y,
        )
        if points is not None:
            dots = points[points[hue] == group] if hue else points
            ax.errorbar(
                dots[x],
                dots[point_y],
                yerr=2 * dots[yerr] if yerr else None,
                fmt="o",
                markersize=4,
                color=colours[group],
                label=f"{group} Monte Carlo" if group is not None else point_y,
            )
    ax.set(**axis)
    ax.legend(ncol=2, fontsize="small")
    return ax


def trial_violins(trials: pd.DataFrame, true: dict, title: str = "", color=None):
    r"""Per-trial gradient estimates (:func:`klsym.report.compare.trial_gradients`), one panel per parameter:
    violins, each estimator's exact expected gradient (solid), :math:`\nabla`KL(q||p) (dashed, red) and
    :math:`\nabla`KL(p||q) (dotted, purple); ``true`` from :func:`klsym.exact.expectations.true_gradients`."""
    params = list(dict.fromkeys(trials["param"]))
    figure, axes = plt.subplots(1, len(params), figsize=(13, 4.8))
    for i, (ax, param) in enumerate(zip(np.atleast_1d(axes), params)):
        part = trials[trials["param"] == param]
        sns.violinplot(
            data=part, x="estimator", y="gradient", ax=ax, inner="quartile", cut=0, density_norm="width", color=color
        )
        exact = part.groupby("estimator", sort=False)["exact"].first()
        for position, value in enumerate(exact):
            ax.hlines(
                value,
                position - 0.4,
                position + 0.4,
                color="black",
                linewidth=1.5,
                label="exact expected gradient" if position == 0 else None,
            )
        if true:
            ax.axhline(true[KL_QP][i], color="tab:red", linestyle="--", label="grad KL(q||p)")
            ax.axhline(true[KL_PQ][i], color="tab:purple", linestyle=":", label="grad KL(p||q)")
        ax.set(title=f"{title} wrt {param}", ylabel=f"d / d{param}")
        ax.tick_params(axis="x", rotation=20)
    np.atleast_1d(axes)[0].legend(fontsize="small")
    figure.tight_layout()
    return axes


def sequence_spread(sequences: pd.DataFrame):
    """Notebook 07: k of the sequence ratio, mean / KL and spread / KL against T, vs the per-token sum."""
    figure, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    for name, part in sequences.groupby("estimator", sort=False):
        axes[0].plot(part["T"], part["k(seq ratio): exact mean / KL"], "o-", label=name)
        axes[1].plot(part["T"], part["exact sd / KL"], "o-", label=f"{name}: k(seq ratio)")
        axes[1].plot(
            part["T"], part["exact sd / KL (sum)"], "x--", color=axes[1].lines[-1].get_color(), label=f"{name}: sum"
        )
    axes[0].set(xlabel="T positions", ylabel="E_q[k] / KL(q||p)", title="k of the sequence ratio: mean / KL (exact)")
    axes[1].set(
        xlabel="T positions", ylabel="sd / KL(q||p)", yscale="log", title="spread: sequence ratio vs per-token sum"
    )
    axes[0].legend()
    axes[1].legend(fontsize="small", ncol=2)
    figure.tight_layout()
    return axes


def batch_maxima(maxima: pd.DataFrame, clamp: float, ax=None):
    """Notebook 07: the largest estimator value per Monte Carlo batch, per estimator and policy."""
    ax = _axes(ax, (11, 4.5))
    sns.boxplot(data=maxima, x="estimator", y="batch max", hue="policy q", ax=ax, fliersize=2)
    ax.axhline(clamp, color="black", linestyle=":", label=f"clamp {clamp:g}")
    ax.set(yscale="symlog", title="largest estimator value in a batch (Monte Carlo)")
    ax.legend(fontsize="small")
    return ax


def ratio_to_kl(curves: pd.DataFrame, points: pd.DataFrame, x: str = "x", ax=None, **axis):
    r"""Notebook 06: exact :math:`\mathbb{E}_q[k]/\mathrm{KL}` in both directions (lines) with Monte Carlo points
    (:math:`\pm 2` se), from :func:`klsym.report.compare.path_sweep`; reference lines at 2 and 1."""
    ax = _axes(ax)
    for direction, colour in ((KL_QP, "tab:blue"), (KL_PQ, "tab:orange")):
        exact_and_mc(
            curves,
            x,
            f"E[k]/{direction}",
            hue=None,
            points=points,
            point_y=f"MC E[k]/{direction}",
            yerr=f"se/{direction}",
            ax=ax,
            colour=colour,
        )
    ax.axhline(2.0, color="black", linewidth=0.8, linestyle=":", label="k''(1) = 2")
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set(ylabel="E_q[k] / KL", **axis)
    ax.legend(fontsize="small")
    return ax


def variance_parabola(scan: pd.DataFrame, lambda_star: float, ax=None, **axis):
    r"""Notebook 08: exact :math:`\mathrm{Var}_q(k_\lambda)` over :math:`\lambda` with about a dozen Monte Carlo
    points (:func:`klsym.report.variance_reduction.control_variate_scan`), :math:`\lambda^*` and :math:`k_3`."""
    ax = _axes(ax)
    every = scan.iloc[:: max(1, len(scan) // 12)]
    ax.plot(scan["lambda"], scan["exact variance"], label="exact (closed form)")
    if "MC variance" in scan:
        ax.plot(every["lambda"], every["MC variance"], "o", label="Monte Carlo")
    ax.axvline(lambda_star, color="black", linestyle=":", label=r"$\lambda^*$ (formula)")
    ax.axvline(1.0, color="grey", linestyle="--", linewidth=1, label=r"$k_3$ ($\lambda = 1$)")
    ax.set(xlabel=r"$\lambda$", ylabel=r"Var$_q(k_\lambda)$", yscale="log", **axis)
    ax.legend()
    return ax


def lambda_star_curves(sweep: pd.DataFrame, points: pd.DataFrame | None = None, x: str = "x"):
    r"""Notebook 08: :math:`\lambda^*` along a path (exact layer, SymPy closed form if a column
    ``lambda* SymPy`` is present, Monte Carlo parabola vertices) and what :math:`k_3` loses."""
    figure, (lambda_axis, ratio_axis) = plt.subplots(1, 2, figsize=(13, 4.6))
    lambda_axis.plot(sweep[x], sweep["lambda* exact"], label="exact layer")
    if "lambda* SymPy" in sweep:
        lambda_axis.plot(sweep[x], sweep["lambda* SymPy"], linestyle="--", label="SymPy closed form")
    if points is not None:
        lambda_axis.plot(points[x], points["lambda* Monte Carlo"], "o", label="Monte Carlo (parabola vertex)")
    lambda_axis.set(xlabel=r"$\mu_p$", ylabel=r"$\lambda^*$", title=r"optimal $\lambda$")
    lambda_axis.legend()
    ratio_axis.plot(sweep[x], sweep["Var(k3) / Var(k_lambda*)"])
    ratio_axis.set(xlabel=r"$\mu_p$", ylabel="Var(k3) / Var(k_lambda*)", yscale="log", title=r"what $k_3$ loses")
    figure.tight_layout()
    return lambda_axis, ratio_axis


def ratio_paths(curves: pd.DataFrame, points: pd.DataFrame, series=None, symbol=None):
    r"""Notebook 06: one :func:`ratio_to_kl` panel per path of :func:`klsym.report.compare.path_sweep`; the first
    path (a mean shift, log axis) also shows a SymPy series in ``symbol`` (the local expansion over KL), the
    second marks s = 1."""
    import sympy as sp

    names = list(dict.fromkeys(curves["path"]))
    figure, axes = plt.subplots(1, len(names), figsize=(13, 4.8))
    for index, (ax, name) in enumerate(zip(np.atleast_1d(axes), names)):
        curve = curves[curves["path"] == name]
        ratio_to_kl(
            curve,
            points[points["path"] == name],
            ax=ax,
            title=name,
            xlabel=r"$\delta$" if index == 0 else r"$s$ (1 = Zhang's p)",
        )
        if index == 0:
            if series is not None:
                ax.plot(
                    curve["x"],
                    sp.lambdify(symbol, series)(curve["x"].to_numpy()),
                    color="grey",
                    linestyle="--",
                    label="SymPy series / KL",
                )
            ax.set(xscale="log", ylim=(0, 2.3))
        else:
            ax.axvline(1.0, color="grey", linestyle=":")
        ax.legend(fontsize="small")
    figure.tight_layout()
    return axes


def clamped_values(settings, log_ratio=None):
    """Notebook 09: each setting's estimator and its clamped version against t, the frozen region shaded."""
    from klsym.exact.clamps import clamped_numeric, saturation_region

    t = np.linspace(-14, 12, 2600) if log_ratio is None else np.asarray(log_ratio)
    figure, axes = plt.subplots(1, len(settings), figsize=(6 * len(settings), 4))
    for ax, setting in zip(np.atleast_1d(axes), settings):
        name, bounds = setting.estimator, (setting.input_clamp, setting.output_clamp)
        ax.plot(t, get_estimator(name).numeric(t), color="grey", linestyle=":", label=name)
        ax.plot(t, clamped_numeric(name, *bounds)(t), label=f"clamped {name} (input {bounds[0]}, output {bounds[1]})")
        for lo, hi in saturation_region(name, *bounds):
            if lo < t[-1] and hi > t[0]:
                ax.axvspan(max(lo, t[0]), min(hi, t[-1]), color="tab:red", alpha=0.15)
        ax.set(xlabel=r"$t = \log r$", ylabel="value", ylim=(-15, 20), title=f"{name}: frozen where shaded")
        ax.legend()
    figure.tight_layout()
    return axes


def clamp_bias_curves(sweep: pd.DataFrame, threshold: float):
    """Notebook 09: relative clamp bias (value and each gradient mode) against δ, one panel per setting."""
    settings = list(dict.fromkeys(sweep["setting"]))
    figure, axes = plt.subplots(1, len(settings), figsize=(6 * len(settings), 4), sharey=True)
    for ax, label in zip(np.atleast_1d(axes), settings):
        frame = sweep[sweep["setting"] == label]
        for quantity in ("value", "loss", "reward", "full"):
            ax.plot(frame["delta"], frame[quantity].clip(lower=1e-300), label=quantity)
        ax.axhline(threshold, color="black", linewidth=0.8, linestyle=":")
        ax.set(xscale="log", yscale="log", ylim=(1e-16, 10), xlabel=r"$\delta$ ($p = N(\delta, 1)$)", title=label)
        ax.xaxis.set_minor_formatter(plt.NullFormatter())
    np.atleast_1d(axes)[0].set_ylabel("relative bias from the clamp")
    np.atleast_1d(axes)[0].legend()
    return axes


def precision_bars(precision: pd.DataFrame, estimator: str = "k3", pipeline: str = "stored"):
    """Notebook 09: |relative bias| of one estimator per dtype and pipeline; spread / KL per dtype and estimator."""
    figure, axes = plt.subplots(1, 2, figsize=(13, 4))
    sns.barplot(
        data=precision[precision["estimator"] == estimator], x="dtype", y="|relative bias|", hue="pipeline", ax=axes[0]
    )
    sns.barplot(
        data=precision[precision["pipeline"] == pipeline], x="dtype", y="spread / KL", hue="estimator", ax=axes[1]
    )
    axes[0].set(yscale="log", title=f"{estimator}: |q-weighted bias of the per-token estimate| / KL")
    axes[1].set(yscale="log", title="token-level spread added by rounding / KL")
    return axes


def identical_logits_histogram(case: dict, ax=None):
    """Notebook 09: the q-mass of the non-zero log-ratios between bit-identical logits (two kernels)."""
    ax = _axes(ax, (7, 3.5))
    nonzero = case["t"] != 0
    ax.hist(case["t"][nonzero], bins=61, weights=case["q"][nonzero])
    ax.set(xlabel=r"$t = \log p - \log q$ (bit-identical logits)", ylabel="q-mass", title="two log-softmax kernels")
    return ax


def relative_bias_and_spread(curves: pd.DataFrame, points: pd.DataFrame, x: str = "mu_p"):
    r"""Notebook 02: exact relative bias and relative sd against ``x`` (lines), Monte Carlo points (bias
    :math:`\pm 2` se), from :func:`klsym.report.compare.relative` tables."""
    figure, (bias_axis, std_axis) = plt.subplots(1, 2, figsize=(13, 4.8))
    exact_and_mc(
        curves,
        x,
        "relative bias",
        points=points,
        point_y="MC relative bias",
        yerr="relative se",
        ax=bias_axis,
        xlabel=r"$\mu_p$",
        ylabel="(E[k] - KL) / KL",
        title="relative bias",
    )
    exact_and_mc(
        curves,
        x,
        "relative std",
        points=points,
        point_y="MC relative std",
        ax=std_axis,
        xlabel=r"$\mu_p$",
        ylabel="sd(k) / KL",
        yscale="log",
        title="relative standard deviation",
    )
    figure.tight_layout()
    return bias_axis, std_axis


def bias_against_series(table: pd.DataFrame):
    r"""Notebook 03: |exact bias| and |series terms| against δ per direction
    (:func:`klsym.report.compare.bias_series_table`)."""
    ax = exact_and_mc(
        table,
        "delta",
        "exact bias",
        hue="direction",
        absolute=True,
        label="{group}: |exact bias|",
        xscale="log",
        yscale="log",
        xlabel=r"$\delta$",
        ylabel=r"$|\mathbb{E}_q[k_2] - \mathrm{KL}(q\|p)|$",
        title=r"bias of $k_2$",
    )
    exact_and_mc(
        table,
        "delta",
        "series terms",
        hue="direction",
        absolute=True,
        ax=ax,
        linestyle="--",
        label="{group}: |c3 E[(r-1)^3] + c4 E[(r-1)^4]|",
    )
    return ax


__all__ = [
    "relative_bias_and_spread",
    "bias_against_series",
    "clamped_values",
    "clamp_bias_curves",
    "precision_bars",
    "identical_logits_histogram",
    "ratio_paths",
    "variance_parabola",
    "lambda_star_curves",
    "ratio_to_kl",
    "setup",
    "estimator_curves",
    "value_vs_ratio",
    "bregman_gap",
    "exact_and_mc",
    "trial_violins",
    "sequence_spread",
    "batch_maxima",
]
