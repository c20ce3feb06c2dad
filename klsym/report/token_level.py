r"""Token-level tables (notebook 07): LLM-shaped categorical policies, per-token and per-sequence
bias and spread, batch-max spikes and clamps, exact next to Monte Carlo."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd

from klsym.exact import clamps
from klsym.exact.expectations import (
    KL_QP,
    MODES,
    estimator_stats,
    kl_divergences,
)
from klsym.exact.families import Categorical
from klsym.report.compare import _names

# --- token level (categorical) -----------------------------------------------------------------


def zipf_policies(vocab_size: int, exponent: float, perturbation: float, temperatures, rng) -> tuple:
    r"""A Zipf-like reference p (logits :math:`-s \log \mathrm{rank}`) and policies q: p's logits plus Gaussian
    noise of sd ``perturbation`` (drawn from ``rng``), and p at each temperature.

    Returns ``(p, {label: q})``.
    """
    base = -exponent * np.log(np.arange(1, vocab_size + 1))
    policies = {
        f"perturbed (noise sd {perturbation:g})": Categorical(base + perturbation * rng.standard_normal(vocab_size))
    }
    policies.update({f"temperature {tau:g}": Categorical(base / tau) for tau in temperatures})
    return Categorical(base), policies


def policy_summary(policies: Mapping, p) -> pd.DataFrame:
    """Both KL directions and the largest |t| on q's support, per policy."""
    return pd.DataFrame(
        {
            label: {**kl_divergences(q, p), "max |t| on q's support": float(np.abs(p.log_probs - q.log_probs).max())}
            for label, q in policies.items()
        }
    ).T


def sequence_table(estimators, q, p, positions, *, n: int, seed: int = 0) -> pd.DataFrame:
    r"""k of the sequence ratio :math:`\prod_i r_i` over T i.i.d. positions vs the sum of per-token k.

    Exact: enumeration of all :math:`V^T` sequences (``positions``) and T times the per-token moments.
    Monte Carlo: ``n`` sequences drawn token by token with ``default_rng(seed + T)``. Every column is
    relative to KL(q||p) over T positions; z uses the exact standard error.
    """
    token_t = p.log_probs - q.log_probs
    rows = []
    for T in positions:
        kl = kl_divergences(q, p, positions=T)[KL_QP]
        tokens = np.random.default_rng(seed + T).choice(len(q.probs), size=(n, T), p=q.probs)
        for estimator in _names(estimators):
            sequence, token = estimator_stats(estimator, q, p, positions=T), estimator_stats(estimator, q, p)
            mc_sequence = estimator.numeric(token_t[tokens].sum(axis=1))
            mc_sum = estimator.numeric(token_t[tokens]).sum(axis=1)
            rows.append(
                {
                    "T": T,
                    "estimator": estimator.name,
                    "KL(q||p), T positions": kl,
                    "k(seq ratio): exact mean / KL": sequence["mean"] / kl,
                    "MC": mc_sequence.mean() / kl,
                    "z": (mc_sequence.mean() - sequence["mean"]) / (sequence["std"] / np.sqrt(n)),
                    "exact sd / KL": sequence["std"] / kl,
                    "MC sd / KL": mc_sequence.std() / kl,
                    "sum of per-token k: exact mean / KL": T * token["mean"] / kl,
                    "MC (sum)": mc_sum.mean() / kl,
                    "exact sd / KL (sum)": np.sqrt(T) * token["std"] / kl,
                    "MC sd / KL (sum)": mc_sum.std() / kl,
                }
            )
    return pd.DataFrame(rows)


def spike_table(
    estimators, policies: Mapping, p, *, batch_tokens: int, batches: int, clamp: float, seed: int = 0
) -> tuple[pd.DataFrame, pd.DataFrame]:
    r"""The largest value in a batch of B tokens: exact quantiles of the batch maximum
    (:math:`P(\max \le c) = F(c)^B`, F exact over the vocabulary) vs Monte Carlo batches
    (``default_rng(seed + index)`` per policy), and the exact probability that a batch holds a token with
    :math:`|k| >` ``clamp``. Returns ``(table, maxima)``, ``maxima`` one row per Monte Carlo batch.
    """
    rows, maxima_frames = [], []
    for index, (label, q) in enumerate(policies.items()):
        t = p.log_probs - q.log_probs
        drawn = q.sample(np.random.default_rng(seed + index), (batches, batch_tokens))
        for estimator in _names(estimators):
            values = np.asarray(estimator.numeric(t))
            order = np.argsort(values)
            cdf = np.cumsum(q.probs[order])
            exact_quantiles = {
                level: values[order][min(np.searchsorted(cdf, level ** (1 / batch_tokens)), len(cdf) - 1)]
                for level in (0.5, 0.99)
            }
            maxima = values[drawn].max(axis=1)
            beyond = float(np.sum(q.probs[np.abs(values) > clamp]))
            rows.append(
                {
                    "policy q": label,
                    "estimator": estimator.name,
                    "max over vocabulary": values.max(),
                    "median batch max: exact": exact_quantiles[0.5],
                    "median batch max: MC": np.median(maxima),
                    "99% batch max: exact": exact_quantiles[0.99],
                    "99% batch max: MC": np.quantile(maxima, 0.99),
                    f"P(|k| > {clamp:g}) per token": beyond,
                    f"P(batch has |k| > {clamp:g})": -np.expm1(batch_tokens * np.log1p(-beyond)),
                }
            )
            maxima_frames.append(pd.DataFrame({"policy q": label, "estimator": estimator.name, "batch max": maxima}))
    return pd.DataFrame(rows), pd.concat(maxima_frames, ignore_index=True)


def saturation_table(estimators, clamp: float) -> pd.DataFrame:
    """Where an input clamp |t| <= a and an output clamp |k| <= c (a = c = ``clamp``) freeze each estimator."""
    return pd.DataFrame(
        {
            e.name: {
                "input clamp |t| <= a": clamps.format_region(clamps.saturation_region(e.name, input_clamp=clamp)),
                "output clamp |k| <= c": clamps.format_region(clamps.saturation_region(e.name, output_clamp=clamp)),
            }
            for e in _names(estimators)
        }
    ).T


def clamp_table(estimators, policies: Mapping, p, clamp: float, *, n: int, seed: int = 0) -> pd.DataFrame:
    r"""What input and output clamps at ``clamp`` do to the value and to each gradient mode: exact
    (:func:`klsym.exact.clamps.clamp_bias`) vs Monte Carlo (the clamped estimator on ``n`` tokens drawn
    with ``default_rng(seed + index)`` per policy; z uses the sample standard error)."""
    rows = []
    for index, (label, q) in enumerate(policies.items()):
        t = (p.log_probs - q.log_probs)[q.sample(np.random.default_rng(seed + index), n)]
        for estimator in _names(estimators):
            for kind, options in (("input", {"input_clamp": clamp}), ("output", {"output_clamp": clamp})):
                out = clamps.clamp_bias(estimator.name, q, p, **options)
                clamped = np.asarray(clamps.clamped_numeric(estimator.name, **options)(t))
                spread = clamped.std()
                rows.append(
                    {
                        "policy q": label,
                        "estimator": estimator.name,
                        "clamp": f"{kind} ±{clamp:g}",
                        "value: unclamped": out["value"]["unclamped"],
                        "value: clamped (exact)": out["value"]["clamped"],
                        "value: clamped (MC)": clamped.mean(),
                        "z": (clamped.mean() - out["value"]["clamped"]) / (spread / np.sqrt(n)) if spread > 0 else 0.0,
                        "value rel. bias": out["value"]["relative"],
                        **{f"{mode} grad rel. bias": out["gradient"][mode]["relative"] for mode in MODES},
                    }
                )
    return pd.DataFrame(rows)


__all__ = ["zipf_policies", "policy_summary", "sequence_table", "spike_table", "saturation_table", "clamp_table"]
