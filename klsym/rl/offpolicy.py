r"""Off-policy KL terms: tokens drawn from a behaviour policy b, gradients taken for q = pi_theta.

Every combination of estimator k, gradient mode and **weighting** is written as one per-token expression in
``logq`` (differentiable), ``logp`` and ``logb`` (:mod:`klsym.rl.expressions`), with :math:`t = \log p - \log q`
and :math:`w = q/b = e^{\log q - \log b}`:

=============================  ====================================================================
weighting                      loss term (mode ``loss``; ``reward`` uses :math:`\mathrm{sg}(k)\log q`)
=============================  ====================================================================
``none``                       :math:`k` (samples used as if drawn from q)
``token-is``                   :math:`\mathrm{sg}(w)\, k`
``token-is-differentiable``    :math:`e^{\log q - \mathrm{sg}(\log b)} k` (reward terms as ``token-is``)
``truncated-is``               :math:`\min(\mathrm{sg}(w), c)\, k`
``ppo-clip``                   (reward only) :math:`\max(w\,\mathrm{sg}(k),\ \mathrm{clip}(w, 1-\epsilon, 1+\epsilon)\,\mathrm{sg}(k))`,
                               PPO's clipped objective with advantage :math:`-k`
=============================  ====================================================================

One token's gradient is :math:`c(x)\, \nabla_\theta \log q_\theta(x)` with :math:`c = \partial L/\partial \log q`, so

.. math:: \mathbb{E}_{x\sim b}[\nabla L] = \mathbb{E}_b[c\, s_q], \qquad
          \mathbb{E}_b[\mathrm{sg}(w)\, c\, s_q] = \mathbb{E}_q[c\, s_q]

(``token-is`` is the on-policy answer whenever :math:`b > 0` where :math:`q > 0`). Exact: categorical sums
(:math:`\mathbb{E}_b[c\,s_j] = b_j c_j - q_j \sum_x b_x c_x`); Gaussian: closed forms where k decomposes
into :math:`r^a (\log r)^n` and the weighting is ``none``, ``token-is`` or ``token-is-differentiable``
(:func:`gaussian_closed_form`; three Gaussians still give Gaussian integrals, finite iff
:math:`a(1/\sigma_q^2 - 1/\sigma_p^2) < 1/\sigma_b^2` for every power a), log-space quadrature over b otherwise
(:mod:`klsym.exact.quadrature`; a divergent integral comes back infinite). The second moment of
:math:`w` under Gaussians is finite iff :math:`\sigma_b^2 > \sigma_q^2/2`; the per-sample gradient
variance of ``token-is`` k3 needs in addition :math:`\sigma_b^2 > \sigma_p^2/2`-type conditions, which the
quadrature detects (``variance_finite``).

>>> from klsym.exact.families import Categorical
>>> q, p, b = Categorical([0.0, 0.5, -0.5]), Categorical([0.3, 0.0, 0.2]), Categorical([0.2, 0.1, -0.2])
>>> exact = offpolicy_gradient("k1", "reward", "token-is", q, p, b)
>>> bool(np.allclose(exact["gradient"], true_gradient(q, p)))     # token-is k1 reward = grad KL(q||p)
True
"""

from __future__ import annotations

import math
from functools import cache

import numpy as np
import pandas as pd
import sympy as sp

from klsym.derive.estimators import Estimator, get_estimator, in_logratio
from klsym.derive.symbols import t
from klsym.exact import quadrature
from klsym.exact.expectations import KL_QP, MODES, kl_divergences, true_gradients
from klsym.exact.families import Categorical, Gaussian, check_same_family
from klsym.rl import expressions as ex
from klsym.rl.weightings import (
    DEFAULT_CLIP,
    DEFAULT_TRUNCATION,
    SEQUENCE_PLACEMENTS,
    SEQUENCE_WEIGHTINGS,
    UNBIASED_WEIGHTINGS,
    WEIGHTINGS,
)

# --- the expression of (estimator, mode, weighting) --------------------------------------------------


def _in_logprobs(expr_t: sp.Expr) -> sp.Expr:
    return expr_t.subs(t, ex.logp - ex.logq)


@cache
def term_expression(
    estimator, mode: str, weighting: str = "none", truncation: float = DEFAULT_TRUNCATION, clip: float = DEFAULT_CLIP
) -> tuple[sp.Expr, str, sp.Expr]:
    r"""``(expression, enters, value)`` of one weighted KL term (see the module table); ``value`` is the
    weighted estimate of the KL the term carries (the expression itself, except in ``full`` mode).

    >>> term_expression("k3", "loss", "token-is-differentiable")[0]
    (-logp + logq + exp(logp - logq) - 1)*exp(logq - sg(logb))
    """
    estimator = get_estimator(estimator)
    if mode not in MODES:
        raise ValueError(f"unknown gradient mode {mode!r}; choose one of {', '.join(MODES)}")
    if weighting not in WEIGHTINGS:
        raise ValueError(f"unknown weighting {weighting!r}; choose one of {', '.join(WEIGHTINGS)}")
    truncation = _positive(truncation, "truncation c")
    clip = _positive(clip, "PPO clip epsilon")
    value = _in_logprobs(in_logratio(estimator.expr))
    pathwise = _in_logprobs(in_logratio(estimator.surrogate))
    if estimator.straight_through:  # value of k, gradient of the surrogate
        pathwise = pathwise - ex.sg(pathwise) + ex.sg(value)
    w = sp.exp(ex.logq - ex.logb)
    if weighting == "ppo-clip":
        if mode != "reward":
            raise ValueError("ppo-clip weights the reward (advantage -k) only: use mode 'reward'")
        eps = sp.nsimplify(clip)
        return (sp.Max(w * ex.sg(value), ex.clamp(w, 1 - eps, 1 + eps) * ex.sg(value)), "loss", ex.sg(w) * value)
    factor = {
        "none": sp.S.One,
        "token-is": ex.sg(w),
        "token-is-differentiable": ex.sg(w),
        "truncated-is": sp.Min(ex.sg(w), sp.nsimplify(truncation)),
    }[weighting]
    loss_factor = sp.exp(ex.logq - ex.sg(ex.logb)) if weighting == "token-is-differentiable" else factor
    if mode == "reward":
        return factor * value, "reward", factor * value
    loss = loss_factor * pathwise
    if mode == "loss":
        return loss, "loss", loss
    return loss + ex.sg(factor * value) * ex.logq, "loss", loss


def _positive(value, what: str) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a positive number, got {value!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{what} must be a positive finite number, got {value!r}")
    return value


# --- the three distributions -------------------------------------------------------------------


def check_triple(q, p, b) -> None:
    """q, p and b of one family; b must put mass wherever q does (and q wherever b samples)."""
    check_same_family(q, p)
    check_same_family(q, b)
    if isinstance(q, Categorical):
        on_q, on_b = np.isfinite(q.log_probs), np.isfinite(b.log_probs)
        missing = np.flatnonzero(on_q & ~on_b)
        if missing.size:
            raise ValueError(
                f"behaviour b has zero probability on tokens where q has mass (token {missing[0]}): "
                "the importance weight q/b is infinite there"
            )
        extra = np.flatnonzero(on_b & ~on_q)
        if extra.size:
            raise ValueError(f"q has zero probability on tokens b samples (token {extra[0]}): log q = -inf there")


def _per_token(expr: sp.Expr, enters: str, q, p, b, x, value_expr: sp.Expr | None = None):
    """(value, coefficient c) of the expression at tokens/points x drawn from b."""
    lq, lp, lb = q.log_prob(x), p.log_prob(x), b.log_prob(x)
    value = ex.numeric(expr if value_expr is None else value_expr)(lq, lp, lb)
    coefficient = ex.numeric(ex.coefficient(expr, enters))(lq, lp, lb)
    return value, coefficient


def exact_expression(expr: sp.Expr, enters: str, q, p, b, value_expr: sp.Expr | None = None) -> dict:
    r"""Exact :math:`\mathbb{E}_b[L]`, :math:`\mathbb{E}_b[c\,s_q]` and the per-sample gradient std under b.

    Categorical: sums over b's support; Gaussian: quadrature over b (``method``). ``variance_finite`` is
    False where the second moment of the gradient sample diverges.
    """
    check_triple(q, p, b)
    if isinstance(q, Categorical):
        x = np.arange(q.size)[np.isfinite(b.log_probs)]
        probs = b.probs[x]
        value, c = _per_token(expr, enters, q, p, b, x, value_expr)
        with np.errstate(invalid="ignore", over="ignore"):
            mean_c = float(np.sum(probs * c))
            gradient = -q.probs * mean_c
            gradient[x] += probs * c
            second = q.probs**2 * float(np.sum(probs * c**2))
            second[x] += probs * c**2 * (1 - 2 * q.probs[x])
            variance = second - gradient**2
        return {
            "value": float(np.sum(probs * value)),
            "gradient": gradient,
            "gradient_std": np.sqrt(np.maximum(variance, 0.0)),
            "variance_finite": bool(np.all(np.isfinite(second))),
            "method": "exact_sum",
        }
    if not isinstance(q, Gaussian):
        raise ValueError(f"unsupported family {type(q).__name__}")
    value_fn = ex.numeric(expr if value_expr is None else value_expr)
    c_fn = ex.numeric(ex.coefficient(expr, enters))

    def c_of(z):
        return c_fn(q.log_prob(z), p.log_prob(z), b.log_prob(z))

    value = quadrature.expect(b, lambda z: value_fn(q.log_prob(z), p.log_prob(z), b.log_prob(z)))[0]
    gradient = np.array([quadrature.expect(b, lambda z, i=i: c_of(z) * q.score(z)[..., i])[0] for i in range(2)])
    second = np.array([quadrature.expect(b, lambda z, i=i: (c_of(z) * q.score(z)[..., i]) ** 2)[0] for i in range(2)])
    finite = bool(np.all(np.isfinite(second)))
    variance = second - gradient**2 if finite else np.full(2, math.inf)
    return {
        "value": float(value),
        "gradient": gradient,
        "gradient_std": np.sqrt(np.maximum(variance, 0.0)),
        "variance_finite": finite,
        "method": "quadrature",
    }


def offpolicy_gradient(
    estimator, mode: str, weighting: str, q, p, b, truncation: float = DEFAULT_TRUNCATION, clip: float = DEFAULT_CLIP
) -> dict:
    """:func:`exact_expression` of :func:`term_expression` (one estimator, mode, weighting)."""
    expr, enters, value = term_expression(get_estimator(estimator), mode, weighting, truncation, clip)
    out = exact_expression(expr, enters, q, p, b, value)
    if isinstance(q, Gaussian):
        closed = gaussian_closed_form(estimator, mode, weighting, q, p, b)
        if closed is not None and np.all(np.isfinite(closed["gradient"])):
            out.update(closed, method="closed_form", quadrature_gradient=out["gradient"])
    return out


# --- Gaussian closed forms (three Gaussians) -------------------------------------------------------
#
# With sampler b = N(m, s^2) and t = log p - log q, M(a) = E_b[e^{a t}] is a Gaussian integral
# (klsym.derive.gaussian_closed_form.log_mgf), finite iff a (1/sigma_q^2 - 1/sigma_p^2) < 1/s^2. Derivatives in
# (a, m, s) give every moment needed: E_b[r^a t^n] = d^n M / da^n, E_b[r^a t^n (x - m)] = s^2 d/dm (.),
# E_b[r^a t^n (x - m)^2] = s^3 d/ds (.) + s^2 (.), and the score of q is a polynomial in x - m.


@cache
def _behaviour_term_function(a, n: int):
    """Lambdified (m, s, mu, sigma, mu_p, sigma_p) -> [E r^a t^n, E r^a t^n s_mu, E r^a t^n s_sigma] under N(m, s)."""
    from klsym.derive.gaussian_closed_form import log_mgf

    log_m = log_mgf()
    names = {str(symbol): symbol for symbol in log_m.free_symbols}
    a_, m, s_, mu, sigma = (names[k] for k in ("a", "m", "s", "mu_q", "sigma_q"))
    moment = sp.diff(sp.exp(log_m), a_, n)
    first = s_**2 * sp.diff(moment, m)  # E[f (x - m)]
    second = s_**3 * sp.diff(moment, s_) + s_**2 * moment  # E[f (x - m)^2]
    d = m - mu
    score_mu = (first + d * moment) / sigma**2
    score_sigma = ((second + 2 * d * first + d**2 * moment) / sigma**2 - moment) / sigma
    exprs = [e.subs(a_, a) for e in (moment, score_mu, score_sigma)]
    arguments = (m, s_, mu, sigma, names["mu_p"], names["sigma_p"])
    return sp.lambdify(arguments, exprs, modules="mpmath", cse=True)


def behaviour_condition_holds(a, q: Gaussian, p: Gaussian, b: Gaussian) -> bool:
    r""":math:`\mathbb{E}_b[r^a]` finite: :math:`a\,(1/\sigma_q^2 - 1/\sigma_p^2) < 1/\sigma_b^2` (exact rationals)."""
    from fractions import Fraction

    a = Fraction(sp.Rational(sp.nsimplify(a)).p, sp.Rational(sp.nsimplify(a)).q)
    return a * (1 / Fraction(q.sigma) ** 2 - 1 / Fraction(p.sigma) ** 2) < 1 / Fraction(b.sigma) ** 2


def _behaviour_expectations(terms, q: Gaussian, p: Gaussian, b: Gaussian) -> np.ndarray:
    """[E_b[h], E_b[h s_mu], E_b[h s_sigma]] for h = sum c r^a t^n (NaN where a term diverges)."""
    import mpmath

    from klsym.exact.closed_form import precise

    if not all(behaviour_condition_holds(a, q, p, b) for _, a, _ in terms):
        return np.full(3, np.nan)

    def compute():
        mpf = mpmath.mpf
        total = [mpf(0)] * 3
        for c, a, n in terms:
            values = _behaviour_term_function(a, n)(
                mpf(b.mu), mpf(b.sigma), mpf(q.mu), mpf(q.sigma), mpf(p.mu), mpf(p.sigma)
            )
            coefficient = (
                mpmath.mpf(sp.Rational(c).p) / sp.Rational(c).q if sp.sympify(c).is_Rational else mpmath.mpf(float(c))
            )
            total = [x + coefficient * v for x, v in zip(total, values)]
        return total

    return np.array([float(v) for v in precise(compute)])


def gaussian_closed_form(estimator, mode: str, weighting: str, q: Gaussian, p: Gaussian, b: Gaussian) -> dict | None:
    r"""Closed-form value and gradient for ``none``, ``token-is`` and ``token-is-differentiable`` (None otherwise or
    where k has no decomposition into :math:`r^a (\log r)^n`).

    ``none``: :math:`\mathbb{E}_b[h(r)\,s_q]` with the mode coefficient h, three Gaussians. ``token-is``:
    :math:`\mathbb{E}_b[w\,h\,s_q] = \mathbb{E}_q[h\,s_q]`; ``token-is-differentiable`` in the loss:
    :math:`\mathbb{E}_b[w(k + h_{loss})s_q]`, the on-policy ``full`` mode (klsym.exact.expectations).
    """
    from klsym.derive.gaussian_closed_form import decompose
    from klsym.derive.symbolic import mode_coefficient
    from klsym.exact.expectations import estimator_gradient, estimator_stats

    estimator = get_estimator(estimator)
    if weighting not in ("none", "token-is", "token-is-differentiable"):
        return None
    value_terms = decompose(estimator.expr)
    if value_terms is None or any(decompose(mode_coefficient(estimator, m)) is None for m in MODES):
        return None
    if weighting == "none":
        value = _behaviour_expectations(value_terms, q, p, b)[0]
        gradient = _behaviour_expectations(decompose(mode_coefficient(estimator, mode)), q, p, b)[1:]
        return {"value": float(value), "gradient": gradient}
    value = estimator_stats(estimator, q, p)["mean"]
    if weighting == "token-is" or mode == "reward":
        return {"value": value, "gradient": estimator_gradient(estimator, q, p, mode)}
    gradient = estimator_gradient(estimator, q, p, "full")
    if mode == "full":
        gradient = gradient + estimator_gradient(estimator, q, p, "reward")
    return {"value": value, "gradient": gradient}


def true_gradient(q, p) -> np.ndarray:
    """Gradient of KL(q||p) wrt q's parameters (:func:`klsym.exact.expectations.true_gradients`)."""
    return np.asarray(true_gradients(q, p)[KL_QP], dtype=float)


def drift(q, b) -> float:
    """KL(b||q): how far the behaviour policy has drifted from q."""
    return float(kl_divergences(b, q)[KL_QP])


# --- Monte Carlo from b ---------------------------------------------------------------------------


def monte_carlo(
    expr: sp.Expr, enters: str, q, p, b, n: int = 200_000, seed: int = 0, value_expr: sp.Expr | None = None
) -> dict:
    r"""Mean and standard error of the value and of the gradient sample :math:`c(x)\, s_q(x)`, x ~ b."""
    check_triple(q, p, b)
    if isinstance(n, bool) or int(n) != n or n < 2:
        raise ValueError(f"n must be an integer >= 2, got {n!r}")
    rng = np.random.default_rng(seed)
    x = b.sample(rng, int(n))
    value, c = _per_token(expr, enters, q, p, b, x, value_expr)
    samples = c[:, None] * q.score(x)
    return {
        "value": float(value.mean()),
        "value_se": float(value.std(ddof=1) / math.sqrt(n)),
        "gradient": samples.mean(0),
        "gradient_se": samples.std(0, ddof=1) / math.sqrt(n),
        "n": int(n),
    }


# --- summaries and tables -------------------------------------------------------------------------


def _estimators(estimators) -> list[Estimator]:
    if isinstance(estimators, str):
        estimators = [e.strip() for e in estimators.split(",") if e.strip()]
    return [get_estimator(e) for e in estimators]


def relative_bias(a, b) -> float:
    """|a - b| / |b|; NaN where b is zero (k1's loss-mode gradient): the absolute bias column says it then."""
    scale = float(np.linalg.norm(b))
    difference = float(np.linalg.norm(np.asarray(a) - np.asarray(b)))
    return difference / scale if scale > 1e-12 * max(1.0, difference) else math.nan


def offpolicy_rows(
    q,
    p,
    b,
    estimators="k1,k2,k3",
    modes=MODES,
    weightings=WEIGHTINGS,
    truncation: float = DEFAULT_TRUNCATION,
    clip: float = DEFAULT_CLIP,
) -> list[dict]:
    """One row per (estimator, mode, weighting): exact value and gradient under b, and their bias
    against the on-policy value/gradient (b = q) and against grad KL(q||p)."""
    check_triple(q, p, b)
    truth = true_gradient(q, p)
    kl = kl_divergences(q, p)[KL_QP]
    rows = []
    for estimator in _estimators(estimators):
        for mode in modes:
            on = offpolicy_gradient(estimator, mode, "none", q, p, q, truncation, clip)
            for weighting in weightings:
                if weighting == "ppo-clip" and mode != "reward":
                    continue
                off = offpolicy_gradient(estimator, mode, weighting, q, p, b, truncation, clip)
                rows.append(
                    {
                        "estimator": estimator.name,
                        "mode": mode,
                        "weighting": weighting,
                        "value": off["value"],
                        "value bias vs on-policy": off["value"] - on["value"],
                        f"value bias vs {KL_QP}": off["value"] - kl,
                        "gradient": off["gradient"],
                        "on-policy gradient": on["gradient"],
                        "gradient bias vs on-policy": float(np.linalg.norm(off["gradient"] - on["gradient"])),
                        "relative gradient bias vs on-policy": relative_bias(off["gradient"], on["gradient"]),
                        f"relative error vs grad {KL_QP}": relative_bias(off["gradient"], truth),
                        "gradient std (per sample)": off["gradient_std"],
                        "variance finite": off["variance_finite"],
                        "method": off["method"],
                    }
                )
    return rows


def offpolicy_summary(
    q,
    p,
    b,
    estimators="k1,k2,k3",
    weightings=WEIGHTINGS,
    truncation: float = DEFAULT_TRUNCATION,
    clip: float = DEFAULT_CLIP,
) -> dict:
    """The ``--behaviour`` JSON object of ``klsym gradient``: drift, truths and one entry per row."""
    rows = offpolicy_rows(q, p, b, estimators, MODES, weightings, truncation, clip)
    return {
        "family": q.name,
        "q": _params(q),
        "p": _params(p),
        "b": _params(b),
        "positions": 1,
        "drift KL(b||q)": drift(q, b),
        "kl": kl_divergences(q, p),
        "true": {KL_QP: true_gradient(q, p)},
        "truncation": truncation,
        "clip": clip,
        "rows": rows,
    }


def _params(family):
    return list(family.params) if isinstance(family, Gaussian) else family.logits


def value_rows(
    q,
    p,
    b,
    estimators="k1,k2,k3",
    weightings=("none", "token-is", "truncated-is"),
    truncation: float = DEFAULT_TRUNCATION,
) -> list[dict]:
    """Exact :math:`\\mathbb{E}_b[\\text{weight}\\cdot k]` per estimator and weighting, with its bias vs KL(q||p)."""
    kl = kl_divergences(q, p)[KL_QP]
    rows = []
    for estimator in _estimators(estimators):
        for weighting in weightings:
            out = offpolicy_gradient(estimator, "loss", weighting, q, p, b, truncation)
            rows.append(
                {
                    "estimator": estimator.name,
                    "weighting": weighting,
                    "mean": out["value"],
                    f"bias vs {KL_QP}": out["value"] - kl,
                }
            )
    return rows


def drift_table(
    q,
    p,
    behaviours: dict,
    estimators="k1,k2,k3",
    modes=("loss", "reward", "full"),
    weightings=WEIGHTINGS,
    truncation: float = DEFAULT_TRUNCATION,
    clip: float = DEFAULT_CLIP,
) -> pd.DataFrame:
    """Gradient bias (vs on-policy) of every weighting for each behaviour ``{label: b}``, long format."""
    rows = []
    for label, b in behaviours.items():
        for row in offpolicy_rows(q, p, b, estimators, modes, weightings, truncation, clip):
            rows.append(
                {
                    "behaviour": label,
                    "drift KL(b||q)": drift(q, b),
                    **{k: v for k, v in row.items() if not isinstance(v, np.ndarray)},
                    "max per-sample std": float(np.max(row["gradient std (per sample)"])),
                }
            )
    return pd.DataFrame(rows)


def behaviours(q: Categorical, epoch_scales=(0.05, 0.3), seed: int = 0, engine_dtype: str = "bfloat16") -> dict:
    """Behaviour policies for q: before one update (``one PPO epoch``: q's logits minus N(0, s^2) noise), before
    several, and an inference engine that holds the logits in ``engine_dtype`` (:mod:`klsym.exact.precision`)."""
    from klsym.exact.precision import round_to

    rng = np.random.default_rng(seed)
    names = ("one PPO epoch", "several epochs") + tuple(f"epochs x{i}" for i in range(3, len(epoch_scales) + 1))
    out = {
        name: Categorical(q.logits - scale * rng.standard_normal(q.size)) for name, scale in zip(names, epoch_scales)
    }
    out[f"{engine_dtype} engine"] = Categorical(round_to(q.logits, engine_dtype))
    return out


def mc_check_table(
    q,
    p,
    b,
    estimators="k1,k2,k3",
    modes=MODES,
    weightings=WEIGHTINGS,
    n: int = 200_000,
    seed: int = 0,
    truncation: float = DEFAULT_TRUNCATION,
    clip: float = DEFAULT_CLIP,
) -> pd.DataFrame:
    """Exact vs Monte Carlo (x ~ b) gradients with the largest |z| per row."""
    rows = []
    for estimator in _estimators(estimators):
        for mode in modes:
            for weighting in weightings:
                if weighting == "ppo-clip" and mode != "reward":
                    continue
                expr, enters, value = term_expression(estimator, mode, weighting, truncation, clip)
                exact = exact_expression(expr, enters, q, p, b, value)
                mc = monte_carlo(expr, enters, q, p, b, n, seed, value)
                z = (mc["gradient"] - exact["gradient"]) / np.where(mc["gradient_se"] > 0, mc["gradient_se"], np.inf)
                rows.append(
                    {
                        "estimator": estimator.name,
                        "mode": mode,
                        "weighting": weighting,
                        "exact |grad|": float(np.linalg.norm(exact["gradient"])),
                        "MC |grad|": float(np.linalg.norm(mc["gradient"])),
                        "max |z|": float(np.max(np.abs(z))),
                        "variance finite": exact["variance_finite"],
                    }
                )
    return pd.DataFrame(rows)


# --- sequences: autoregressive q, p, b ---------------------------------------------------------------
#
# A sequence y = (y_1..y_T) is drawn from b; per position w_t = q_t / b_t, k_t = k(p_t / q_t), h_t = -k_sur'(t_t) and the
# score s_t = grad log q(y_t | y_<t). Every (placement, weighting) gradient of one sequence is sum_t C_t s_t; the
# coefficients C_t are built in _sequence_coefficients. Exact expectations enumerate the V^T sequences under b.

#: Largest V^T enumerated by the off-policy sequence functions (arrays of shape (V^T, T, V)).
MAX_OFFPOLICY_SEQUENCES = 1 << 18


def _check_sequence_triple(q, p, b) -> None:
    from klsym.exact.autoregressive import Autoregressive

    for name, policy in (("q", q), ("p", p), ("b", b)):
        if not isinstance(policy, Autoregressive):
            raise ValueError(f"{name} must be an Autoregressive policy, got {type(policy).__name__}")
    if q.eos is not None or b.eos is not None:
        raise ValueError("off-policy sequences: fixed horizon only (no eos)")
    q.check_pair(p)
    q.check_pair(b, "the behaviour b")
    if q.n_sequences > MAX_OFFPOLICY_SEQUENCES:
        raise ValueError(
            f"V^T = {q.n_sequences:,} sequences exceed the off-policy enumeration limit {MAX_OFFPOLICY_SEQUENCES:,}"
        )


def _rows_of(policy, tokens: np.ndarray) -> np.ndarray:
    """Row (prefix) index of every position of every sequence, shape (N, T)."""
    vocab = policy.vocab_size
    rows = np.empty(tokens.shape, dtype=np.int64)
    index = np.zeros(tokens.shape[0], dtype=np.int64)
    for depth in range(tokens.shape[1]):
        rows[:, depth] = policy.offsets[depth] + index
        index = index * vocab + tokens[:, depth]
    return rows


def _per_position(q, p, b, tokens):
    rows = _rows_of(q, tokens)
    return rows, q.log_probs[rows, tokens], p.log_probs[rows, tokens], b.log_probs[rows, tokens]


def _sequence_coefficients(estimator, placement: str, weighting: str, lq, lp, lb) -> np.ndarray:
    """C (N, T): the weight of each position's score in one sequence's gradient."""
    t_ = lp - lq
    k = np.asarray(estimator.numeric(t_), dtype=float)
    h = -np.asarray(estimator.numeric_dt(t_), dtype=float)
    w = np.exp(lq - lb)
    horizon = lq.shape[1]
    zeros = np.zeros_like(k)
    loss_on = placement in ("loss", "full", "loss+reward")
    to_go = np.cumsum(k[:, ::-1], axis=1)[:, ::-1]
    reward = {
        "loss": zeros,
        "reward": k,
        "reward-to-go": to_go,
        "full": to_go,
        "loss+reward": k,
        "sequence-reward": np.broadcast_to(k.sum(1, keepdims=True), k.shape),
    }[placement]
    loss = h if loss_on else zeros
    if weighting == "none":
        return loss + reward
    if weighting == "token-is":
        return w * (loss + reward)
    if weighting == "token-is-differentiable":  # grad(w_t k_t) = w_t (k_t + h_t) s_t; reward terms as token-is
        return (w * (k + h) if loss_on else zeros) + w * reward
    if weighting == "sequence-is":
        return np.prod(w, axis=1, keepdims=True) * (loss + reward)
    if weighting == "sequence-mean-is-differentiable":
        # c = exp(mean_t(log q_t - sg log b_t)) times every term; grad c = c (1/T) sum_u s_u (TRL #6586)
        c = np.exp(np.mean(lq - lb, axis=1, keepdims=True))
        through_c = c * k.sum(1, keepdims=True) / horizon if loss_on else zeros
        return c * (loss + reward) + through_c
    if weighting == "per-decision":
        rho = np.cumprod(w, axis=1)
        if placement == "reward-to-go" or placement == "full":
            credited = np.cumsum((rho * k)[:, ::-1], axis=1)[:, ::-1]
        elif placement == "sequence-reward":  # k_s s_t involves positions up to max(s, t)
            credited = np.cumsum((rho * k)[:, ::-1], axis=1)[:, ::-1] + rho * (np.cumsum(k, axis=1) - k)
        else:
            credited = rho * reward
        return rho * loss + credited
    raise ValueError(f"unknown weighting {weighting!r}; choose one of {', '.join(SEQUENCE_WEIGHTINGS)}")


def _gradient_from_coefficients(q, rows, tokens, coefficients, weights):
    """sum_n weights_n sum_t C_nt (onehot(y_t) - q_row): a flat gradient of length P V."""
    weighted = weights[:, None] * coefficients
    grad = np.zeros(q.logits.shape)
    np.add.at(grad, (rows, tokens), weighted)
    np.add.at(grad, rows, -weighted[..., None] * q.probs[rows])
    return grad.ravel()


def _squared_norms(q, rows, tokens, coefficients):
    """||g(y)||^2 per sequence: positions sit in different rows, so no cross terms."""
    qrow = q.probs[rows]
    per_position = (
        1.0 - 2.0 * qrow[np.arange(rows.shape[0])[:, None], np.arange(rows.shape[1]), tokens] + np.sum(qrow**2, axis=-1)
    )
    return np.sum(coefficients**2 * per_position, axis=1)


def _all_sequences(policy) -> np.ndarray:
    grids = np.indices((policy.vocab_size,) * policy.horizon).reshape(policy.horizon, -1)
    return grids.T.copy()


def sequence_offpolicy_gradients(
    estimator, q, p, b, placements=SEQUENCE_PLACEMENTS, weightings=SEQUENCE_WEIGHTINGS
) -> dict:
    r"""Exact :math:`\mathbb{E}_{y\sim b}[g(y)]` (flat) and the per-sequence variance :math:`\mathbb{E}\|g\|^2 -
    \|\mathbb{E} g\|^2` for every placement x weighting: ``{(placement, weighting): {"gradient", "variance"}}``."""
    estimator = get_estimator(estimator)
    _check_sequence_triple(q, p, b)
    tokens = _all_sequences(q)
    rows, lq, lp, lb = _per_position(q, p, b, tokens)
    probs = np.exp(lb.sum(axis=1))
    out = {}
    for placement in placements:
        for weighting in weightings:
            c = _sequence_coefficients(estimator, placement, weighting, lq, lp, lb)
            gradient = _gradient_from_coefficients(q, rows, tokens, c, probs)
            second = float(np.sum(probs * _squared_norms(q, rows, tokens, c)))
            out[(placement, weighting)] = {"gradient": gradient, "variance": second - float(gradient @ gradient)}
    return out


def sample_sequences(policy, n: int, rng: np.random.Generator) -> np.ndarray:
    """n sequences drawn token by token from ``policy`` (inverse CDF per prefix row), shape (n, T)."""
    tokens = np.empty((n, policy.horizon), dtype=np.int64)
    index = np.zeros(n, dtype=np.int64)
    for depth in range(policy.horizon):
        cdf = np.cumsum(policy.probs[policy.offsets[depth] + index], axis=1)
        tokens[:, depth] = np.minimum((rng.random(n)[:, None] > cdf).sum(1), policy.vocab_size - 1)
        index = index * policy.vocab_size + tokens[:, depth]
    return tokens


def sequence_monte_carlo(estimator, q, p, b, placement: str, weighting: str, n: int = 20_000, seed: int = 0) -> dict:
    """Mean and standard error of every gradient coordinate from n sequences drawn from b."""
    estimator = get_estimator(estimator)
    _check_sequence_triple(q, p, b)
    tokens = sample_sequences(b, int(n), np.random.default_rng(seed))
    rows, lq, lp, lb = _per_position(q, p, b, tokens)
    c = _sequence_coefficients(estimator, placement, weighting, lq, lp, lb)
    total = _gradient_from_coefficients(q, rows, tokens, c, np.ones(len(tokens)))
    # each coordinate is touched at most once per sequence: its square sums the same way
    squares = np.zeros(q.logits.shape)
    values = c[..., None] * ((np.arange(q.vocab_size) == tokens[..., None]) - q.probs[rows])
    np.add.at(squares, rows, values**2)
    mean = total / n
    variance = np.maximum(squares.ravel() / n - mean**2, 0.0) * n / (n - 1)
    return {"gradient": mean, "se": np.sqrt(variance / n), "n": int(n)}


def sequence_offpolicy_table(
    q,
    p,
    b,
    estimators="k1,k3",
    placements=SEQUENCE_PLACEMENTS,
    weightings=SEQUENCE_WEIGHTINGS,
    mc: int | None = None,
    seed: int = 0,
) -> pd.DataFrame:
    r"""One row per estimator x placement x weighting: what the exact expected gradient under b follows
    (:func:`klsym.rl.sequences.follows`), its relative error vs :math:`\nabla KL(q\|p)` of the sequences,
    ``unbiased`` (follows KL(q||p)), the per-sequence variance; with ``mc``, max |z| of n sequences from b."""
    from klsym.rl.sequences import KL_QP as SEQ_KL_QP
    from klsym.rl.sequences import follows, reference_gradients, relative_error

    references = reference_gradients(q, p)
    target = references[SEQ_KL_QP]
    rows = []
    for estimator in _estimators(estimators):
        exact = sequence_offpolicy_gradients(estimator, q, p, b, placements, weightings)
        for (placement, weighting), entry in exact.items():
            label = follows(entry["gradient"], references)
            row = {
                "estimator": estimator.name,
                "placement": placement,
                "weighting": weighting,
                "follows": label or "-",
                "unbiased": label == SEQ_KL_QP,
                "relative error vs grad KL(q||p)": relative_error(entry["gradient"], target),
                "variance (per sequence)": entry["variance"],
            }
            if mc:
                sampled = sequence_monte_carlo(estimator, q, p, b, placement, weighting, mc, seed)
                live = sampled["se"] > 0
                row["MC max |z|"] = float(
                    np.max(np.abs(sampled["gradient"] - entry["gradient"])[live] / sampled["se"][live])
                )
            rows.append(row)
    return pd.DataFrame(rows)


def recommend(table: pd.DataFrame) -> dict:
    """The unbiased row (follows grad KL(q||p)) of least per-sequence variance."""
    unbiased = table[table["unbiased"]]
    if unbiased.empty:
        return {}
    return unbiased.sort_values("variance (per sequence)").iloc[0].to_dict()


def variance_vs_horizon(
    vocab_size: int,
    horizons,
    drift_scale: float,
    distance: float = 0.5,
    seed: int = 0,
    estimators="k1,k3",
    placements=("full", "reward-to-go"),
    weightings=("sequence-is", "per-decision"),
) -> pd.DataFrame:
    """Per-sequence variance of unbiased options as T grows: p random, q = p + noise(distance),
    b = q + noise(drift_scale) (the policy before an update), same seeds at every T."""
    from klsym.exact.autoregressive import Autoregressive

    frames = []
    for horizon in horizons:
        p = Autoregressive.random(vocab_size, horizon, seed)
        q = p.perturbed(distance, seed + 1)
        b = q.perturbed(drift_scale, seed + 2)
        frame = sequence_offpolicy_table(q, p, b, estimators, placements, weightings)
        frame.insert(0, "T", horizon)
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


__all__ = [
    "WEIGHTINGS",
    "UNBIASED_WEIGHTINGS",
    "DEFAULT_TRUNCATION",
    "DEFAULT_CLIP",
    "term_expression",
    "check_triple",
    "exact_expression",
    "offpolicy_gradient",
    "gaussian_closed_form",
    "behaviour_condition_holds",
    "true_gradient",
    "drift",
    "monte_carlo",
    "relative_bias",
    "offpolicy_rows",
    "offpolicy_summary",
    "value_rows",
    "drift_table",
    "behaviours",
    "mc_check_table",
    "SEQUENCE_WEIGHTINGS",
    "SEQUENCE_PLACEMENTS",
    "sequence_offpolicy_gradients",
    "sample_sequences",
    "sequence_monte_carlo",
    "sequence_offpolicy_table",
    "recommend",
    "variance_vs_horizon",
]
