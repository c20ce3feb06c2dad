r"""Framework clamps and low precision (notebook 09): clamp regions, clamp bias and onset, bf16/fp16/fp32
estimates and identical logits through different kernels."""

from __future__ import annotations

import numpy as np
import pandas as pd

from klsym.derive.estimators import get_estimator
from klsym.exact import clamps
from klsym.exact.expectations import (
    MODES,
)

# --- framework clamps and low precision (notebook 09) ------------------------------------------


def _setting_label(setting) -> str:
    return f"{setting.key}: {setting.estimator}, input {setting.input_clamp}, output {setting.output_clamp}"


def clamp_region_table(settings) -> pd.DataFrame:
    """Where each framework setting's clamps freeze its estimator (the region of t; edges to 6 digits)."""
    rows = []
    for setting in settings:
        region = clamps.saturation_region(setting.get_estimator(), setting.input_clamp, setting.output_clamp)
        rows.append(
            {
                "setting": setting.key,
                "estimator": setting.estimator,
                "input clamp": setting.input_clamp,
                "output clamp": setting.output_clamp,
                "frozen for": " or ".join(f"({lo:.6g}, {hi:.6g})" for lo, hi in region),
            }
        )
    return pd.DataFrame(rows)


def clamp_bias_sweep(settings, deltas) -> pd.DataFrame:
    r"""Relative bias of each setting's clamps (value and every gradient mode) along q = N(0, 1), p = N(δ, 1)
    (:func:`klsym.exact.clamps.gaussian_mean_shift_bias`), one row per setting and δ."""
    frames = [
        pd.DataFrame(
            clamps.gaussian_mean_shift_bias(
                s.estimator, deltas, s.input_clamp, s.output_clamp, detach_weight_outside_input_clamp=False
            )
        ).assign(setting=_setting_label(s))
        for s in settings
    ]
    return pd.concat(frames, ignore_index=True)


def clamp_onset_table(settings, threshold: float, deltas) -> pd.DataFrame:
    """The smallest δ (p = N(δ, 1)) at which each setting's clamp bias exceeds ``threshold``, with KL(q||p) there."""
    rows = []
    for setting in settings:
        for quantity in ("value", *MODES):
            delta_star = clamps.onset_distance(
                setting.estimator,
                setting.input_clamp,
                setting.output_clamp,
                quantity=quantity,
                threshold=threshold,
                deltas=deltas,
                detach_weight_outside_input_clamp=False,
            )
            rows.append(
                {
                    "setting": _setting_label(setting),
                    "quantity": quantity,
                    "threshold": threshold,
                    "onset delta": delta_star,
                    "KL(q||p) there": delta_star**2 / 2,
                }
            )
    return pd.DataFrame(rows)


def clamp_value_check(setting, q, p, log_ratios) -> pd.DataFrame:
    """A setting's clamped value: exact (clamped and unclamped) vs the clamped estimator on sampled log-ratios."""
    exact = clamps.clamp_bias(setting.estimator, q, p, setting.input_clamp, setting.output_clamp, quantities=["value"])[
        "value"
    ]
    samples = clamps.clamped_numeric(setting.estimator, setting.input_clamp, setting.output_clamp)(log_ratios)
    mean, se = samples.mean(), samples.std(ddof=1) / np.sqrt(len(samples))
    return pd.DataFrame(
        [
            {
                "exact unclamped": exact["unclamped"],
                "exact clamped": exact["clamped"],
                "MC clamped": mean,
                "MC se": se,
                "z (MC vs exact clamped)": (mean - exact["clamped"]) / se,
                "bias in MC standard errors": exact["bias"] / se,
            }
        ]
    )


def precision_table(logits_q, logits_p, dtypes=None, estimators="k1,k2,k3") -> pd.DataFrame:
    """:func:`klsym.exact.precision.token_level_error` for every dtype and pipeline, with |relative bias| and
    spread / KL."""
    from klsym.exact.precision import LOW_PRECISION, PIPELINES, token_level_error

    rows = []
    for dtype in dtypes or LOW_PRECISION:
        for pipeline in PIPELINES:
            rows += token_level_error(logits_q, logits_p, dtype, estimators, pipeline)
    table = pd.DataFrame(rows)
    table["|relative bias|"] = table["relative_bias"].abs()
    table["spread / KL"] = table["spread"] / table["exact"]
    return table


def precision_mc_check(
    logits_q, logits_p, rng, n: int, estimator="k3", dtypes=("bfloat16", "float16"), pipelines=("naive", "fp32")
) -> pd.DataFrame:
    r"""Monte Carlo confirmation of the low-precision bias: ``n`` tokens drawn from q with ``rng``, the sample mean
    of :math:`\hat k - k` against the exact q-weighted bias (z with the exact spread)."""
    from scipy.special import log_softmax

    from klsym.exact.precision import lowp_estimates, token_level_error

    estimator = get_estimator(estimator)
    log_q, log_p = log_softmax(logits_q), log_softmax(logits_p)
    probabilities = np.exp(log_q)
    tokens = rng.choice(len(logits_q), size=n, p=probabilities / probabilities.sum())
    rows = []
    for dtype in dtypes:
        for pipeline in pipelines:
            errors = lowp_estimates(estimator, log_p[tokens], log_q[tokens], dtype, pipeline) - estimator.numeric(
                log_p[tokens] - log_q[tokens]
            )
            exact = token_level_error(logits_q, logits_p, dtype, estimator.name, pipeline)[0]
            rows.append(
                {
                    "dtype": dtype,
                    "pipeline": pipeline,
                    "exact bias": exact["bias"],
                    "MC bias": errors.mean(),
                    "z": (errors.mean() - exact["bias"]) / (exact["spread"] / np.sqrt(errors.size)),
                }
            )
    return pd.DataFrame(rows)


def identical_logits_table(
    logits,
    dtypes=("bfloat16", "float16", "float32"),
    policy_kernel="fused",
    reference_kernels=("fused", "unfused", "chunked", "lowp"),
) -> pd.DataFrame:
    """:func:`klsym.exact.precision.identical_logits_kl` for each dtype and reference kernel: the q-mass of tokens
    with t != 0, the largest |t| and each estimator's exact expectation (the true KL is 0)."""
    from klsym.exact.precision import identical_logits_kl

    rows = []
    for dtype in dtypes:
        for reference_kernel in reference_kernels:
            out = identical_logits_kl(logits, dtype, policy_kernel, reference_kernel)
            rows.append(
                {
                    "dtype": dtype,
                    "policy kernel": policy_kernel,
                    "reference kernel": reference_kernel,
                    "P_q(t != 0)": out["mismatch_mass"],
                    "max |t|": out["max_abs_t"],
                    **{f"E_q[{name}]": value for name, value in out["estimates"].items()},
                }
            )
    return pd.DataFrame(rows)


def identical_logits_mc(case: dict, rng, n: int, estimator="k1") -> dict:
    """Monte Carlo of an estimator on tokens drawn (``rng``) from q of an :func:`identical_logits_kl` case."""
    tokens = rng.choice(len(case["q"]), size=n, p=case["q"] / case["q"].sum())
    samples = get_estimator(estimator).numeric(case["t"][tokens])
    return {
        "exact": case["estimates"][get_estimator(estimator).name],
        "mc": samples.mean(),
        "se": samples.std(ddof=1) / np.sqrt(samples.size),
    }


__all__ = [
    "clamp_region_table",
    "clamp_bias_sweep",
    "clamp_onset_table",
    "clamp_value_check",
    "precision_table",
    "precision_mc_check",
    "identical_logits_table",
    "identical_logits_mc",
]
