r"""Low-precision log-probabilities and KL estimators: bias, spread and "KL between identical logits".

Language-model logits and log-probabilities are often held in bfloat16 (8 significant bits) or
float16 (11 bits). A per-token estimator evaluates :math:`k(e^t)` with :math:`t = \log p - \log q`,
a small difference of two numbers of size :math:`|\log q| \sim 1\text{--}20`: rounding the
log-probabilities to bfloat16 changes t by up to one unit in the last place of :math:`\log q`,
:math:`2^{-8}|\log q|`, which is often larger than t itself.

Everything here is computed exactly over the vocabulary (sums weighted by q, no sampling):

* :func:`token_level_error`: the q-weighted bias and spread of :math:`\hat k - k` when the
  log-probabilities are rounded to a dtype and t and k are computed by one of
  :data:`PIPELINES`;
* :func:`identical_logits_kl`: two log-softmax kernels (fused vs unfused, different reduction
  orders) applied to the *same* low-precision logits give different log-probabilities, so the
  "KL" estimated between a policy and its bit-identical copy is not zero.

>>> round_to(np.array([1/3]), "bfloat16")
array([0.33398438])
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import sympy as sp
from scipy.special import log_softmax

from klsym.derive.estimators import get_estimators, in_logratio
from klsym.derive.symbols import t as _t
from klsym.rl.logprob import estimate_from_logratio

DTYPES = {
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float16": np.dtype(np.float16),
    "float32": np.dtype(np.float32),
    "float64": np.dtype(np.float64),
}
LOW_PRECISION = ("bfloat16", "float16", "float32")

#: How t and k are computed from log-probabilities held in a low-precision dtype.
PIPELINES = {
    "stored": "log-probs rounded to the dtype; t and k in float64 (stable forms): storage error only",
    "naive": "t = log p - log q and k = the closed form (e.g. exp(t) - 1 - t) in the dtype",
    "stable": "t and k in the dtype, k with klsym's stable form (expm1/log1p, Taylor branch)",
    "fp32": "log-probs rounded to the dtype, upcast to float32; t and k (stable) in float32",
}
#: Log-softmax implementations compared by :func:`identical_logits_kl`.
KERNELS = {
    "fused": "upcast logits to float32, x - logsumexp(x) in float32, round the result once",
    "unfused": "logsumexp in float32 rounded to the dtype, then x - lse in the dtype (two roundings)",
    "chunked": "as fused, but logsumexp reduced over blocks of 1024 logits in reverse order",
    "lowp": "max-shift, exp and log in the dtype; the sum accumulated in float32",
}


def get_dtype(name: str) -> np.dtype:
    """A dtype by name.

    >>> get_dtype("bf16")
    Traceback (most recent call last):
    ...
    ValueError: unknown dtype 'bf16'; known: bfloat16, float16, float32, float64
    """
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; known: {', '.join(DTYPES)}") from None


def round_to(values, dtype: str) -> np.ndarray:
    """Round float64 values to ``dtype`` and return them as float64 (exactly representable)."""
    return np.asarray(values, dtype=np.float64).astype(get_dtype(dtype)).astype(np.float64)


def zipf_logits(vocab_size: int, rng: np.random.Generator, exponent: float = 1.1, noise: float = 1.0) -> np.ndarray:
    r"""Zipf-like logits: :math:`-s \log(\text{rank}) + \text{noise}\cdot N(0, 1)` over a random
    ranking of the vocabulary (token probabilities fall off like rank^-s, as in LM outputs).

    >>> zipf_logits(5, np.random.default_rng(0)).shape
    (5,)
    """
    if vocab_size < 2:
        raise ValueError(f"vocab_size must be at least 2, got {vocab_size}")
    ranks = rng.permutation(vocab_size) + 1.0
    return -exponent * np.log(ranks) + noise * rng.standard_normal(vocab_size)


def policy_pair(
    vocab_size: int, rng: np.random.Generator, perturbation: float = 0.1, exponent: float = 1.1
) -> tuple[np.ndarray, np.ndarray]:
    """``(logits_q, logits_p)``: a Zipf-like reference p and a policy q = p + perturbation * N(0, 1)."""
    logits_p = zipf_logits(vocab_size, rng, exponent)
    return logits_p + perturbation * rng.standard_normal(vocab_size), logits_p


def _naive_function(estimator):
    # The closed form in t as printed by SymPy, with no expm1/log1p rewriting.
    return sp.lambdify(_t, in_logratio(estimator.expr), modules="numpy")


def lowp_estimates(estimator, log_p, log_q, dtype: str, pipeline: str = "stable") -> np.ndarray:
    """Per-token values of ``estimator`` from float64 log-probs held in ``dtype`` (float64 out)."""
    if pipeline not in PIPELINES:
        raise ValueError(f"unknown pipeline {pipeline!r}; known: {', '.join(PIPELINES)}")
    (estimator,) = get_estimators([estimator])
    low = get_dtype(dtype)
    lp, lq = np.asarray(log_p, np.float64).astype(low), np.asarray(log_q, np.float64).astype(low)
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        if pipeline == "stored":
            out = estimator.numeric(lp.astype(np.float64) - lq.astype(np.float64))
        elif pipeline == "fp32":
            out = estimate_from_logratio(estimator, lp.astype(np.float32) - lq.astype(np.float32))
        elif pipeline == "stable":
            out = estimate_from_logratio(estimator, lp - lq)
        else:
            t_low = lp - lq
            out = _naive_function(estimator)(t_low) + np.zeros_like(t_low)
    return np.asarray(out).astype(np.float64)


def _q_weighted(q: np.ndarray, error: np.ndarray) -> tuple[float, float, float]:
    finite = np.isfinite(error)
    mass = float(q[finite].sum())
    bias = float(np.sum(q[finite] * error[finite]) / mass) if mass > 0 else float("nan")
    spread = float(np.sqrt(np.sum(q[finite] * (error[finite] - bias) ** 2) / mass)) if mass > 0 else float("nan")
    return bias, spread, 1.0 - mass


def token_level_error(logits_q, logits_p, dtype: str, estimators="k1,k2,k3", pipeline: str = "stable") -> list[dict]:
    r"""Exact q-weighted error of per-token estimates computed in low precision.

    The float64 log-softmax of each logit vector is the truth. For each estimator the row holds
    ``exact`` :math:`\sum_i q_i k(e^{t_i})`, ``bias`` :math:`\sum_i q_i (\hat k_i - k_i)` (over
    tokens where :math:`\hat k` is finite), ``spread`` the q-weighted standard deviation of
    :math:`\hat k_i - k_i` (the token-level noise the rounding adds), ``relative_bias`` =
    bias / exact and ``nonfinite_mass`` the q-probability of an overflowed :math:`\hat k`.

    >>> lq, lp = np.log([0.5, 0.3, 0.2]), np.log([0.4, 0.4, 0.2])
    >>> row = token_level_error(lq, lp, "float64", "k3", "naive")[0]
    >>> abs(row["bias"]) < 1e-16, round(row["exact"], 6)
    (True, 0.025267)
    """
    log_q, log_p = log_softmax(np.asarray(logits_q, np.float64)), log_softmax(np.asarray(logits_p, np.float64))
    if log_q.shape != log_p.shape:
        raise ValueError(f"logits of q and p differ in shape: {log_q.shape} vs {log_p.shape}")
    q = np.exp(log_q)
    rows = []
    for estimator in get_estimators(estimators):
        exact_values = estimator.numeric(log_p - log_q)
        exact = float(np.sum(q * exact_values))
        error = lowp_estimates(estimator, log_p, log_q, dtype, pipeline) - exact_values
        bias, spread, nonfinite = _q_weighted(q, error)
        rows.append(
            {
                "estimator": estimator.name,
                "dtype": dtype,
                "pipeline": pipeline,
                "exact": exact,
                "bias": bias,
                "relative_bias": bias / exact if exact else float("nan"),
                "spread": spread,
                "max_abs_error": float(np.max(np.abs(error[np.isfinite(error)]), initial=0.0)),
                "nonfinite_mass": nonfinite,
            }
        )
    return rows


def _logsumexp32(x32: np.ndarray) -> np.float32:
    m = np.max(x32)
    return np.float32(m + np.log(np.sum(np.exp(x32 - m), dtype=np.float32)))


def log_softmax_kernel(logits, dtype: str, kernel: str = "fused") -> np.ndarray:
    """Log-softmax of logits held in ``dtype`` by one of :data:`KERNELS`; float64 of dtype values.

    >>> lp = log_softmax_kernel(np.array([0.0, 1.0, 2.0]), "float32")
    >>> bool(np.allclose(lp, log_softmax(np.array([0.0, 1.0, 2.0])), rtol=1e-6))
    True
    """
    low = get_dtype(dtype)
    x = np.asarray(logits, np.float64).astype(low)
    x32 = x.astype(np.float32)
    with np.errstate(over="ignore", invalid="ignore"):
        if kernel == "fused":
            out = (x32 - _logsumexp32(x32)).astype(low)
        elif kernel == "unfused":
            out = x - np.asarray(_logsumexp32(x32)).astype(low)
        elif kernel == "chunked":
            blocks = [_logsumexp32(x32[i : i + 1024]) for i in range(0, x32.size, 1024)][::-1]
            lse = np.float32(blocks[0])
            for block in blocks[1:]:
                lse = np.logaddexp(lse, block, dtype=np.float32)
            out = (x32 - lse).astype(low)
        elif kernel == "lowp":
            shifted = x - np.max(x)
            total = np.sum(np.exp(shifted), dtype=np.float32)
            out = shifted - np.log(np.asarray(total).astype(low))
        else:
            raise ValueError(f"unknown kernel {kernel!r}; known: {', '.join(KERNELS)}")
    return np.asarray(out).astype(np.float64)


def identical_logits_kl(
    logits, dtype: str, policy_kernel: str = "fused", reference_kernel: str = "unfused", estimators="k1,k2,k3"
) -> dict:
    r""" "KL" between a policy and a bit-identical reference whose log-softmax uses another kernel.

    Both models produce the same ``dtype`` logits; the policy q's log-probs come from
    ``policy_kernel``, the reference p's from ``reference_kernel``. Then
    :math:`t_i = \log p_i - \log q_i` is not zero and each estimator's exact expectation
    :math:`\sum_i q_i k(e^{t_i})` (q = the policy's float64 softmax) is a spurious KL; the true
    KL is 0.

    Returns ``{"mismatch_mass": P_q(t != 0), "max_abs_t": ..., "estimates": {name: E_q[k]}}``.

    >>> out = identical_logits_kl(np.linspace(-5, 5, 4096), "bfloat16", "fused", "fused")
    >>> out["mismatch_mass"], out["estimates"]["k3"]
    (0.0, 0.0)
    """
    log_q = log_softmax_kernel(logits, dtype, policy_kernel)
    log_p = log_softmax_kernel(logits, dtype, reference_kernel)
    t = log_p - log_q  # exact: both are dtype numbers
    q = np.exp(log_softmax(round_to(logits, dtype)))
    estimates = {e.name: float(np.sum(q * e.numeric(t))) for e in get_estimators(estimators)}
    return {
        "dtype": dtype,
        "policy_kernel": policy_kernel,
        "reference_kernel": reference_kernel,
        "mismatch_mass": float(q[t != 0].sum()),
        "max_abs_t": float(np.max(np.abs(t))),
        "estimates": estimates,
        "t": t,
        "q": q,
    }


__all__ = [
    "DTYPES",
    "LOW_PRECISION",
    "PIPELINES",
    "KERNELS",
    "get_dtype",
    "round_to",
    "zipf_logits",
    "policy_pair",
    "lowp_estimates",
    "token_level_error",
    "log_softmax_kernel",
    "identical_logits_kl",
]
