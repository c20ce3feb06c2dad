r"""The exact reference layer: ground truth for Monte Carlo tests, notebooks and published tables.

For a sampler q and a reference p (both :class:`~klsym.exact.families.Gaussian` or both
:class:`~klsym.exact.families.Categorical`) and any estimator k (built-in or custom) this module gives
KL(q||p), KL(p||q), :math:`\mathbb{E}_q[k]`, :math:`\mathbb{E}_q[k^2]`, the per-sample std,
:math:`P_q(k < 0)`, bias against either KL direction, the expected gradient with respect to q's
parameters in the modes ``loss``, ``reward``, ``full``, and the true gradients of both KL directions.

Every number says how it was obtained: ``"closed_form"`` (SymPy-derived Gaussian formulas,
:mod:`klsym.derive.gaussian_closed_form`), ``"quadrature"`` (log-space adaptive quadrature,
:mod:`klsym.exact.quadrature`, with an error estimate) or ``"exact_sum"`` (sums over a categorical support).

Gradient modes, with score :math:`s(x) = \nabla_\theta \log q_\theta(x)` and samples held fixed:

.. math::
    \text{loss} = \mathbb{E}_q\left[-\frac{d k_{sur}}{dt}(t)\, s(x)\right], \quad
    \text{reward} = \mathbb{E}_q[k(t)\, s(x)], \quad \text{full} = \text{loss} + \text{reward}.

>>> from klsym.exact.families import Gaussian
>>> kl_divergences(Gaussian(0, 1), Gaussian(1, 1))
{'KL(q||p)': 0.5, 'KL(p||q)': 0.5}
>>> stats = estimator_stats("k3", Gaussian(0, 1), Gaussian(1, 1))
>>> stats["method"], round(stats["mean"], 12)
('closed_form', 0.5)
>>> [round(float(g), 6) for g in estimator_gradient("k3", Gaussian(0, 1), Gaussian(1, 1.1), "loss")]
[-1.0, -1.21]
"""

from __future__ import annotations

import math
from functools import lru_cache

import mpmath
import numpy as np

from klsym.derive.modes import MODES, gradient_weights
from klsym.exact import closed_form, quadrature
from klsym.exact.families import Categorical, Gaussian, check_same_family, log_ratio
from klsym.exact.plans import Plan, plan_of

KL_QP = "KL(q||p)"
KL_PQ = "KL(p||q)"
#: Largest number of token sequences enumerated exactly for T positions (V**T).
MAX_ENUMERATED_SEQUENCES = 4_000_000

_K1 = "k1"  # E_q[k1] = KL(q||p); its full-mode gradient is grad KL(q||p)
_REV_K1 = "rev_k1"  # E_q[r log r] = KL(p||q) when p << q


# --- helpers -----------------------------------------------------------------------------------


def _pair(q, p):
    check_same_family(q, p)
    if not isinstance(q, (Gaussian, Categorical)) and not hasattr(q, "loc_scale"):
        raise ValueError(f"unsupported family {type(q).__name__}")


def _method(plan: Plan, q, method: str | None, need) -> str:
    """The method for the closed-form decompositions ``need`` (one name or several) of the estimator."""
    if not isinstance(need, str):
        chosen = {_method(plan, q, method, one) for one in need}
        return "quadrature" if "quadrature" in chosen else chosen.pop()
    if isinstance(q, Categorical):
        if method not in (None, "exact_sum"):
            raise ValueError(f"method {method!r} is not available for categorical pairs (use 'exact_sum')")
        return "exact_sum"
    if method is None:
        closed = isinstance(q, Gaussian) and plan.terms[need] is not None
        return "closed_form" if closed else "quadrature"
    if method == "closed_form" and (not isinstance(q, Gaussian) or plan.terms[need] is None):
        raise ValueError(f"estimator {plan.name!r} has no Gaussian closed form; use 'quadrature'")
    if method not in ("closed_form", "quadrature"):
        raise ValueError(f"unknown method {method!r}; choose closed_form or quadrature")
    return method


def _values_on_support(plan: Plan, log_ratios: np.ndarray, derivative: bool = False) -> np.ndarray:
    fn = plan.numeric_dt if derivative else plan.numeric
    values = np.asarray(fn(log_ratios), dtype=np.float64)
    zero_p = np.isneginf(log_ratios)
    if zero_p.any():
        values = np.where(zero_p, plan.limit("slope" if derivative else "value"), values)
    return values


def _categorical_support(q: Categorical, p: Categorical):
    support = np.isfinite(q.log_probs)
    return support, q.probs[support], categorical_log_ratio(q, p)[support]


def categorical_log_ratio(q: Categorical, p: Categorical) -> np.ndarray:
    r""":math:`t_i = \log p_i - \log q_i` without cancellation when p is close to q.

    With :math:`d_i` the difference of logits, :math:`t_i = d_i - c` and the difference of the
    log-normalisers is :math:`c = \operatorname{log1p}(\sum_{q_i > 0} q_i \operatorname{expm1}(d_i)
    + \sum_{q_j = 0} p_j / q\text{-normaliser})`: each term is as small as the logit shifts, so
    :math:`t \approx 10^{-8}` keeps its relative accuracy (the plain difference of two log-softmaxes
    keeps only its absolute accuracy, 1e-16).

    >>> q, p = Categorical([0.0, 1.0]), Categorical([0.0, 1.0 + 1e-8])
    >>> t = categorical_log_ratio(q, p)
    >>> float(t[1] - t[0]) == (1.0 + 1e-8) - 1.0             # the logit shift, to the last bit
    True
    """
    on_q = np.isfinite(q.logits)
    with np.errstate(invalid="ignore", over="ignore"):
        d = np.where(on_q, p.logits - np.where(on_q, q.logits, 0.0), -np.inf)
        plain = p.log_probs - q.log_probs
        if not (np.isfinite(d[on_q]) | np.isneginf(d[on_q])).all() or np.max(d[on_q]) > 700:
            return plain
        outside = float(np.sum(np.exp(p.logits[~on_q] - (q.logits[on_q][0] - q.log_probs[on_q][0]))))
        s = float(np.sum(q.probs[on_q] * np.expm1(d[on_q]))) + outside
    if not (-0.5 < s < 0.5):  # far apart: no cancellation to avoid
        return plain
    return np.where(on_q, d - math.log1p(s), plain)


#: Largest support (tokens, or token sequences for T positions) summed exactly in mpmath at
#: :data:`SUM_DIGITS` digits: cancellation-free near p = q, no overflow at extreme logits. Larger
#: supports are summed in float64.
MPMATH_SUPPORT = 4096
SUM_DIGITS = 60


def _uses_mpmath(q: Categorical, positions: int = 1) -> bool:
    return int(np.isfinite(q.log_probs).sum()) ** positions <= MPMATH_SUPPORT


def _mp_log_softmax(logits) -> list:
    finite = [mpmath.mpf(float(v)) for v in logits if np.isfinite(v)]
    top = max(finite)
    norm = top + mpmath.log(mpmath.fsum(mpmath.exp(v - top) for v in finite))
    return [mpmath.mpf(float(v)) - norm if np.isfinite(v) else -mpmath.inf for v in logits]


def _mp_distribution(q: Categorical, p: Categorical, positions: int = 1):
    """Object arrays (probabilities, log-ratios) of mpmath numbers over q's support (call inside workdps)."""
    lq, lp = _mp_log_softmax(q.logits), _mp_log_softmax(p.logits)
    on_q = [i for i, v in enumerate(lq) if v != -mpmath.inf]
    probs = np.array([mpmath.exp(lq[i]) for i in on_q], dtype=object)
    log_ratios = np.array([lp[i] - lq[i] for i in on_q], dtype=object)
    seq_probs, seq_ratios = probs, log_ratios
    for _ in range(positions - 1):
        seq_probs = np.multiply.outer(seq_probs, probs).ravel()
        seq_ratios = np.add.outer(seq_ratios, log_ratios).ravel()
    return on_q, seq_probs, seq_ratios


def _mp_expect(probs, values):
    """sum q k in mpmath; an infinite value with positive probability makes it infinite."""
    return mpmath.fsum(p * v for p, v in zip(probs, values) if p != 0)


# --- KL ----------------------------------------------------------------------------------------


def kl_divergences(q, p, positions: int = 1) -> dict:
    r"""Both KL directions between q and p, for ``positions`` i.i.d. positions (KL adds).

    >>> kl_divergences(Categorical([0.0, 0.0]), Categorical([0.0, -np.inf]))
    {'KL(q||p)': inf, 'KL(p||q)': 0.6931471805599453}
    """
    _pair(q, p)
    positions = _check_positions(positions)
    if isinstance(q, Categorical) and _uses_mpmath(q):
        with mpmath.workdps(SUM_DIGITS):
            lq, lp = _mp_log_softmax(q.logits), _mp_log_softmax(p.logits)
            kl = {}
            for label, (a, b) in ((KL_QP, (lq, lp)), (KL_PQ, (lp, lq))):
                on_a = [i for i, v in enumerate(a) if v != -mpmath.inf]
                if any(b[i] == -mpmath.inf for i in on_a):
                    kl[label] = math.inf
                else:
                    kl[label] = positions * float(mpmath.fsum(mpmath.exp(a[i]) * (a[i] - b[i]) for i in on_a))
        return kl
    if isinstance(q, Categorical):
        lq, lp = q.log_probs, p.log_probs
        on_q, on_p = np.isfinite(lq), np.isfinite(lp)
        with np.errstate(invalid="ignore"):
            kl_qp = math.inf if (on_q & ~on_p).any() else float(np.sum(q.probs[on_q] * (lq - lp)[on_q]))
            kl_pq = math.inf if (on_p & ~on_q).any() else float(np.sum(p.probs[on_p] * (lp - lq)[on_p]))
        return {KL_QP: positions * kl_qp, KL_PQ: positions * kl_pq}
    if isinstance(q, Gaussian):
        return dict(_gaussian_kl(q, p, positions))
    if positions != 1:
        raise ValueError("KL by quadrature covers positions=1 only")
    numeric = {label: plan_of(e).numeric for label, e in ((KL_QP, _K1), (KL_PQ, _REV_K1))}
    return {label: quadrature.expect(q, lambda x, k=k: k(log_ratio(p, q, x)))[0] for label, k in numeric.items()}


@lru_cache(maxsize=256)
def _gaussian_kl(q: Gaussian, p: Gaussian, positions: int) -> dict:
    """Both KL directions in closed form, once per pair (``exact`` asks for them with every estimator)."""
    return {
        label: closed_form.expectation(plan_of(e).terms["value"], q.params, p.params, positions)
        for label, e in ((KL_QP, _K1), (KL_PQ, _REV_K1))
    }


def _check_positions(positions) -> int:
    if isinstance(positions, (bool, np.bool_)) or int(positions) != positions or positions < 1:
        raise ValueError(f"positions must be a positive integer, got {positions!r}")
    return int(positions)


# --- estimator statistics ------------------------------------------------------------------------


def estimator_stats(estimator, q, p, positions: int = 1, method: str | None = None) -> dict:
    r"""Exact moments of an estimator under :math:`x \sim q`.

    Parameters
    ----------
    estimator : str or Estimator
    q, p : Gaussian or Categorical
        Sampler and reference, same family.
    positions : int
        Number T of i.i.d. positions; k is applied to the sequence ratio :math:`\prod_i r_i`.
    method : {None, "closed_form", "quadrature", "exact_sum"}
        ``None`` picks the closed form where one exists.

    Returns
    -------
    dict
        ``mean``, ``second_moment``, ``std``, ``prob_negative``, ``method``, ``error_estimate``
        (quadrature only, else 0), ``condition`` (Gaussian closed form: the condition on the sigmas
        for :math:`\mathbb{E}_q[k^2]` to be finite, and whether it holds).

    Examples
    --------
    >>> s = estimator_stats("k3", Gaussian(0, 1), Gaussian(0, 1.5))   # sigma_p^2 >= 2 sigma_q^2
    >>> s["second_moment"], s["std"], s["condition"]["second_moment"]
    (inf, inf, 'sigma_p**2 < 2*sigma_q**2')
    """
    estimator = plan_of(estimator)
    _pair(q, p)
    positions = _check_positions(positions)
    chosen = _method(estimator, q, method, ("value", "square"))
    if chosen == "exact_sum":
        return _categorical_stats(estimator, q, p, positions)
    if chosen == "closed_form":
        return _closed_form_stats(estimator, q, p, positions)
    if positions != 1:
        raise ValueError(f"estimator {estimator.name!r} has no closed form; quadrature covers positions=1 only")
    return _quadrature_stats(estimator, q, p)


def _closed_form_stats(estimator: Plan, q, p, positions) -> dict:
    terms = estimator.terms

    def moments():  # E[k], E[k^2] and Var k at the working precision: no cancellation near p = q
        mean = closed_form.combine(terms["value"], q.params, p.params, positions)[0]
        second = closed_form.combine(terms["square"], q.params, p.params, positions)[0]
        finite = mpmath.isfinite(second.value) and mpmath.isfinite(mean.value)
        return [mean, second, second - mean**2 if finite else second]

    mean, second, variance = closed_form.precise(moments, closed_form.digits_lost(q.params, p.params))
    powers = {"mean": terms["value"], "second_moment": terms["square"]}
    condition = {}
    for key, term_list in powers.items():
        # (a-1) sigma_p^2 < a sigma_q^2 is strictest at the largest and the smallest power a
        condition[key] = estimator.conditions[key]
        condition[key + "_holds"] = all(closed_form.condition_holds(term.a, q.params, p.params) for term in term_list)
    prob_negative = _gaussian_prob_negative(estimator, q, p) if positions == 1 else math.nan
    return {
        "mean": float(mean),
        "second_moment": float(second),
        "log_second_moment": _log(second),
        "std": _sqrt(variance),
        "prob_negative": prob_negative,
        "method": "closed_form",
        "error_estimate": 0.0,
        "condition": condition,
    }


def _log(value) -> float:
    """log of a non-negative mpmath or float value (finite where the value itself overflows)."""
    value = mpmath.mpf(value)
    if mpmath.isnan(value) or value < 0:
        return math.nan
    return float(mpmath.log(value)) if value > 0 else -math.inf


def _sqrt(variance) -> float:
    """std from a variance: rounding below 0 is 0; NaN stays NaN."""
    variance = mpmath.mpf(variance)
    return math.nan if mpmath.isnan(variance) else float(mpmath.sqrt(max(variance, 0)))


def _quadrature_stats(estimator, q, p) -> dict:
    def k_of_x(x):
        return estimator.numeric(log_ratio(p, q, x))

    mean, mean_error = quadrature.expect(q, k_of_x)
    second, second_error = quadrature.expect(q, lambda x: k_of_x(x) ** 2)
    if math.isfinite(second) and math.isfinite(mean):
        # central moment integrated directly: no cancellation in E[k^2] - E[k]^2
        variance, variance_error = quadrature.expect(q, lambda x: (k_of_x(x) - mean) ** 2)
    else:
        variance, variance_error = second, second_error
    prob_negative = _gaussian_prob_negative(estimator, q, p) if isinstance(q, Gaussian) else math.nan
    log_second = second if second == 0 or not math.isinf(second) else None
    log_second = (
        math.log(second)
        if log_second is not None and second > 0
        else (-math.inf if second == 0 else quadrature.log_expect(q, lambda x: k_of_x(x) ** 2)[0])
    )
    return {
        "mean": mean,
        "second_moment": second,
        "log_second_moment": log_second,
        "std": math.sqrt(max(variance, 0.0)),
        "prob_negative": prob_negative,
        "method": "quadrature",
        "error_estimate": {"mean": mean_error, "second_moment": second_error, "variance": variance_error},
    }


def _gaussian_prob_negative(estimator: Plan, q: Gaussian, p: Gaussian, zmax: float = 40.0, points: int = 40001):
    r""":math:`P_q(k < 0)`: sign changes of :math:`k(t(x))` on a fine z-grid, refined by bisection to adjacent
    floats (:func:`_bisect_sign_changes`), then Gaussian masses of the negative x-intervals (``ndtr``). Regions
    narrower than the grid step (0.002 standard deviations) would be missed; mass beyond 40 standard deviations
    is ignored."""

    def negative_at(z):
        return np.asarray(estimator.numeric(log_ratio(p, q, q.mu + q.sigma * z)), dtype=np.float64) < 0

    z = np.linspace(-zmax, zmax, points)
    negative = negative_at(z)
    if not negative.any():
        return 0.0
    cells = np.flatnonzero(negative[1:] != negative[:-1])
    edges = [-np.inf, *_bisect_sign_changes(negative_at, z[cells], z[cells + 1]), np.inf]
    total = 0.0
    starts_negative = bool(negative[0])
    for j in range(len(edges) - 1):
        if (j % 2 == 0) == starts_negative:
            lo, hi = edges[j], edges[j + 1]
            total += float(q.mass_between(q.mu + q.sigma * lo, q.mu + q.sigma * hi))
    return total


def _bisect_sign_changes(negative_at, lo: np.ndarray, hi: np.ndarray, steps: int = 64) -> np.ndarray:
    r"""Where ``negative_at`` flips inside each bracket ``[lo_i, hi_i]`` (it differs at the two ends), all brackets
    bisected at once until the ends are adjacent floats (or ``steps`` halvings: a 0.002 bracket is then below
    1e-21 wide). Returns the midpoints of the final brackets: within one unit in the last place of the flip.

    >>> root = _bisect_sign_changes(lambda z: z * z < 2.0, np.array([1.0]), np.array([2.0]))[0]
    >>> bool(abs(root - 2**0.5) <= np.spacing(2**0.5))
    True
    """
    lo, hi = lo.copy(), hi.copy()
    lo_negative = negative_at(lo)
    for _ in range(steps):
        mid = lo + (hi - lo) / 2
        active = (lo < mid) & (mid < hi)
        if not active.any():
            break
        moves_lo = active & (negative_at(mid) == lo_negative)
        lo = np.where(moves_lo, mid, lo)
        hi = np.where(active & ~moves_lo, mid, hi)
    return lo + (hi - lo) / 2


def _categorical_stats(estimator, q: Categorical, p: Categorical, positions: int) -> dict:
    if _uses_mpmath(q, positions):
        return _categorical_stats_mpmath(estimator, q, p, positions)
    probs, log_ratios = _sequence_distribution(q, p, positions)
    values = _values_on_support(estimator, log_ratios)
    with np.errstate(invalid="ignore", over="ignore"):
        mean = float(np.sum(probs * values))
        second = float(np.sum(probs * values**2))
        variance = float(np.sum(probs * (values - mean) ** 2)) if math.isfinite(mean) else math.nan
    return {
        "mean": mean,
        "second_moment": second,
        "std": math.sqrt(max(variance, 0.0))
        if math.isfinite(variance)
        else (math.inf if math.isinf(second) else math.nan),
        "prob_negative": float(np.sum(probs[values < 0])),
        "method": "exact_sum",
        "error_estimate": 0.0,
    }


def _categorical_stats_mpmath(estimator, q: Categorical, p: Categorical, positions: int) -> dict:
    """Exact sums in mpmath: E[k], E[k^2], the centred variance, P(k < 0), log E[k^2]."""
    with mpmath.workdps(SUM_DIGITS):
        _, probs, log_ratios = _mp_distribution(q, p, positions)
        values = estimator.mp_function("value")(log_ratios)
        mean = _mp_expect(probs, values)
        second = _mp_expect(probs, values * values)
        if mpmath.isfinite(mean) and mpmath.isfinite(second):
            variance = _mp_expect(probs, [(v - mean) ** 2 for v in values])
        else:
            variance = second if not mpmath.isnan(mean) else mpmath.nan
        negative = mpmath.fsum(pr for pr, v in zip(probs, values) if v < 0)
        return {
            "mean": float(mean),
            "second_moment": float(second),
            "log_second_moment": _log(second),
            "std": _sqrt(variance),
            "prob_negative": float(negative),
            "method": "exact_sum",
            "error_estimate": 0.0,
        }


def _sequence_distribution(q: Categorical, p: Categorical, positions: int):
    """Probabilities and log-ratios of every token sequence of length T on q's support (V**T of them)."""
    _, probs, log_ratios = _categorical_support(q, p)
    if positions == 1:
        return probs, log_ratios
    if probs.size**positions > MAX_ENUMERATED_SEQUENCES:
        raise ValueError(
            f"{probs.size}**{positions} token sequences exceed the exact-enumeration limit {MAX_ENUMERATED_SEQUENCES}"
        )
    seq_probs, seq_ratios = probs, log_ratios
    for _ in range(positions - 1):
        seq_probs = np.multiply.outer(seq_probs, probs).ravel()
        seq_ratios = np.add.outer(seq_ratios, log_ratios).ravel()
    return seq_probs, seq_ratios


# --- gradients ---------------------------------------------------------------------------------


def estimator_gradient(estimator, q, p, mode: str, positions: int = 1, method: str | None = None) -> np.ndarray:
    r"""Expected gradient of the estimator wrt q's parameters in ``mode`` (loss, reward, full).

    Gaussian: array ``[d/dmu, d/dsigma]``; categorical: one entry per logit.

    >>> [round(float(g), 6) for g in estimator_gradient("k2", Gaussian(0, 1), Gaussian(1, 1.1), "loss")]
    [-0.826446, -0.173554]
    """
    estimator = plan_of(estimator)
    _pair(q, p)
    positions = _check_positions(positions)
    if mode not in MODES:
        raise ValueError(f"unknown gradient mode {mode!r}; choose one of {', '.join(MODES)}")
    if mode == "full":
        if all(_method(estimator, q, method, need) == "closed_form" for need in ("surrogate", "value")):
            return _closed_form_full_gradient(estimator, q, p, positions)
        return estimator_gradient(estimator, q, p, "loss", positions, method) + estimator_gradient(
            estimator, q, p, "reward", positions, method
        )
    need = "surrogate" if mode == "loss" else "value"
    chosen = _method(estimator, q, method, need)
    if chosen == "exact_sum":
        if positions != 1:
            raise ValueError("categorical gradients are available for positions=1 only")
        return _categorical_gradient(estimator, q, p, mode)
    if chosen == "closed_form":
        moving = "ratio" if mode == "loss" else "sampler"
        return closed_form.gradient(estimator.terms[need], q.params, p.params, moving, positions)
    if positions != 1:
        raise ValueError(f"estimator {estimator.name!r} has no closed form; quadrature covers positions=1 only")
    return _quadrature_gradient(estimator, q, p, mode)[0]


def _closed_form_full_gradient(estimator, q, p, positions) -> np.ndarray:
    """loss + reward summed at the working precision: they cancel where E_q[k] does not move (rev_k2)."""
    terms = estimator.terms

    def full():
        loss = closed_form.gradient_parts(terms["surrogate"], q.params, p.params, "ratio", positions)
        reward = closed_form.gradient_parts(terms["value"], q.params, p.params, "sampler", positions)
        return [a + b for a, b in zip(loss, reward)]

    return np.array([float(v) for v in closed_form.precise(full, closed_form.digits_lost(q.params, p.params))])


def _gradient_weight(estimator: Plan, mode: str):
    r"""t -> w(t), the per-sample gradient being :math:`w(t(x))\, s(x)` (:func:`gradient_weights`)."""

    def weight(log_ratios):
        return np.asarray(gradient_weights(estimator.numeric, estimator.numeric_dt, log_ratios, (mode,))[mode])

    return weight


def _quadrature_gradient(estimator, q, p, mode):
    """Per-parameter E_q[weight(t) * score(x)] by quadrature, with error estimates."""
    weight = _gradient_weight(estimator, mode)
    results = [
        quadrature.expect(q, lambda x, i=i: weight(log_ratio(p, q, x)) * q.score(x)[..., i])
        for i in range(len(q.param_names))
    ]
    return np.array([v for v, _ in results]), np.array([e for _, e in results])


def estimator_gradient_std(estimator, q, p, mode: str) -> np.ndarray:
    r"""Per-sample standard deviation of the gradient sample :math:`w(t(x))\, s(x)`, per parameter.

    The std of a batch-mean gradient over n samples is this divided by :math:`\sqrt{n}`.
    Gaussian: quadrature of :math:`(w s_i - \mathbb{E}[w s_i])^2`; categorical: exact sums.

    >>> [round(float(v), 6) for v in estimator_gradient_std("k1", Gaussian(0, 1), Gaussian(1, 1), "loss")]
    [1.0, 1.414214]
    """
    estimator = plan_of(estimator)
    _pair(q, p)
    if mode not in MODES:
        raise ValueError(f"unknown gradient mode {mode!r}; choose one of {', '.join(MODES)}")
    weight = _gradient_weight(estimator, mode)
    mean = estimator_gradient(estimator, q, p, mode)
    if isinstance(q, Categorical):
        # g_j(x) = w(x) (1[x = j] - q_j): E[g_j^2] = q_j w_j^2 (1 - 2 q_j) + q_j^2 E[w^2]
        support, probs, log_ratios = _categorical_support(q, p)
        w = np.where(np.isneginf(log_ratios), np.nan, weight(log_ratios))
        second = np.zeros(q.size)
        second[support] = probs * w**2 * (1 - 2 * probs) + probs**2 * np.sum(probs * w**2)
        return np.sqrt(np.maximum(second - mean**2, 0.0))
    variances = [
        quadrature.expect(q, lambda x, i=i: (weight(log_ratio(p, q, x)) * q.score(x)[..., i] - mean[i]) ** 2)[0]
        for i in range(len(q.param_names))
    ]
    return np.sqrt(np.array(variances))


def _categorical_gradient(estimator, q: Categorical, p: Categorical, mode: str) -> np.ndarray:
    # score of a softmax wrt logit j is onehot_j - q_j, so E_q[w s_j] = q_j (w_j - E_q[w])
    if _uses_mpmath(q):
        with mpmath.workdps(SUM_DIGITS):
            on_q, probs, log_ratios = _mp_distribution(q, p)
            weights = gradient_weights(
                estimator.mp_function("value"), estimator.mp_function("slope"), log_ratios, (mode,)
            )[mode]
            mean = _mp_expect(probs, weights)
            grad = np.zeros(q.size)
            grad[on_q] = [float(pr * (w - mean)) for pr, w in zip(probs, weights)]
        return grad
    support, probs, log_ratios = _categorical_support(q, p)
    weights = gradient_weights(
        lambda lr: _values_on_support(estimator, lr),
        lambda lr: _values_on_support(estimator, lr, derivative=True),
        log_ratios,
        (mode,),
    )[mode]
    with np.errstate(invalid="ignore"):
        grad = np.zeros(q.size)
        grad[support] = probs * (weights - np.sum(probs * weights))
    return grad


def true_gradients(q, p, positions: int = 1) -> dict:
    r"""Gradients of KL(q||p) and KL(p||q) wrt q's parameters.

    They are the ``full``-mode gradients of k1 (:math:`\mathbb{E}_q[k_1]` = KL(q||p)) and rev_k1
    (:math:`\mathbb{E}_q[r \log r]` = KL(p||q)); for categorical pairs where a KL is infinite the
    gradient is NaN.

    >>> g = true_gradients(Gaussian(0, 1), Gaussian(1, 1.1))
    >>> np.round(g["KL(q||p)"], 6).tolist(), np.round(g["KL(p||q)"], 6).tolist()
    ([-0.826446, -0.173554], [-1.0, -1.21])
    """
    if isinstance(q, Gaussian):  # once per pair: ``gradient`` asks for them with every estimator
        return {
            label: grad.copy() for label, grad in _gaussian_true_gradients(q, p, _check_positions(positions)).items()
        }
    return _true_gradients(q, p, positions)


@lru_cache(maxsize=256)
def _gaussian_true_gradients(q: Gaussian, p: Gaussian, positions: int) -> dict:
    return _true_gradients(q, p, positions)


def _true_gradients(q, p, positions: int) -> dict:
    kl = kl_divergences(q, p, positions)
    out = {}
    for label, estimator in ((KL_QP, _K1), (KL_PQ, _REV_K1)):
        grad = np.asarray(estimator_gradient(estimator, q, p, "full", positions), dtype=np.float64)
        out[label] = grad if math.isfinite(kl[label]) else np.full_like(grad, np.nan)
    return out


# --- summaries for the CLI and notebooks -----------------------------------------------------------


def _bias(mean: float, kl: dict) -> tuple[dict, dict]:
    """Bias ``mean - KL`` per direction, and why it is undefined where it is (``None`` in the first dict).

    inf - inf has no value; ``inf`` stays where one side is infinite and the other finite.

    >>> _bias(float("inf"), {"KL(q||p)": float("inf"), "KL(p||q)": 1.0})
    ({'KL(q||p)': None, 'KL(p||q)': inf}, {'KL(q||p)': 'inf - inf'})
    """
    bias, undefined = {}, {}
    for label, value in kl.items():
        mean_, value_ = float(mean), float(value)
        if math.isnan(mean_) or math.isnan(value_):
            bias[label], undefined[label] = None, "mean is nan" if math.isnan(mean_) else "KL is nan"
        elif math.isinf(mean_) and math.isinf(value_) and (mean_ > 0) == (value_ > 0):
            bias[label], undefined[label] = None, f"{mean_:g} - {value_:g}"
        else:
            bias[label] = mean_ - value_
    return bias, undefined


def exact_summary(q, p, estimators, positions: int = 1) -> dict:
    """The ``klsym exact`` JSON object (see the CLI contract in :mod:`klsym.commands.exact`)."""
    estimators = [plan_of(e) for e in estimators]
    kl = kl_divergences(q, p, positions)
    out = {"family": q.name, "q": _params(q), "p": _params(p), "positions": positions, "kl": kl, "estimators": {}}
    for estimator in estimators:
        stats = estimator_stats(estimator, q, p, positions)
        stats["bias"], undefined = _bias(stats["mean"], kl)
        if undefined:  # JSON: null bias, with the reason next to it
            stats["bias_undefined"] = undefined
        stats["target"] = estimator.target
        out["estimators"][estimator.name] = stats
    return out


def label_gradient(q, vector) -> dict:
    """A gradient wrt q's parameters, labelled: ``{"mu", "sigma"}`` (Gaussian) or ``{"logits": [...]}``.

    >>> label_gradient(Gaussian(0, 1), [0.5, -1.0])
    {'mu': 0.5, 'sigma': -1.0}
    """
    if isinstance(q, Gaussian):
        return dict(zip(q.param_names, map(float, np.asarray(vector, dtype=np.float64))))
    return {"logits": np.asarray(vector, dtype=np.float64)}


def gradient_summary(q, p, estimators, positions: int = 1) -> dict:
    """The ``klsym gradient`` JSON object: true gradients and every estimator's three modes."""
    estimators = [plan_of(e) for e in estimators]

    def label(vector):
        return label_gradient(q, vector)

    out = {
        "family": q.name,
        "q": _params(q),
        "p": _params(p),
        "positions": positions,
        "true": {k: label(v) for k, v in true_gradients(q, p, positions).items()},
        "estimators": {},
    }
    for estimator in estimators:
        entry = {}
        for mode in MODES:
            entry[mode] = label(estimator_gradient(estimator, q, p, mode, positions))
        entry["method"] = {
            mode: _method(estimator, q, None, "surrogate" if mode == "loss" else "value") for mode in ("loss", "reward")
        }
        out["estimators"][estimator.name] = entry
    return out


def _params(family):
    return list(family.params) if isinstance(family, Gaussian) else family.logits


__all__ = [
    "KL_QP",
    "KL_PQ",
    "MODES",
    "label_gradient",
    "kl_divergences",
    "estimator_stats",
    "estimator_gradient",
    "estimator_gradient_std",
    "true_gradients",
    "exact_summary",
    "gradient_summary",
    "MAX_ENUMERATED_SEQUENCES",
]
