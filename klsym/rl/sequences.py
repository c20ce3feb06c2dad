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
whole-sequence ratio enumerates the V^T leaves in blocks). A placement **follows** the first of ``KL(q||p)``,
``KL(p||q)``, ``partial KL(q||p)``, ``partial KL(p||q)`` whose gradient it equals to a relative difference below
:data:`FOLLOWS_TOLERANCE`, else ``zero`` when its norm is below that tolerance times the largest reference norm,
else None.

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
from klsym.exact.autoregressive import (Autoregressive, per_position_kls, prefix_mass, prefix_sums, score_gradient,
                                        sequence_kls, to_go, whole_sequence_expectations)

KL_QP, KL_PQ = "KL(q||p)", "KL(p||q)"
PARTIAL_QP, PARTIAL_PQ = "partial KL(q||p)", "partial KL(p||q)"
ZERO = "zero"
#: Per-token placements; ``full`` = loss + reward-to-go, ``loss+reward`` = per-token importance-weighted loss.
PLACEMENTS = ("loss", "reward", "reward-to-go", "sequence-reward", "full", "loss+reward")
#: k applied to the whole-sequence ratio, in the three single-token modes.
RATIO_PLACEMENTS = ("sequence-ratio-loss", "sequence-ratio-reward", "sequence-ratio-full")
ALL_PLACEMENTS = PLACEMENTS + RATIO_PLACEMENTS
#: Relative difference below which two exact gradients are called equal.
FOLLOWS_TOLERANCE = 1e-10
FOLLOWS_ORDER = (KL_QP, KL_PQ, PARTIAL_QP, PARTIAL_PQ)


# --- reference gradients ---------------------------------------------------------------------

def _check_pair(q, p) -> None:
    if not isinstance(q, Autoregressive):
        raise ValueError(f"q must be an Autoregressive policy, got {type(q).__name__}")
    q.check_pair(p)


def true_gradients(q: Autoregressive, p: Autoregressive) -> dict:
    r"""Flat gradients (length P V) of the sequence KL(q||p) and KL(p||q) w.r.t. q's logits."""
    _check_pair(q, p)
    excess = q.log_probs - p.log_probs  # l(u, a) = log q - log p
    kl_pq_rows = prefix_mass(p)[:, None] * (q.probs - p.probs)  # only q(.|u) depends on theta_u; states ~ p
    return {KL_QP: score_gradient(q, prefix_mass(q), to_go(q, excess)), KL_PQ: kl_pq_rows.ravel()}


def partial_gradients(q: Autoregressive, p: Autoregressive) -> dict:
    r""":math:`\sum_t \mathbb{E}_{y_{<t} \sim q}[\nabla_\theta D(q(\cdot|y_{<t}) \| p(\cdot|y_{<t}))]`, states held
    fixed, for D = KL(q||p) and KL(p||q); flat (P V,)."""
    _check_pair(q, p)
    mass = prefix_mass(q)
    return {KL_QP: score_gradient(q, mass, q.log_probs - p.log_probs),
            KL_PQ: (mass[:, None] * (q.probs - p.probs)).ravel()}


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
        raise ValueError(f"unknown placement(s) {unknown or list(placements)}; choose from: {', '.join(ALL_PLACEMENTS)}")
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
    (estimator,) = _estimators([estimator])
    _check_pair(q, p)
    placements = _check_placements(placements)
    token_t = p.log_probs - q.log_probs
    mass = prefix_mass(q)
    cache: dict = {}

    def value():
        if "value" not in cache:
            cache["value"] = np.asarray(estimator.numeric(token_t), dtype=np.float64)
        return cache["value"]

    def pathwise():  # -d k_sur / dt: the weight of the score in the loss
        if "pathwise" not in cache:
            cache["pathwise"] = -np.asarray(estimator.numeric_dt(token_t), dtype=np.float64)
        return cache["pathwise"]

    def weights(name):
        if name not in cache:
            if name == "loss":
                cache[name] = pathwise()
            elif name == "reward":
                cache[name] = value()
            elif name == "reward-to-go":
                cache[name] = to_go(q, value())
            elif name == "sequence-reward":
                cache[name] = weights("reward-to-go") + prefix_sums(q, value())[:, None]
            elif name == "full":
                cache[name] = pathwise() + weights("reward-to-go")
            elif name == "loss+reward":
                cache[name] = pathwise() + value()
        return cache[name]

    def whole_sequence(mode):
        functions = {"loss": lambda t: -estimator.numeric_dt(t), "reward": estimator.numeric,
                     "full": lambda t: estimator.numeric(t) - estimator.numeric_dt(t)}
        return whole_sequence_expectations(q, p, functions[mode])

    out = {}
    for name in placements:
        if name in RATIO_PLACEMENTS:
            out[name] = score_gradient(q, mass, whole_sequence(name.removeprefix("sequence-ratio-")))
        else:
            out[name] = score_gradient(q, mass, weights(name))
    return out


def placement_gradient(estimator, q: Autoregressive, p: Autoregressive, placement: str) -> np.ndarray:
    """One placement's exact expected gradient (see :func:`placement_gradients`)."""
    return placement_gradients(estimator, q, p, [placement])[placement]


# --- comparisons -------------------------------------------------------------------------------

def relative_difference(a, b) -> float:
    r""":math:`\|a - b\| / \max(\|a\|, \|b\|)` (0 when both vanish; NaN when either is not finite)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        return math.nan
    scale = max(float(np.linalg.norm(a)), float(np.linalg.norm(b)))
    return 0.0 if scale == 0 else float(np.linalg.norm(a - b)) / scale


def relative_error(gradient, target) -> float:
    r""":math:`\|g - g^*\| / \|g^*\|` (inf when the target vanishes and g does not)."""
    gradient, target = np.asarray(gradient, dtype=np.float64), np.asarray(target, dtype=np.float64)
    error, scale = float(np.linalg.norm(gradient - target)), float(np.linalg.norm(target))
    return (0.0 if error == 0 else math.inf) if scale == 0 else error / scale


def cosine(a, b) -> float:
    """Cosine of the angle between two gradients (NaN when either is zero)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    norms = float(np.linalg.norm(a)) * float(np.linalg.norm(b))
    return math.nan if norms == 0 else float(np.dot(a, b)) / norms


def reference_gradients(q: Autoregressive, p: Autoregressive) -> dict:
    """The four labelled references of :func:`follows`: true and partial gradients of both KL directions."""
    true, partial = true_gradients(q, p), partial_gradients(q, p)
    return {KL_QP: true[KL_QP], KL_PQ: true[KL_PQ], PARTIAL_QP: partial[KL_QP], PARTIAL_PQ: partial[KL_PQ]}


def follows(gradient, references: dict, tolerance: float = FOLLOWS_TOLERANCE) -> str | None:
    """Label of the first reference (in :data:`FOLLOWS_ORDER`) equal to ``gradient``, ``"zero"`` or None."""
    for label in FOLLOWS_ORDER:
        if relative_difference(gradient, references[label]) < tolerance:
            return label
    scale = max(float(np.linalg.norm(references[label])) for label in FOLLOWS_ORDER)
    return ZERO if float(np.linalg.norm(gradient)) <= tolerance * scale else None


# --- the summary (JSON of `python -m klsym sequence`) --------------------------------------------

def sequence_summary(q: Autoregressive, p: Autoregressive, estimators="k1,k2,k3", placements=ALL_PLACEMENTS,
                     mc: int | None = None, seed: int = 0, **mc_options) -> dict:
    r"""The ``klsym sequence`` JSON object.

    Keys: ``V``, ``T``, ``sequences``, ``parameters``; ``kl`` {KL(q||p), KL(p||q)}; ``per_position`` (each position's
    share of both KLs); ``true_gradient`` and ``partial_gradient`` (same two keys, flat lists of length P V);
    ``missing_future_term`` (:math:`\|\nabla KL(q\|p) - \partial KL(q\|p)\| / \|\nabla KL(q\|p)\|`); ``estimators`` ->
    name -> placement -> {``gradient``, ``follows``, ``relative_error``, ``cosine``} (the last two against
    :math:`\nabla KL(q\|p)` of the sequences); with ``mc``, an ``mc`` block from
    :func:`klsym.simulate.sequences.crosscheck`.
    """
    _check_pair(q, p)
    estimators, placements = _estimators(estimators), _check_placements(placements)
    references = reference_gradients(q, p)
    target = references[KL_QP]
    out = {"V": q.vocab_size, "T": q.horizon, "sequences": q.n_sequences, "parameters": q.size,
           "kl": sequence_kls(q, p), "per_position": per_position_kls(q, p),
           "true_gradient": {KL_QP: references[KL_QP], KL_PQ: references[KL_PQ]},
           "partial_gradient": {KL_QP: references[PARTIAL_QP], KL_PQ: references[PARTIAL_PQ]},
           "missing_future_term": relative_error(references[PARTIAL_QP], target), "estimators": {}}
    for estimator in estimators:
        entry = {}
        for name, gradient in placement_gradients(estimator, q, p, placements).items():
            entry[name] = {"gradient": gradient, "follows": follows(gradient, references),
                           "relative_error": relative_error(gradient, target), "cosine": cosine(gradient, target)}
        out["estimators"][estimator.name] = entry
    if mc is not None:
        from klsym.simulate.sequences import crosscheck  # only a Monte Carlo run needs the engine

        out["mc"] = crosscheck(q, p, estimators, n=mc, seed=seed, placements=placements, exact=out, **mc_options)
    return out


# --- tables for notebooks --------------------------------------------------------------------

def placement_table(q: Autoregressive, p: Autoregressive, estimators="k1,k2,k3", placements=ALL_PLACEMENTS):
    """One row per (estimator, placement): ``follows``, ``relative_error``, ``cosine`` (a pandas DataFrame)."""
    import pandas as pd

    summary = sequence_summary(q, p, estimators, placements)
    return pd.DataFrame([{"estimator": name, "placement": placement, "follows": entry["follows"],
                          "relative_error": entry["relative_error"], "cosine": entry["cosine"]}
                         for name, by_placement in summary["estimators"].items()
                         for placement, entry in by_placement.items()])


def follows_table(q: Autoregressive, p: Autoregressive, estimators="k1,k2,k3", placements=ALL_PLACEMENTS):
    """Estimators x placements DataFrame of ``follows`` labels ("-" for None)."""
    table = placement_table(q, p, estimators, placements)
    wide = table.pivot(index="estimator", columns="placement", values="follows").fillna("-")
    return wide.loc[list(dict.fromkeys(table["estimator"])), list(dict.fromkeys(table["placement"]))].rename_axis(
        columns=None)


def pair(kind: str, vocab_size: int, horizon: int, distance: float, seed: int = 0):
    r"""A (q, p) pair for sweeps: p is ``"random"`` (N(0,1) logits) or ``"zipf"`` (LLM-shaped); q is p with
    N(0, distance^2) noise on every logit (``"perturbed"`` suffix implied) or, for ``kind="zipf-tempered"``, p at
    temperature ``1 + distance``."""
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
            row = {"T": horizon, "distance": distance, KL_QP: sequence_kls(q, p)[KL_QP],
                   "|grad KL(q||p)|": float(np.linalg.norm(true)), "future / |grad|": relative_error(partial, true),
                   "cos(partial, true)": cosine(partial, true)}
            for estimator in _estimators(estimators):
                row[f"{estimator.name} loss: rel. error"] = relative_error(
                    placement_gradient(estimator, q, p, "loss"), true)
            rows.append(row)
    return pd.DataFrame(rows)


def paper_claims(q: Autoregressive, p: Autoregressive):
    r"""Claims about per-token KL terms in autoregressive RL (Tang & Munos 2025, arXiv 2506.09477; Liu et al. 2025,
    arXiv 2510.01555, as summarised in klsym issue 12), each checked by an exact number on (q, p).

    Columns: ``source``, ``claim``, ``quantity``, ``value``, ``holds``.
    """
    import pandas as pd

    references = reference_gradients(q, p)
    grads = {e.name: placement_gradients(e, q, p) for e in _estimators("k1,k2,k3")}
    future = references[KL_QP] - references[PARTIAL_QP]
    true_norm = float(np.linalg.norm(references[KL_QP]))
    tol = FOLLOWS_TOLERANCE
    rows = [
        ("Tang & Munos", "k1 in the loss (pathwise, samples fixed) has zero expected gradient",
         "|E[loss grad of k1]| / |grad KL(q||p)|", float(np.linalg.norm(grads["k1"]["loss"])) / true_norm,
         lambda v: v < tol),
        ("Tang & Munos", "a per-token loss misses the effect of q at position t on later prefixes: k2 in the loss "
         "gives the partial gradient, not grad KL(q||p)",
         "rel. difference k2 loss vs partial KL(q||p)", relative_difference(grads["k2"]["loss"],
                                                                            references[PARTIAL_QP]),
         lambda v: v < tol),
        ("Tang & Munos", "... and the part it misses is the score times the KL still to come (nonzero for T > 1)",
         "|grad KL(q||p) - partial| / |grad KL(q||p)|", float(np.linalg.norm(future)) / true_norm,
         lambda v: v > tol if q.horizon > 1 else v < tol),
        ("Tang & Munos", "k3 in the loss follows KL(p||q) per token, hence at best the partial KL(p||q) gradient",
         "rel. difference k3 loss vs partial KL(p||q)", relative_difference(grads["k3"]["loss"],
                                                                            references[PARTIAL_PQ]),
         lambda v: v < tol),
        ("Tang & Munos", "k1 as a per-token reward with reward-to-go (undiscounted) gives grad KL(q||p) exactly",
         "rel. difference k1 reward-to-go vs grad KL(q||p)",
         relative_difference(grads["k1"]["reward-to-go"], references[KL_QP]), lambda v: v < tol),
        ("Liu et al.", "the summed KL as a sequence-level reward also gives grad KL(q||p) in expectation",
         "rel. difference k1 sequence-reward vs grad KL(q||p)",
         relative_difference(grads["k1"]["sequence-reward"], references[KL_QP]), lambda v: v < tol),
        ("Liu et al.", "k2 in the loss and k1 as each token's own reward have the same expected gradient",
         "rel. difference k2 loss vs k1 reward", relative_difference(grads["k2"]["loss"], grads["k1"]["reward"]),
         lambda v: v < tol),
        ("Liu et al.", "k3 in the loss is not grad KL(q||p) of the sequences",
         "rel. error of k3 loss vs grad KL(q||p)", relative_error(grads["k3"]["loss"], references[KL_QP]),
         lambda v: v > tol),
        ("Liu et al.", "a per-token importance weight exp(logq - sg logq) on k3 still gives only the partial "
         "gradient; k3 with the sequence term (full) gives grad KL(q||p)",
         "rel. difference k3 loss+reward vs partial; k3 full vs true (max)",
         max(relative_difference(grads["k3"]["loss+reward"], references[PARTIAL_QP]),
             relative_difference(grads["k3"]["full"], references[KL_QP])), lambda v: v < tol),
    ]
    return pd.DataFrame([{"source": source, "claim": claim, "quantity": quantity, "value": value,
                          "holds": bool(check(value))} for source, claim, quantity, value, check in rows])


# --- framework crosswalk: which placement a setting implements -----------------------------------

#: (mode, aggregation) -> (placement, scale of the expected gradient for fixed-length responses, note).
#: Modes and aggregations as in ``data/frameworks.json``; the scale is a positive constant (it is absorbed in the
#: KL coefficient), so ``follows`` is that of the unscaled placement.
FRAMEWORK_PLACEMENTS = {
    ("loss", "token-mean"): ("loss", "1/T", "k_t in the loss averaged over all tokens of the batch"),
    ("loss", "sequence-mean"): ("loss", "1/T", "mean over each sequence's tokens, then over sequences"),
    ("loss", "sum"): ("loss", "1", "summed over tokens (seq-mean-token-sum)"),
    ("reward", "per-token"): ("reward-to-go", "1", "k1 per token in the reward, GAE with gamma = lambda = 1 or "
                              "Monte Carlo returns; a critic or baseline changes variance, not the expectation"),
    ("reward", "sequence"): ("sequence-reward", "1", "summed penalty as one sequence-level reward (RLOO, GRPO)"),
    ("reward", "sequence-mean"): ("sequence-reward", "1/T", "token-mean penalty subtracted from the sequence reward"),
    ("full", "per-token"): ("loss+reward", "1/T", "k_t exp(logq_t - sg logq_t) in a token-mean loss: the weight "
                            "adds each token's own score term, not the reward-to-go"),
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


def sequence_answer(estimator, mode: str, aggregation: str, q: Autoregressive, p: Autoregressive,
                    weight: str = "per-token") -> dict:
    """The sequence-level answer for one framework setting: ``placement``, ``scale``, ``follows`` (on (q, p)).

    >>> from klsym.exact.autoregressive import Autoregressive
    >>> p = Autoregressive.random(2, 3, seed=0); q = p.perturbed(0.3, seed=1)
    >>> sequence_answer("k3", "loss", "token-mean (loss_agg_mode)", q, p)["follows"]
    'partial KL(p||q)'
    """
    key = _setting_key(mode, aggregation, weight)
    placement, scale, note = FRAMEWORK_PLACEMENTS[key]
    gradient = placement_gradient(estimator, q, p, placement)
    return {"placement": placement, "scale": scale, "note": note,
            "follows": follows(gradient, reference_gradients(q, p))}


__all__ = ["PLACEMENTS", "RATIO_PLACEMENTS", "ALL_PLACEMENTS", "FOLLOWS_TOLERANCE", "FOLLOWS_ORDER",
           "FRAMEWORK_PLACEMENTS", "true_gradients", "partial_gradients", "missing_future_term",
           "placement_gradients", "placement_gradient", "relative_difference", "relative_error", "cosine",
           "reference_gradients", "follows", "sequence_summary", "placement_table", "follows_table", "pair",
           "future_term_table", "paper_claims", "placement_of_setting", "sequence_answer"]
