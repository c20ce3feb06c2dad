r"""Sequence-level gradients of per-token KL terms, exactly, in every placement frameworks use.

A response :math:`y = (y_1..y_T)` is drawn token by token from the policy q (:class:`~klsym.exact.autoregressive.
Autoregressive`); per token :math:`r_t = p(y_t|y_{<t}) / q(y_t|y_{<t})`, :math:`k_t = k(r_t)` and the score
:math:`s_t = \nabla_\theta \log q(y_t|y_{<t})`. The per-sequence gradient of each **placement** (samples fixed):

.. math::
    \text{loss} &= \textstyle\sum_t \nabla_\theta k_{sur}(r_t) = \sum_t -k_{sur}'(\log r_t)\, s_t \\
    \text{reward} &= \textstyle\sum_t k_t\, s_t \qquad \text{(each token's own term as its own reward)} \\
    \text{reward-to-go} &= \textstyle\sum_t s_t \sum_{s \ge t} k_s \qquad \text{(undiscounted returns, no critic)} \\
    \text{sequence-reward} &= \textstyle(\sum_s k_s) \sum_t s_t \qquad \text{(RLOO/GRPO-style sequence reward)} \\
    \text{full} &= \text{loss} + \text{reward-to-go} = \nabla_\theta \mathbb{E}_q[\textstyle\sum_t k_t] \\
    \text{loss+reward} &= \text{loss} + \text{reward} = \nabla_\theta \textstyle\sum_t \rho_t k_t,\
        \rho_t = e^{\log q_t - \mathrm{sg}(\log q_t)}

(the last one is what a *per-token* weight :math:`\exp(\log\pi - \mathrm{sg}\log\pi)` on :math:`k_t` in the loss
delivers). Applying k to the whole-sequence ratio :math:`R = \prod_t r_t` gives the three single-token modes on
sequences: ``sequence-ratio-loss`` :math:`-k_{sur}'(\log R) \sum_t s_t`, ``sequence-ratio-reward``
:math:`k(R) \sum_t s_t` and ``sequence-ratio-full`` (their sum).

References. True gradients of the sequence KLs, and **partial gradients** with the state distribution held fixed
(what a per-token loss can at best deliver):

.. math::
    \nabla KL(q\|p) &= \textstyle\sum_u q(u)\, \mathbb{E}_{a \sim q_u}[(\ell(u,a) + D(ua))\, \nabla \log q(a|u)],\quad
        \ell = \log q - \log p,\ D(v) = \text{KL of the continuation after } v \\
    \partial KL(q\|p) &= \textstyle\sum_u q(u)\, \nabla_{\theta_u} KL(q_u \| p_u), \qquad
    \nabla KL(p\|q) = \textstyle\sum_u p(u)\, (q_u - p_u), \qquad \partial KL(p\|q) = \sum_u q(u)\, (q_u - p_u).

The difference :math:`\nabla KL(q\|p) - \partial KL(q\|p)` is the **missing future term**
:math:`\sum_u q(u)\,\mathbb{E}_a[D(ua)\, \nabla\log q(a|u)]`: changing q at position t changes which prefixes later
positions see (Tang & Munos 2025; Liu et al. 2025).

Every expectation is exact (:mod:`klsym.exact.autoregressive`: dynamic programming over prefixes; the
whole-sequence ratio enumerates the V^T leaves in blocks). A placement **follows** the one of ``KL(q||p)``,
``KL(p||q)``, ``partial KL(q||p)``, ``partial KL(p||q)`` whose gradient it equals to a relative difference below
:data:`FOLLOWS_TOLERANCE` or within the rounding error of the two (each gradient carries the sum of the absolute
values of the terms that made it), ``indistinguishable (...)`` when it equals several that cannot be told apart
(close to q = p they agree to first order), else ``zero`` when its norm is below that tolerance times the largest
reference norm or its rounding, else None. Log-ratios are computed without cancellation near q = p
(:func:`~klsym.exact.autoregressive.log_ratio`).

>>> from klsym.exact.autoregressive import Autoregressive
>>> p = Autoregressive.random(3, 3, seed=0); q = p.perturbed(0.5, seed=1)
>>> table = follows_table(q, p, "k1,k2,k3")
>>> table.loc["k1", ["loss", "reward-to-go", "full"]].tolist()
['zero', 'KL(q||p)', 'KL(q||p)']
>>> table.loc["k3", ["loss", "loss+reward"]].tolist()
['partial KL(p||q)', 'partial KL(q||p)']
"""

from __future__ import annotations

import math

import numpy as np

from klsym.derive.estimators import Estimator, get_estimators
from klsym.exact.autoregressive import (
    Autoregressive,
    log_ratio_with_error,
    per_position_kls,
    prefix_sums,
    probability_difference,
    score_gradient,
    sequence_kls,
    to_go,
    whole_sequence_expectations,
)

KL_QP, KL_PQ = "KL(q||p)", "KL(p||q)"
PARTIAL_QP, PARTIAL_PQ = "partial KL(q||p)", "partial KL(p||q)"
ZERO = "zero"
#: Verdict where the gradient matches several references that cannot be told apart (listed after it).
INDISTINGUISHABLE = "indistinguishable"
#: Per-token placements; ``full`` = loss + reward-to-go, ``loss+reward`` = per-token importance-weighted loss.
PLACEMENTS = ("loss", "reward", "reward-to-go", "sequence-reward", "full", "loss+reward")
#: k applied to the whole-sequence ratio, in the three single-token modes.
RATIO_PLACEMENTS = ("sequence-ratio-loss", "sequence-ratio-reward", "sequence-ratio-full")
ALL_PLACEMENTS = PLACEMENTS + RATIO_PLACEMENTS
#: Relative difference below which two exact gradients are called equal.
FOLLOWS_TOLERANCE = 1e-10
#: Norm below which an exact gradient is float64 rounding of zero (its coordinates are sums of probabilities times
#: log-ratios, O(1) each; at q = p every gradient vanishes and what is left is ~1e-17 of rounding). The rounding
#: scale where :func:`follows` is not given one.
ROUNDING_NORM = 1e-13
EPS = float(np.finfo(np.float64).eps)
FOLLOWS_ORDER = (KL_QP, KL_PQ, PARTIAL_QP, PARTIAL_PQ)


# --- reference gradients ---------------------------------------------------------------------


def _check_pair(q, p) -> None:
    if not isinstance(q, Autoregressive):
        raise ValueError(f"q must be an Autoregressive policy, got {type(q).__name__}")
    q.check_pair(p)


# Rounding. Every gradient is score_gradient(q, mass, W) of a weight array W (or, for KL(p||q), rows m(u) (q - p)).
# Alongside W we carry A >= |W|, the sum of the absolute values of the terms that made W (errors of the log-ratio
# propagated through each function included), so that W is exact to a few eps * A; the gradient is then exact to
# a few eps * m q (A + E_q[A]) (the centring adds the row mean). _rounding turns that into a norm.


def _rounding_units(q: Autoregressive) -> float:
    """How many eps of error per unit of magnitude: a few per summation level (tokens, depths, centring)."""
    return 4.0 * (q.horizon + q.vocab_size + 2)


def _rounding(q: Autoregressive, mass: np.ndarray, magnitude: np.ndarray) -> float:
    """Norm of the rounding error of score_gradient(q, mass, W) where W is exact to eps * ``magnitude``."""
    rows = mass[:, None] * q.probs * (magnitude + np.sum(q.probs * magnitude, axis=-1, keepdims=True))
    return _rounding_units(q) * EPS * _norm(rows.ravel())


def _magnitude(function, t: np.ndarray, error: np.ndarray) -> np.ndarray:
    r""":math:`|f(t)| + |f'(t)|\, \tau`: the absolute error of f(t) in units of eps when t is exact to eps * tau
    (slope by a central difference; where it is not finite it is left out)."""
    value = np.asarray(function(t), dtype=np.float64)
    step = 1e-6 * (1.0 + np.abs(t))
    with np.errstate(all="ignore"):
        slope = (
            np.asarray(function(t + step), dtype=np.float64) - np.asarray(function(t - step), dtype=np.float64)
        ) / (2.0 * step)
    return np.abs(value) + np.nan_to_num(np.abs(slope), nan=0.0, posinf=0.0) * error


def _references(q: Autoregressive, p: Autoregressive) -> tuple[dict, dict]:
    """The four references of :func:`follows` (flat) and the rounding norm of each."""
    _check_pair(q, p)
    t, error = log_ratio_with_error(q, p)
    excess, excess_magnitude = -t, np.abs(t) + error  # l(u, a) = log q - log p
    gradients, rounding = {}, {}
    gradients[KL_QP] = score_gradient(q, q.prefix_probs, to_go(q, excess))
    rounding[KL_QP] = _rounding(q, q.prefix_probs, to_go(q, excess_magnitude))
    gradients[PARTIAL_QP] = score_gradient(q, q.prefix_probs, excess)
    rounding[PARTIAL_QP] = _rounding(q, q.prefix_probs, excess_magnitude)
    # KL(p||q): only q(.|u) depends on theta_u, so its rows are m(u) (q_u - p_u), states ~ p (true) or ~ q (partial)
    gap = probability_difference(q, p, t)
    gap_magnitude = np.abs(gap) + (np.abs(gap) + q.probs) * error  # d(q - p)/dt = -p = -(q - gap)
    for label, mass in ((KL_PQ, p.prefix_probs), (PARTIAL_PQ, q.prefix_probs)):
        gradients[label] = (mass[:, None] * gap).ravel()
        rounding[label] = _rounding_units(q) * EPS * _norm((mass[:, None] * gap_magnitude).ravel())
    return gradients, rounding


def true_gradients(q: Autoregressive, p: Autoregressive) -> dict:
    r"""Flat gradients (length P V) of the sequence KL(q||p) and KL(p||q) w.r.t. q's logits."""
    gradients = _references(q, p)[0]
    return {KL_QP: gradients[KL_QP], KL_PQ: gradients[KL_PQ]}


def partial_gradients(q: Autoregressive, p: Autoregressive) -> dict:
    r""":math:`\sum_t \mathbb{E}_{y_{<t} \sim q}[\nabla_\theta D(q(\cdot|y_{<t}) \| p(\cdot|y_{<t}))]`, states held
    fixed, for D = KL(q||p) and KL(p||q); flat (P V,)."""
    gradients = _references(q, p)[0]
    return {KL_QP: gradients[PARTIAL_QP], KL_PQ: gradients[PARTIAL_PQ]}


def missing_future_term(q: Autoregressive, p: Autoregressive) -> np.ndarray:
    r""":math:`\nabla KL(q\|p) - \partial KL(q\|p)`: the score of each token times the KL still to come after it."""
    return true_gradients(q, p)[KL_QP] - partial_gradients(q, p)[KL_QP]


# --- placements --------------------------------------------------------------------------------


def _check_placements(placements) -> tuple[str, ...]:
    if isinstance(placements, str):
        placements = [name.strip() for name in placements.split(",") if name.strip()]
    placements = tuple(placements)
    unknown = [name for name in placements if name not in ALL_PLACEMENTS]
    if unknown or not placements:
        raise ValueError(
            f"unknown placement(s) {unknown or list(placements)}; choose from: {', '.join(ALL_PLACEMENTS)}"
        )
    return placements


def _estimators(estimators) -> list[Estimator]:
    if isinstance(estimators, (str, Estimator)):
        estimators = get_estimators(estimators) if isinstance(estimators, str) else [estimators]
    out = [e if isinstance(e, Estimator) else get_estimators([e])[0] for e in estimators]
    if not out:
        raise ValueError("no estimators given")
    return out


def placement_gradients(estimator, q: Autoregressive, p: Autoregressive, placements=ALL_PLACEMENTS) -> dict:
    r"""Exact expected gradient (flat, length P V) of ``estimator`` in each placement.

    ``sequence-reward`` weights token t by the whole sum :math:`\sum_s k_s`, whose conditional expectation given
    :math:`y_{\le t}` is the penalty already collected plus :math:`k_t` plus the expected penalty to go; the
    collected part is constant over the row and its expected score is zero, so in expectation (not in variance)
    ``sequence-reward`` equals ``reward-to-go``.
    """
    return {name: gradient for name, (gradient, _) in _placements(estimator, q, p, placements).items()}


#: The weight arrays (components) whose expected-score gradients add up to each placement.
_COMPONENTS = {
    "loss": ("pathwise",),
    "reward": ("value",),
    "reward-to-go": ("to-go",),
    "sequence-reward": ("to-go", "collected"),
    "full": ("pathwise", "to-go"),
    "loss+reward": ("pathwise", "value"),
    "sequence-ratio-loss": ("ratio-loss",),
    "sequence-ratio-reward": ("ratio-reward",),
    "sequence-ratio-full": ("ratio-loss", "ratio-reward"),
}


def _placements(estimator, q: Autoregressive, p: Autoregressive, placements=ALL_PLACEMENTS) -> dict:
    """``{placement: (gradient, rounding norm)}`` (see :func:`placement_gradients` and :func:`_rounding`).

    Each component is centred by its own score before the parts are added: k1's pathwise weight 1 added to the
    O(|q - p|) reward-to-go would otherwise leave eps-sized noise of the 1 in the sum. A weight that is the same
    number everywhere has an expected score of exactly zero and contributes nothing.
    """
    (estimator,) = _estimators([estimator])
    _check_pair(q, p)
    placements = _check_placements(placements)
    token_t, error = log_ratio_with_error(q, p)
    mass = q.prefix_probs
    functions = {"pathwise": lambda t: -estimator.numeric_dt(t), "value": estimator.numeric}
    cache: dict = {}

    def weights(name):  # (W, A): a weight array and its magnitude (W exact to a few eps * A)
        if name not in cache:
            if name in functions:
                cache[name] = (
                    np.asarray(functions[name](token_t), dtype=np.float64),
                    _magnitude(functions[name], token_t, error),
                )
            elif name == "to-go":
                cache[name] = tuple(to_go(q, part) for part in weights("value"))
            elif name == "collected":  # the penalty before this position: constant over the row
                cache[name] = tuple(prefix_sums(q, part)[:, None] * np.ones(q.vocab_size) for part in weights("value"))
            else:  # k of the whole-sequence ratio: log R sums T log-ratios, and their errors add
                function = functions["pathwise" if name == "ratio-loss" else "value"]
                reach = q.horizon * float(np.max(error))
                leaves = []  # (min, max) of f over the leaves: a constant f (k1's loss) gives exactly zero

                def recorded(t):
                    values = np.asarray(function(t), dtype=np.float64)
                    leaves.append((values.min(), values.max()))
                    return values

                expected = whole_sequence_expectations(q, p, recorded)
                if min(low for low, _ in leaves) == max(high for _, high in leaves):
                    expected = np.full(expected.shape, leaves[0][0])
                cache[name] = (
                    expected,
                    whole_sequence_expectations(q, p, lambda t: _magnitude(function, t, np.abs(t) + reach)),
                )
        return cache[name]

    def component(name):
        key = ("gradient", name)
        if key not in cache:
            w, size = weights(name)
            if np.all(w == w.flat[0]):
                cache[key] = (np.zeros(q.size), 0.0)
            else:
                cache[key] = (score_gradient(q, mass, w), _rounding(q, mass, size))
        return cache[key]

    out = {}
    for name in placements:
        parts = [component(part) for part in _COMPONENTS[name]]
        out[name] = (
            sum(part[0] for part in parts[1:]) + parts[0][0] if len(parts) > 1 else parts[0][0],
            sum(part[1] for part in parts),
        )
    return out


def placement_gradient(estimator, q: Autoregressive, p: Autoregressive, placement: str) -> np.ndarray:
    """One placement's exact expected gradient (see :func:`placement_gradients`)."""
    return placement_gradients(estimator, q, p, [placement])[placement]


# --- comparisons -------------------------------------------------------------------------------


def _norm(a: np.ndarray) -> float:
    return math.sqrt(float(np.einsum("i,i", a, a)))  # einsum: BLAS dot/norm contend for cores on a busy machine


def _vector(a) -> np.ndarray:
    return np.ravel(np.asarray(a, dtype=np.float64))


def relative_difference(a, b) -> float:
    r""":math:`\|a - b\| / \max(\|a\|, \|b\|)` (0 when both vanish; NaN when either is not finite)."""
    a, b = _vector(a), _vector(b)
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        return math.nan
    scale = max(_norm(a), _norm(b))
    return 0.0 if scale == 0 else _norm(a - b) / scale


def relative_error(gradient, target) -> float:
    r""":math:`\|g - g^*\| / \|g^*\|` (inf when the target vanishes and g does not)."""
    gradient, target = _vector(gradient), _vector(target)
    error, scale = _norm(gradient - target), _norm(target)
    if scale <= ROUNDING_NORM:  # the target vanishes (q = p): only rounding-level errors count as none
        return 0.0 if error <= ROUNDING_NORM else math.inf
    return error / scale


def cosine(a, b) -> float:
    """Cosine of the angle between two gradients (NaN when either is zero)."""
    a, b = _vector(a), _vector(b)
    norms = _norm(a) * _norm(b)
    return math.nan if norms == 0 else float(np.einsum("i,i", a, b)) / norms


def reference_gradients(q: Autoregressive, p: Autoregressive) -> dict:
    """The four labelled references of :func:`follows`: true and partial gradients of both KL directions."""
    return _references(q, p)[0]


def reference_rounding(q: Autoregressive, p: Autoregressive) -> dict:
    """The rounding-error norm of each of :func:`reference_gradients` (what :func:`follows` compares against)."""
    return _references(q, p)[1]


def follows(
    gradient,
    references: dict,
    tolerance: float = FOLLOWS_TOLERANCE,
    rounding: float | None = None,
    reference_rounding: dict | None = None,
) -> str | None:
    r"""What ``gradient`` follows: a reference label of :data:`FOLLOWS_ORDER`, ``"zero"``, an
    ``"indistinguishable (A, B, ...)"`` verdict, or None.

    The gradient equals a reference when :math:`\|g - g_{ref}\| \le \max(\text{tolerance} \cdot
    \max(\|g\|, \|g_{ref}\|),\ \rho_g + \rho_{ref})`, the :math:`\rho` being the rounding-error norms of the two
    (``rounding``, ``reference_rounding``; :data:`ROUNDING_NORM` each where not given). Near q = p all references
    agree to first order (they differ by O(|q - p|^2)); where the gradient equals several of them it cannot say
    which it follows, and the verdict lists them. References that are the same array (T = 1: a partial gradient is
    the true one; q = p: all vanish) count once, under the first label. ``"zero"``: no reference matches and
    :math:`\|g\| \le \max(\text{tolerance} \cdot \max_{ref} \|g_{ref}\|, \rho_g)`.
    """
    gradient = _vector(gradient)
    if not np.isfinite(gradient).all():
        return None
    own = ROUNDING_NORM / 2 if rounding is None else float(rounding)
    size = _norm(gradient)
    norms, matched = [], []
    for label in FOLLOWS_ORDER:
        reference = _vector(references[label])
        if not np.isfinite(reference).all():
            continue
        norm = _norm(reference)
        norms.append(norm)
        theirs = ROUNDING_NORM / 2 if reference_rounding is None else float(reference_rounding[label])
        if _norm(gradient - reference) <= max(tolerance * max(size, norm), own + theirs):
            if not any(np.array_equal(reference, other) for _, other in matched):
                matched.append((label, reference))
    if len(matched) == 1:
        return matched[0][0]
    if matched:
        return f"{INDISTINGUISHABLE} ({', '.join(label for label, _ in matched)})"
    return ZERO if size <= max(tolerance * max(norms, default=0.0), own) else None


# --- the summary (JSON of `python -m klsym sequence`) --------------------------------------------


def sequence_summary(
    q: Autoregressive,
    p: Autoregressive,
    estimators="k1,k2,k3",
    placements=ALL_PLACEMENTS,
    mc: int | None = None,
    seed: int = 0,
    **mc_options,
) -> dict:
    r"""The ``klsym sequence`` JSON object.

    Keys: ``V``, ``T``, ``eos``, ``sequences`` (V^T enumerated), ``parameters``; ``kl`` {KL(q||p), KL(p||q)};
    ``per_position`` (each position's share of both KLs); ``true_gradient`` and ``partial_gradient`` (same two keys,
    flat lists of length P V);
    ``missing_future_term`` (:math:`\|\nabla KL(q\|p) - \partial KL(q\|p)\| / \|\nabla KL(q\|p)\|`); ``estimators`` ->
    name -> placement -> {``gradient``, ``follows``, ``relative_error``, ``cosine``} (the last two against
    :math:`\nabla KL(q\|p)` of the sequences); with ``mc``, an ``mc`` block from
    :func:`klsym.simulate.sequences.crosscheck`.
    """
    _check_pair(q, p)
    estimators, placements = _estimators(estimators), _check_placements(placements)
    references, reference_errors = _references(q, p)
    target = references[KL_QP]
    out = {
        "V": q.vocab_size,
        "T": q.horizon,
        "eos": q.eos,
        "sequences": q.n_sequences,
        "parameters": q.size,
        "kl": sequence_kls(q, p),
        "per_position": per_position_kls(q, p),
        "true_gradient": {KL_QP: references[KL_QP], KL_PQ: references[KL_PQ]},
        "partial_gradient": {KL_QP: references[PARTIAL_QP], KL_PQ: references[PARTIAL_PQ]},
        "missing_future_term": relative_error(references[PARTIAL_QP], target),
        "estimators": {},
    }
    for estimator in estimators:
        entry = {}
        for name, (gradient, rounding) in _placements(estimator, q, p, placements).items():
            label = follows(gradient, references, rounding=rounding, reference_rounding=reference_errors)
            entry[name] = {
                "gradient": gradient,
                "follows": label,
                "relative_error": relative_error(gradient, target),
                "cosine": math.nan if label == ZERO else cosine(gradient, target),
            }  # no direction
        out["estimators"][estimator.name] = entry
    if mc is not None:
        from klsym.simulate.sequences import crosscheck  # only a Monte Carlo run needs the engine

        out["mc"] = crosscheck(q, p, estimators, n=mc, seed=seed, placements=placements, exact=out, **mc_options)
    return out


# --- tables for notebooks --------------------------------------------------------------------


def placement_table(q: Autoregressive, p: Autoregressive, estimators="k1,k2,k3", placements=ALL_PLACEMENTS):
    """One row per (estimator, placement): ``follows`` ("-" for None), ``relative_error``, ``cosine`` (a DataFrame)."""
    import pandas as pd

    summary = sequence_summary(q, p, estimators, placements)
    return pd.DataFrame(
        [
            {
                "estimator": name,
                "placement": placement,
                "follows": entry["follows"] or "-",
                "relative_error": entry["relative_error"],
                "cosine": entry["cosine"],
            }
            for name, by_placement in summary["estimators"].items()
            for placement, entry in by_placement.items()
        ]
    )


def follows_table(q: Autoregressive, p: Autoregressive, estimators="k1,k2,k3", placements=ALL_PLACEMENTS):
    """Estimators x placements DataFrame of ``follows`` labels ("-" for None)."""
    table = placement_table(q, p, estimators, placements)
    wide = table.pivot(index="estimator", columns="placement", values="follows")
    return wide.loc[list(dict.fromkeys(table["estimator"])), list(dict.fromkeys(table["placement"]))].rename_axis(
        columns=None
    )


def pair(kind: str, vocab_size: int, horizon: int, distance: float, seed: int = 0):
    r"""A (q, p) pair for sweeps: p is ``"random"`` (N(0,1) logits) or ``"zipf"`` (LLM-shaped, see
    :meth:`Autoregressive.zipf`); q is p with N(0, distance^2) noise on every logit, or for ``"zipf-tempered"`` p at
    temperature ``1 + distance`` (every prefix of a Zipf p has the same sorted logits, so a tempered q is equally far
    from p after every prefix: the missing future term vanishes)."""
    if kind == "random":
        p = Autoregressive.random(vocab_size, horizon, seed)
    elif kind in ("zipf", "zipf-tempered"):
        p = Autoregressive.zipf(vocab_size, horizon, seed=seed)
    else:
        raise ValueError(f"unknown pair kind {kind!r}; choose random, zipf or zipf-tempered")
    q = p.tempered(1.0 + distance) if kind == "zipf-tempered" else p.perturbed(distance, seed + 1)
    return q, p


def future_term_table(kind: str, vocab_size: int, horizons, distances, seed: int = 0, estimators="k1,k2,k3"):
    r"""How large the missing future term is, per horizon T and distance between q and p (a DataFrame).

    Columns: ``T``, ``distance``, ``KL(q||p)``, ``|grad KL(q||p)|``, ``future / |grad|`` (relative size of
    :math:`\nabla KL - \partial KL`), ``cos(partial, true)`` and, per estimator, the relative error against
    :math:`\nabla KL(q\|p)` of its ``loss`` placement.
    """
    import pandas as pd

    rows = []
    for horizon in horizons:
        for distance in distances:
            q, p = pair(kind, vocab_size, horizon, distance, seed)
            true, partial = true_gradients(q, p)[KL_QP], partial_gradients(q, p)[KL_QP]
            row = {
                "T": horizon,
                "distance": distance,
                KL_QP: sequence_kls(q, p)[KL_QP],
                "|grad KL(q||p)|": _norm(true),
                "future / |grad|": relative_error(partial, true),
                "cos(partial, true)": cosine(partial, true),
            }
            for estimator in _estimators(estimators):
                row[f"{estimator.name} loss: rel. error"] = relative_error(
                    placement_gradient(estimator, q, p, "loss"), true
                )
            rows.append(row)
    return pd.DataFrame(rows)


def paper_claims(q: Autoregressive, p: Autoregressive):
    r"""The claims of Tang & Munos 2025 (arXiv 2506.09477) and Liu et al. 2025 (arXiv 2510.01555) as summarised in
    klsym issue 12, each consequence checked by an exact number on (q, p).

    Claim **A**: a per-token loss ignores that changing q at position t changes which prefixes later positions see
    (it can at best deliver the partial gradient). Claim **B**: the gradient of the sequence KL needs the KL in the
    reward with reward-to-go returns, or the sequence-level term. Rows marked ``related`` are single-token facts
    the two claims rest on. Columns: ``claim``, ``statement``, ``quantity``, ``value``, ``holds``.
    """
    import pandas as pd

    references = reference_gradients(q, p)
    grads = {e.name: placement_gradients(e, q, p) for e in _estimators("k1,k2,k3")}
    future = references[KL_QP] - references[PARTIAL_QP]
    true_norm = _norm(references[KL_QP])
    tol = FOLLOWS_TOLERANCE
    rows = [
        (
            "A",
            "k2 in the loss gives the partial gradient of KL(q||p) (states frozen), not the gradient",
            "rel. difference k2 loss vs partial KL(q||p)",
            relative_difference(grads["k2"]["loss"], references[PARTIAL_QP]),
            lambda v: v < tol,
        ),
        (
            "A",
            "what it misses is each token's score times the KL still to come: nonzero for T > 1",
            "|grad KL(q||p) - partial| / |grad KL(q||p)|",
            _norm(future) / true_norm,
            lambda v: v > tol if q.horizon > 1 else v < tol,
        ),
        (
            "A",
            "k3 in the loss gives at best the partial gradient of KL(p||q)",
            "rel. difference k3 loss vs partial KL(p||q)",
            relative_difference(grads["k3"]["loss"], references[PARTIAL_PQ]),
            lambda v: v < tol,
        ),
        (
            "A",
            "a per-token weight exp(log q_t - sg log q_t) on k3 (loss+reward) still gives only the partial "
            "gradient of KL(q||p)",
            "rel. difference k3 loss+reward vs partial KL(q||p)",
            relative_difference(grads["k3"]["loss+reward"], references[PARTIAL_QP]),
            lambda v: v < tol,
        ),
        (
            "B",
            "k1 as a per-token reward with undiscounted reward-to-go gives grad KL(q||p) exactly",
            "rel. difference k1 reward-to-go vs grad KL(q||p)",
            relative_difference(grads["k1"]["reward-to-go"], references[KL_QP]),
            lambda v: v < tol,
        ),
        (
            "B",
            "the summed k1 as a sequence-level reward gives grad KL(q||p) in expectation",
            "rel. difference k1 sequence-reward vs grad KL(q||p)",
            relative_difference(grads["k1"]["sequence-reward"], references[KL_QP]),
            lambda v: v < tol,
        ),
        (
            "B",
            "k3 in the loss plus k3 in the reward with reward-to-go (full) gives grad KL(q||p)",
            "rel. difference k3 full vs grad KL(q||p)",
            relative_difference(grads["k3"]["full"], references[KL_QP]),
            lambda v: v < tol,
        ),
        (
            "related",
            "k1 in the loss (pathwise, samples fixed) has zero expected gradient",
            "|k1 loss| / |grad KL(q||p)|",
            _norm(grads["k1"]["loss"]) / true_norm,
            lambda v: v < tol,
        ),
        (
            "related",
            "k2 in the loss and k1 as each token's own reward have the same expected gradient",
            "rel. difference k2 loss vs k1 reward",
            relative_difference(grads["k2"]["loss"], grads["k1"]["reward"]),
            lambda v: v < tol,
        ),
    ]
    return pd.DataFrame(
        [
            {"claim": claim, "statement": statement, "quantity": quantity, "value": value, "holds": bool(check(value))}
            for claim, statement, quantity, value, check in rows
        ]
    )


# --- framework crosswalk: which placement a setting implements -----------------------------------

#: (mode, aggregation) -> (placement, scale of the expected gradient for fixed-length responses, note).
#: Modes and aggregations as in ``data/frameworks.json``; the scale is a positive constant (it is absorbed in the
#: KL coefficient), so ``follows`` is that of the unscaled placement. With variable lengths (EOS) a batch token-mean
#: scales by about 1/E[L] instead, but a per-sequence mean weights each sequence by 1/L: not a constant, so not
#: one of these placements.
FRAMEWORK_PLACEMENTS = {
    ("loss", "token-mean"): ("loss", "1/T", "k_t in the loss averaged over all tokens of the batch"),
    ("loss", "sequence-mean"): ("loss", "1/T", "mean over each sequence's tokens, then over sequences"),
    ("loss", "sum"): ("loss", "1", "summed over tokens (seq-mean-token-sum)"),
    ("reward", "per-token"): (
        "reward-to-go",
        "1",
        "k1 per token in the reward, GAE with gamma = lambda = 1 or "
        "Monte Carlo returns; a critic or baseline changes variance, not the expectation",
    ),
    ("reward", "sequence"): ("sequence-reward", "1", "summed penalty as one sequence-level reward (RLOO, GRPO)"),
    ("reward", "sequence-mean"): ("sequence-reward", "1/T", "token-mean penalty subtracted from the sequence reward"),
    ("full", "per-token"): (
        "loss+reward",
        "1/T",
        "k_t exp(logq_t - sg logq_t) in a token-mean loss: the weight "
        "adds each token's own score term, not the reward-to-go",
    ),
    ("full", "sequence"): ("full", "1/T", "k_t exp(log q(y) - sg log q(y)) with the whole-sequence weight"),
}


def placement_of_setting(mode: str, aggregation: str, weight: str = "per-token") -> str:
    """The placement a framework setting implements, from its ``mode`` and aggregation (``reduction``) text.

    ``weight`` (``full`` mode only) says whether the differentiable importance weight is per token (every
    framework in ``data/frameworks.json``) or the whole sequence's.

    >>> placement_of_setting("reward", "per-token reward"), placement_of_setting("reward", "sequence sum")
    ('reward-to-go', 'sequence-reward')
    >>> placement_of_setting("full", "token mean")
    'loss+reward'
    """
    return FRAMEWORK_PLACEMENTS[_setting_key(mode, aggregation, weight)][0]


def _setting_key(mode: str, aggregation: str, weight: str = "per-token") -> tuple[str, str]:
    mode, text = str(mode).strip().lower(), str(aggregation).strip().lower()
    if mode == "loss":
        return mode, ("sum" if "sum" in text else "sequence-mean" if "seq" in text else "token-mean")
    if mode == "reward":
        if "sequence" in text and "mean" in text or "token mean" in text:
            return mode, "sequence-mean"
        return mode, ("sequence" if "sequence" in text or "rloo" in text or "grpo" in text else "per-token")
    if mode == "full":
        if weight not in ("per-token", "sequence"):
            raise ValueError(f"weight must be 'per-token' or 'sequence', got {weight!r}")
        return mode, weight
    raise ValueError(f"unknown KL mode {mode!r}; choose loss, reward or full (one mode per setting)")


def sequence_answer(
    estimator, mode: str, aggregation: str, q: Autoregressive, p: Autoregressive, weight: str = "per-token"
) -> dict:
    """The sequence-level answer for one framework setting: ``placement``, ``scale``, ``follows`` (on (q, p)).

    >>> from klsym.exact.autoregressive import Autoregressive
    >>> p = Autoregressive.random(2, 3, seed=0); q = p.perturbed(0.3, seed=1)
    >>> sequence_answer("k3", "loss", "token-mean (loss_agg_mode)", q, p)["follows"]
    'partial KL(p||q)'
    """
    key = _setting_key(mode, aggregation, weight)
    placement, scale, note = FRAMEWORK_PLACEMENTS[key]
    gradient, rounding = _placements(estimator, q, p, [placement])[placement]
    references, reference_errors = _references(q, p)
    return {
        "placement": placement,
        "scale": scale,
        "note": note,
        "follows": follows(gradient, references, rounding=rounding, reference_rounding=reference_errors),
    }


def framework_answers(q: Autoregressive, p: Autoregressive, estimators="k1,k2,k3"):
    """Every row of :data:`FRAMEWORK_PLACEMENTS` x estimator: placement, scale and what it follows (a DataFrame)."""
    import pandas as pd

    references, reference_errors = _references(q, p)
    rows = []
    for estimator in _estimators(estimators):
        gradients = _placements(estimator, q, p, PLACEMENTS)
        for (mode, aggregation), (placement, scale, note) in FRAMEWORK_PLACEMENTS.items():
            rows.append(
                {
                    "mode": mode,
                    "aggregation": aggregation,
                    "estimator": estimator.name,
                    "placement": placement,
                    "scale": scale,
                    "follows": follows(
                        gradients[placement][0],
                        references,
                        rounding=gradients[placement][1],
                        reference_rounding=reference_errors,
                    )
                    or "-",
                    "note": note,
                }
            )
    return pd.DataFrame(rows)


__all__ = [
    "PLACEMENTS",
    "RATIO_PLACEMENTS",
    "ALL_PLACEMENTS",
    "FOLLOWS_TOLERANCE",
    "FOLLOWS_ORDER",
    "FRAMEWORK_PLACEMENTS",
    "true_gradients",
    "partial_gradients",
    "missing_future_term",
    "placement_gradients",
    "placement_gradient",
    "relative_difference",
    "relative_error",
    "cosine",
    "reference_gradients",
    "reference_rounding",
    "follows",
    "INDISTINGUISHABLE",
    "sequence_summary",
    "placement_table",
    "follows_table",
    "pair",
    "future_term_table",
    "paper_claims",
    "placement_of_setting",
    "sequence_answer",
    "framework_answers",
]
