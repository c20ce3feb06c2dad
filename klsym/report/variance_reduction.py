r"""Control variates and shifts (notebook 08): the variance-optimal :math:`\lambda^*` of
:math:`k_\lambda = -\log r + \lambda (r - 1)` by SymPy, exactly and by Monte Carlo, and the mean-shift
variants."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd
import sympy as sp

from klsym.derive.estimators import Estimator, control_variate
from klsym.derive.symbolic import normal_moment_of_t
from klsym.derive.symbols import lam, r, x
from klsym.exact.expectations import (
    KL_PQ,
    KL_QP,
    estimator_stats,
    kl_divergences,
)
from klsym.report.compare import trial_gradients, trial_summary
from klsym.simulate import montecarlo

# --- control variates (notebook 08) ------------------------------------------------------------


def parabola_vertex(x, y) -> float:
    """The vertex of the least-squares parabola through (x, y)."""
    a, b, _ = np.polyfit(np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64), 2)
    return -b / (2 * a)


def lambda_star(q, p) -> float:
    r"""Variance-optimal :math:`\lambda^* = (\mathrm{KL}(q\|p) + \mathrm{KL}(p\|q)) / (\mathbb{E}_q[r^2] - 1)`
    of :math:`k_\lambda = -\log r + \lambda (r - 1)`, from the exact layer (``rev_k2`` is k = r)."""
    kl = kl_divergences(q, p)
    return (kl[KL_QP] + kl[KL_PQ]) / (estimator_stats("rev_k2", q, p)["second_moment"] - 1)


def control_variate_scan(q, p, lambdas, *, n: int | None = None, seed: int = 0) -> pd.DataFrame:
    r"""Variance of :math:`k_\lambda` on a grid of :math:`\lambda`: exact, and (``n``) Monte Carlo sample
    variances of every member on one shared sample."""
    lambdas = np.asarray(lambdas, dtype=np.float64)
    family = [control_variate(float(value)) for value in lambdas]
    out = pd.DataFrame(
        {"lambda": lambdas, "exact variance": [estimator_stats(member, q, p)["std"] ** 2 for member in family]}
    )
    if n is not None:
        sampled = montecarlo.run(q, p, family, n=n, seed=seed, quantiles=(), batch_size=None)["estimators"]
        out["MC variance"] = [sampled[member.name]["std"] ** 2 for member in family]
    return out


def lambda_star_sweep(path: Mapping, *, probe=None, n: int | None = None, seed=0) -> pd.DataFrame:
    r"""Along a path of pairs: exact :math:`\lambda^*`, Var(k3)/Var(k_{\lambda^*}), and (``n``, ``probe``)
    the Monte Carlo vertex of sample variances on the probe grid (seed per pair as in :func:`compare_pairs`)."""
    seeds = [int(seed)] * len(path) if np.ndim(seed) == 0 else [int(s) for s in seed]
    rows = []
    for (point, (q, p)), s in zip(path.items(), seeds):
        best = lambda_star(q, p)
        row = {
            "x": point,
            "lambda* exact": best,
            "Var(k3) / Var(k_lambda*)": estimator_stats("k3", q, p)["std"] ** 2
            / estimator_stats(control_variate(float(best)), q, p)["std"] ** 2,
        }
        if n is not None:
            scan = control_variate_scan(q, p, probe, n=n, seed=s)
            row["lambda* Monte Carlo"] = parabola_vertex(scan["lambda"], scan["MC variance"])
        rows.append(row)
    return pd.DataFrame(rows)


def evaluate(expr, symbol, values) -> np.ndarray:
    """``float(expr.subs(symbol, v))`` for each v: a SymPy closed form on a grid, evaluated by SymPy itself."""
    return np.array([float(expr.subs(symbol, value)) for value in np.asarray(values, dtype=np.float64)])


def shift_moments(q_mu: float, q_sigma: float, p_mu: float, p_sigma: float) -> dict:
    r"""Exact Gaussian integrals (SymPy) for the shifted :math:`k_2` gradient, per parameter i of q = N(mu, sigma):
    :math:`\mathbb{E}_q[s_i^2 L^2]`, :math:`\mathbb{E}_q[s_i^2 L]`, :math:`\mathbb{E}_q[s_i^2]`,
    :math:`\mathbb{E}_q[s_i L]` with :math:`L = \log(q/p)` and :math:`s_i` the score, at the given parameters
    (rationalised)."""
    mu, sigma = sp.Symbol("mu", real=True), sp.Symbol("sigma", positive=True)
    log_q = -sp.log(sigma) - sp.log(2 * sp.pi) / 2 - (x - mu) ** 2 / (2 * sigma**2)
    log_p = log_q.subs({mu: sp.nsimplify(p_mu), sigma: sp.nsimplify(p_sigma)})
    at_q = {mu: sp.nsimplify(q_mu), sigma: sp.nsimplify(q_sigma)}
    log_q_over_p = sp.expand((log_q - log_p).subs(at_q))
    scores = {"mu": sp.diff(log_q, mu).subs(at_q), "sigma": sp.diff(log_q, sigma).subs(at_q)}
    moments = {}
    for name, score in scores.items():
        integrands = {
            "E[s^2 L^2]": score**2 * log_q_over_p**2,
            "E[s^2 L]": score**2 * log_q_over_p,
            "E[s^2]": score**2,
            "E[s L]": score * log_q_over_p,
        }
        moments[name] = {
            key: sp.simplify(_gaussian_expectation(value, at_q[mu], at_q[sigma])) for key, value in integrands.items()
        }
    return moments


def _gaussian_expectation(polynomial: sp.Expr, mean: sp.Expr, sigma: sp.Expr) -> sp.Expr:
    r""":math:`\mathbb{E}[P(x)]`, x ~ N(mean, sigma^2), P a polynomial in x: its terms times the normal moments
    (the same expression the integral over the density gives, without integrating)."""
    terms = sp.Poly(sp.expand(polynomial), x).terms()
    return sp.Add(*[c * normal_moment_of_t(k, mean, sigma**2) for (k,), c in terms])


def shift_table(moments: dict) -> tuple[pd.DataFrame, float]:
    r"""Per parameter: the derived minimiser :math:`\mathbb{E}[s^2 L]/\mathbb{E}[s^2]`, the shift as printed in the
    seed :math:`\mathbb{E}[s^2 L^2]/\mathbb{E}[s^2]`, the exact mean gradient; and the pooled single shift
    :math:`\sum_i \mathbb{E}[s_i^2 L] / \sum_i \mathbb{E}[s_i^2]`."""
    shifts = pd.DataFrame(
        {
            name: {
                "lambda* derived  E[s^2 L]/E[s^2]": float(m["E[s^2 L]"] / m["E[s^2]"]),
                "lambda as printed  E[s^2 L^2]/E[s^2]": float(m["E[s^2 L^2]"] / m["E[s^2]"]),
                "exact mean gradient E[L s]": float(m["E[s L]"]),
            }
            for name, m in moments.items()
        }
    )
    pooled = float(sum(m["E[s^2 L]"] for m in moments.values()) / sum(m["E[s^2]"] for m in moments.values()))
    return shifts, pooled


def shift_comparison(
    candidates: Mapping, moments: dict, q, p, *, n: int, trials: int, seed: int = 0
) -> tuple[pd.DataFrame, pd.DataFrame]:
    r"""Each shift :math:`\lambda` of :math:`k_2 \to \frac12(\log r + \lambda)^2` (``label -> lambda``): the exact
    mean loss gradient, the per-sample std by SymPy's closed form
    :math:`\sqrt{\mathbb{E}[s^2L^2] - 2\lambda\mathbb{E}[s^2L] + \lambda^2\mathbb{E}[s^2] - \mathbb{E}[sL]^2}`, by the
    exact layer and by Monte Carlo trials. Returns ``(comparison, per-trial table)``."""
    shifted = [
        Estimator(label, (sp.log(r) + sp.Float(value)) ** 2 / 2, None, "k2 shifted by lambda (seed 003)")
        for label, value in candidates.items()
    ]
    per_trial = trial_gradients(shifted, q, p, n=n, trials=trials, seed=seed)
    summary = trial_summary(per_trial, n).rename(columns={"estimator": "shift", "param": "parameter"})
    summary["lambda"] = summary["shift"].map(dict(candidates))
    summary["per-sample std, SymPy"] = [
        float(
            moments[parameter]["E[s^2 L^2]"]
            - 2 * candidates[label] * moments[parameter]["E[s^2 L]"]
            + candidates[label] ** 2 * moments[parameter]["E[s^2]"]
            - moments[parameter]["E[s L]"] ** 2
        )
        ** 0.5
        for label, parameter in zip(summary["shift"], summary["parameter"])
    ]
    summary = summary.rename(
        columns={
            "exact": "exact mean gradient",
            "exact_std": "per-sample std, exact layer",
            "MC per-sample std": "per-sample std, MC trials",
            "mc": "MC mean over trials",
        }
    )
    return summary[
        [
            "shift",
            "parameter",
            "lambda",
            "exact mean gradient",
            "per-sample std, SymPy",
            "per-sample std, exact layer",
            "per-sample std, MC trials",
            "MC mean over trials",
            "z",
        ]
    ], per_trial


# --- SymPy derivations the notebooks display (candidates for klsym.derive.symbolic) ----------


def gaussian_fisher_information() -> tuple:
    r"""Fisher information of N(mu, sigma), :math:`F = -\mathbb{E}[\nabla^2_{(\mu,\sigma)} \log q]`, by SymPy.

    >>> fisher, mu, sigma = gaussian_fisher_information()
    >>> fisher
    Matrix([
    [sigma**(-2),          0],
    [          0, 2/sigma**2]])
    """
    mu, sigma = sp.Symbol("mu", real=True), sp.Symbol("sigma", positive=True)
    log_density = -sp.log(sigma) - sp.log(2 * sp.pi) / 2 - (x - mu) ** 2 / (2 * sigma**2)
    return (
        sp.simplify(sp.integrate(-sp.hessian(log_density, (mu, sigma)) * sp.exp(log_density), (x, -sp.oo, sp.oo))),
        mu,
        sigma,
    )


def control_variate_optimum() -> dict:
    r"""SymPy minimises :math:`\mathrm{Var}(k_\lambda) = \mathrm{Var}(\log r) - 2\lambda\,\mathrm{Cov}(\log r, r - 1)
    + \lambda^2\,\mathrm{Var}(r - 1)` over :math:`\lambda`: ``{"variance", "lambda_star"}`` (SymPy expressions)."""
    variance_of_log = sp.Symbol(r"\mathrm{Var}(\log{r})")
    covariance = sp.Symbol(r"\mathrm{Cov}(\log{r}, r - 1)")
    variance_of_control = sp.Symbol(r"\mathrm{Var}(r - 1)")
    variance = variance_of_log - 2 * lam * covariance + lam**2 * variance_of_control
    return {"variance": variance, "lambda_star": sp.solve(sp.diff(variance, lam), lam)[0]}


def mean_shift_lambda_star() -> dict:
    r"""q = N(0, 1), p = N(mu_p, 1): :math:`\mathbb{E}_q[r^2]` integrated by SymPy, :math:`\lambda^*(\mu_p)
    = \mu_p^2 / (\mathbb{E}_q[r^2] - 1)` (both KL directions are :math:`\mu_p^2/2`) and its limit at 0."""
    shift = sp.Symbol(r"\mu_p", positive=True)
    standard_normal = sp.exp(-(x**2) / 2) / sp.sqrt(2 * sp.pi)
    shifted_normal = sp.exp(-((x - shift) ** 2) / 2) / sp.sqrt(2 * sp.pi)
    second_moment = sp.simplify(sp.integrate(shifted_normal**2 / standard_normal, (x, -sp.oo, sp.oo)))
    best = sp.simplify(shift**2 / (second_moment - 1))
    return {"symbol": shift, "second_moment": second_moment, "lambda_star": best, "limit": sp.limit(best, shift, 0)}


def shift_optimum() -> dict:
    r"""SymPy minimises :math:`\mathbb{E}_q[s_i^2 (L - \lambda)^2]` over :math:`\lambda`.

    Returns ``{"objective", "lambda_star"}`` (SymPy expressions)."""
    mean_s2L2, mean_s2L, mean_s2 = sp.symbols(r"E[s^2L^2] E[s^2L] E[s^2]")
    objective = mean_s2L2 - 2 * lam * mean_s2L + lam**2 * mean_s2
    return {"objective": objective, "lambda_star": sp.solve(sp.diff(objective, lam), lam)[0]}


def shift_candidates(shifts: pd.DataFrame, pooled: float) -> dict:
    """The shifts compared for k2 gradients: none, the derived optimum per parameter, pooled, and as printed."""
    derived, printed = "lambda* derived  E[s^2 L]/E[s^2]", "lambda as printed  E[s^2 L^2]/E[s^2]"
    return {
        "k2 (no shift)": 0.0,
        "derived lambda*_mu": shifts.loc[derived, "mu"],
        "derived lambda*_sigma": shifts.loc[derived, "sigma"],
        "pooled (derived)": pooled,
        "as printed, mu": shifts.loc[printed, "mu"],
        "as printed, sigma": shifts.loc[printed, "sigma"],
    }


__all__ = [
    "parabola_vertex",
    "lambda_star",
    "evaluate",
    "gaussian_fisher_information",
    "control_variate_optimum",
    "mean_shift_lambda_star",
    "shift_optimum",
    "shift_candidates",
    "shift_moments",
    "shift_table",
    "shift_comparison",
    "control_variate_scan",
    "lambda_star_sweep",
]
