r"""Where KL-regularised policy-gradient training ends up, for each estimator and gradient mode.

A categorical policy :math:`q = \operatorname{softmax}(\theta)` over V tokens is trained on a reward
vector R with a KL term of coefficient :math:`\beta > 0` to the reference p. The intended objective
:math:`\mathbb{E}_q[R] - \beta\,\mathrm{KL}(q\|p)` has the maximiser

.. math:: q^*(x) = \frac{p(x)\, e^{R(x)/\beta}}{Z}.

The expected update of the logits is the policy gradient minus β times the expected gradient of the
KL term in its mode (:func:`klsym.exact.expectations.estimator_gradient`). With the softmax score
:math:`s_j = 1[x = j] - q_j` and the mode coefficient :math:`h(r)` of
:func:`klsym.derive.symbolic.mode_coefficient` it is

.. math:: u_j(\theta) = q_j\,\big(a_j - \mathbb{E}_q[a]\big), \qquad a_j = R_j - \beta\, h(p_j / q_j),

so an interior fixed point is where :math:`R_j - \beta h(r_j) = \lambda` for one multiplier λ.
Where the mode follows :math:`\nabla D_g` (the implied generator of :func:`klsym.derive.symbolic.analyze`)
this is the stationarity condition of :math:`\mathbb{E}_q[R] - \beta D_g(q, p)` on the simplex,
:math:`R_j - \beta\,\varphi(r_j) = \lambda` with :math:`\varphi = \partial_{q}[q\, g(p/q)] = g - r g'`,
derived by SymPy; for a convex g it has at most one solution, found by one-dimensional root
finding for λ (:func:`stationary_point`). Otherwise the stable fixed point of the expected dynamics
is found numerically (:func:`fixed_point` says which). Statuses: ``interior``; ``boundary`` (some
low-reward tokens die out, the rest settles at an interior point of that face: ``probs`` is that point);
``collapse`` (probability flows to the reward maximisers, ``probs`` is the limit point); ``diverges``
(the dynamics run to the boundary elsewhere, or do not settle).

>>> fp = fixed_point(REFERENCE_PROBLEM, "k3", "full")           # follows grad KL(q||p)
>>> fp["status"], fp["equals_optimum"]
('interior', True)
>>> fixed_point(REFERENCE_PROBLEM, "k1", "loss")["status"]      # zero KL gradient
'collapse'
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cache, cached_property

import numpy as np
import pandas as pd
import sympy as sp
from scipy.integrate import solve_ivp
from scipy.optimize import brentq, root
from scipy.special import log_softmax, logsumexp, softmax

from klsym.derive import symbolic as symbolic_module
from klsym.derive.diskcache import cache_key, cached_json
from klsym.derive.estimators import BUILTINS, Estimator, get_estimator, gradient_weights, in_logratio
from klsym.derive.symbolic import analyze, is_zero, mode_coefficient, sign_verdict
from klsym.derive.symbols import r, t
from klsym.exact.autoregressive import Autoregressive, prefix_mass, score_gradient, sequence_kls, to_go
from klsym.exact.clamps import clamped_numeric, clamped_numeric_dt
from klsym.exact.expectations import KL_PQ, KL_QP, MODES, kl_divergences
from klsym.exact.families import Categorical
from klsym.rl.sequences import PLACEMENTS as SEQUENCE_PLACEMENTS
from klsym.rl.sequences import placement_gradient

#: Statuses of an end point.
STATUSES = ("interior", "boundary", "collapse", "diverges")
#: Time the exact expected dynamics are integrated for (units of 1/learning rate: steps at lr = 1).
DYNAMICS_TIME = 1e5
#: Below this probability a token of the dynamics' end point counts as dropped (boundary limit).
DROPPED_MASS = 1e-4
#: Largest |t| = |log r| the multiplier search lets a token reach (exp(-700) underflows nothing).
_T_LIMIT = 700.0
#: Logit gap below the largest logit at which the expected update is evaluated (q >= e^-600).
_FLOOR = 600.0
#: Largest reward spread / β accepted: q* = p e^{R/β}/Z must keep its logit gaps inside :data:`_FLOOR`.
_SPREAD_LIMIT = 500.0


# --- the problem ---------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class FixedPointProblem:
    r"""A reference policy p (logits), a reward per token and the KL coefficient β.

    >>> FixedPointProblem([0.0, 0.0], [1.0], 0.5)
    Traceback (most recent call last):
    ...
    ValueError: reward has 1 entries but the reference has 2 tokens
    >>> FixedPointProblem([0.0, 0.0], [0.0, 1.0], 1e-300)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: (max reward - min reward) / beta = 1e+300 exceeds 500: q* = p e^{R/beta}/Z would put e^-500 ...
    """

    p_logits: np.ndarray
    reward: np.ndarray
    beta: float
    reference: Categorical = field(init=False, repr=False)

    def __post_init__(self):
        logits = _finite_vector(self.p_logits, "reference logits")
        reward = _finite_vector(self.reward, "reward")
        if reward.size != logits.size:
            raise ValueError(f"reward has {reward.size} entries but the reference has {logits.size} tokens")
        if logits.size < 2:
            raise ValueError("the reference needs at least 2 tokens")
        try:
            beta = float(self.beta)
        except (TypeError, ValueError):
            raise ValueError(f"beta must be a number, got {self.beta!r}") from None
        if not math.isfinite(beta) or beta <= 0:
            raise ValueError(f"beta must be a finite number > 0, got {self.beta!r}")
        with np.errstate(over="ignore"):
            spread = (float(reward.max()) - float(reward.min())) / beta  # inf when it overflows
        if spread > _SPREAD_LIMIT:
            raise ValueError(
                f"(max reward - min reward) / beta = {spread:.3g} exceeds {_SPREAD_LIMIT:g}: "
                f"q* = p e^{{R/beta}}/Z would put e^-{_SPREAD_LIMIT:g} or less on a token, below what "
                "the float64 dynamics resolve; rescale the reward or raise beta"
            )
        for name, value in (
            ("p_logits", logits),
            ("reward", reward),
            ("beta", beta),
            ("reference", Categorical(logits)),
        ):
            object.__setattr__(self, name, value)

    @property
    def p(self) -> np.ndarray:
        return softmax(self.p_logits)

    @property
    def size(self) -> int:
        return int(self.p_logits.size)

    def with_beta(self, beta: float) -> FixedPointProblem:
        return FixedPointProblem(self.p_logits, self.reward, beta)


def _finite_vector(values, what: str) -> np.ndarray:
    try:
        array = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be real numbers") from None
    if array.ndim > 1:
        raise ValueError(f"{what} must be a vector (one number per token), got an array of shape {array.shape}")
    array = np.ravel(array)
    if array.size == 0:
        raise ValueError(f"{what} is empty")
    if not np.isfinite(array).all():
        raise ValueError(f"{what} contain non-finite values (nan or inf)")
    array.setflags(write=False)
    return array


#: The documented reference problem of the crosswalk's "converges to" column: V = 3, the reward
#: favours the token the reference likes least (p = (0.5, 0.3, 0.2), R = (0, 0.5, 1)), β = 0.5,
#: so q* = p e^{2R}/Z = (0.18, 0.29, 0.53) is far from both p and the reward maximiser.
REFERENCE_PROBLEM = FixedPointProblem(np.log([0.5, 0.3, 0.2]), np.array([0.0, 0.5, 1.0]), 0.5)


def optimum(problem: FixedPointProblem) -> np.ndarray:
    r"""The maximiser of :math:`\mathbb{E}_q[R] - \beta\,\mathrm{KL}(q\|p)`: :math:`q^* \propto p\,e^{R/\beta}`.

    >>> optimum(FixedPointProblem([0.0, 0.0], [0.0, math.log(3)], 1.0)).round(6).tolist()
    [0.25, 0.75]
    """
    return np.exp(optimum_log_probs(problem))


def optimum_log_probs(problem: FixedPointProblem) -> np.ndarray:
    r""":math:`\log q^* = \operatorname{log\,softmax}(\log p + R/\beta)`: R/β enters as logits."""
    return log_softmax(problem.p_logits + problem.reward / problem.beta)


# --- the expected update ---------------------------------------------------------------------------


@dataclass(frozen=True)
class KLTerm:
    """A KL term as training applies it: estimator, mode, and a framework's clamps (None: none)."""

    estimator: Estimator
    mode: str
    input_clamp: float | None = None
    output_clamp: float | None = None

    @property
    def clamped(self) -> bool:
        return self.input_clamp is not None or self.output_clamp is not None

    @cached_property
    def _functions(self):
        return (
            clamped_numeric(self.estimator, self.input_clamp, self.output_clamp),
            clamped_numeric_dt(self.estimator, self.input_clamp, self.output_clamp),
        )

    def weight(self, log_ratios: np.ndarray) -> np.ndarray:
        r"""Per-sample coefficient w(t) of the score: the KL gradient of one sample is :math:`w\,s`."""
        value, slope = self._functions
        return np.asarray(gradient_weights(value, slope, log_ratios, (self.mode,))[self.mode])


def kl_term(estimator, mode: str, input_clamp: float | None = None, output_clamp: float | None = None) -> KLTerm:
    """Resolve an estimator name and check the mode."""
    if mode not in MODES:
        raise ValueError(f"unknown gradient mode {mode!r}; choose one of {', '.join(MODES)}")
    if isinstance(estimator, KLTerm):
        return estimator
    return KLTerm(get_estimator(estimator), mode, input_clamp, output_clamp)


def score_expectation(probs: np.ndarray, values: np.ndarray) -> np.ndarray:
    r""":math:`\mathbb{E}_q[v(x)\, s(x)]` wrt softmax logits: :math:`q_j (v_j - \mathbb{E}_q[v])`.

    >>> score_expectation(np.array([0.5, 0.5]), np.array([0.0, 1.0])).tolist()
    [-0.25, 0.25]
    """
    return probs * (values - np.dot(probs, values))


def kl_gradient(problem: FixedPointProblem, logits: np.ndarray, term: KLTerm) -> np.ndarray:
    r"""Expected gradient of the KL term wrt q's logits: :math:`q_j (w_j - \mathbb{E}_q[w])`, w the mode's weight.

    The weights are the estimator's own lambdified expression (``numeric``/``numeric_dt``, through the clamps of
    :mod:`klsym.exact.clamps`); unclamped it equals :func:`klsym.exact.expectations.estimator_gradient` (a test
    checks every estimator and mode), evaluated here without its per-call checks because the dynamics call it
    thousands of times.
    """
    log_q = log_softmax(np.asarray(logits, dtype=np.float64))
    return score_expectation(np.exp(log_q), term.weight(problem.reference.log_probs - log_q))


def expected_update(problem: FixedPointProblem, logits, estimator, mode: str | None = None) -> np.ndarray:
    r"""Expected logit update :math:`\mathbb{E}_q[R\,\nabla\log q] - \beta\,(\text{KL-term gradient})`.

    >>> bool(np.abs(expected_update(REFERENCE_PROBLEM, np.log(optimum(REFERENCE_PROBLEM)), "k2", "loss")).max() < 1e-15)
    True
    """
    term = kl_term(estimator, mode) if not isinstance(estimator, KLTerm) else estimator
    logits = np.asarray(logits, dtype=np.float64)
    # a token further than _FLOOR below the top keeps the update it has there: r stays finite
    logits = np.maximum(logits - logits.max(), -_FLOOR)
    probs = softmax(logits)
    return score_expectation(probs, problem.reward) - problem.beta * kl_gradient(problem, logits, term)


def update_jacobian(problem: FixedPointProblem, logits, term: KLTerm, step: float = 1e-6, support=None) -> np.ndarray:
    r"""Eigenvalues of the expected dynamics' Jacobian on the simplex (V - 1 of them).

    Logits are defined up to a shift, so the last logit is held at 0; central differences.
    Negative real parts: a stable fixed point. With ``support`` (a boolean mask) the Jacobian is the
    one on that face of the simplex (the other tokens have q = 0 and stay there): ``logits`` then
    holds the surviving tokens' logits, and there are (number of survivors - 1) eigenvalues.
    """
    reduced = _reduced(np.asarray(logits, dtype=np.float64))
    bumps = step * np.eye(reduced.size)
    columns = [
        (
            _reduced_field(problem, term, reduced + bump, support)
            - _reduced_field(problem, term, reduced - bump, support)
        )
        / (2 * step)
        for bump in bumps
    ]
    eigenvalues = np.linalg.eigvals(np.array(columns).T) if columns else np.zeros(0)
    return eigenvalues[np.argsort(-eigenvalues.real)]


def _reduced(logits: np.ndarray) -> np.ndarray:
    return logits[:-1] - logits[-1]


def _full(reduced: np.ndarray) -> np.ndarray:
    return np.append(reduced, 0.0)


def _reduced_field(problem, term, reduced, support=None):
    """The expected update in the reduced coordinates (last logit held at 0), on the face ``support`` if given."""
    support = np.ones(reduced.size + 1, dtype=bool) if support is None else support
    update = _face_update(problem, term, support, _full(reduced))  # = expected_update on the whole simplex
    return update[:-1] - update[-1]


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    """log softmax along the last axis in plain NumPy (scipy's carries per-call overhead the loops feel)."""
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def _face_update(problem, term, support, logits):
    r"""The expected update of the surviving tokens' logits on the face ``support`` (q = 0 elsewhere).

    :math:`u_j = q_j (a_j - \mathbb{E}_q[a])`, :math:`a_j = R_j - \beta\,w(\log p_j - \log q_j)` over the
    survivors: the dead tokens add nothing to the expectations and stay dead.
    """
    log_q = _log_softmax(np.maximum(logits - logits.max(), -_FLOOR))
    advantage = problem.reward[support] - problem.beta * term.weight(problem.reference.log_probs[support] - log_q)
    return score_expectation(np.exp(log_q), advantage)


# --- SymPy: the stationarity condition --------------------------------------------------------------


@cache
def stationarity_condition(estimator, mode: str) -> dict:
    r"""The condition :math:`R_j - \beta\,\varphi(r_j) = \lambda` of a mode's implied divergence.

    :math:`\varphi(r) = g(r) - r g'(r)` is :math:`\partial_{q_j}[q_j\, g(p_j/q_j)]`, checked to differ
    from the mode coefficient h by a constant. Returns ``phi`` (in r), ``convex`` (g'' >= 0 proved),
    ``constant`` (φ constant: no restoring force), and for a convex g (the only case
    :func:`stationary_point` solves) ``inverse`` (t = log r as a function of y = φ, where SymPy finds a
    unique closed form) and ``range`` (φ at r -> ∞ and r -> 0+). Cached in-process and on disk
    (:mod:`klsym.derive.diskcache`, keyed like :func:`klsym.derive.symbolic.analyze` plus the mode).

    >>> c = stationarity_condition("k3", "loss")                  # KL(p||q)
    >>> c["phi"], c["inverse"], c["convex"]
    (1 - r, log(1 - y), True)
    >>> stationarity_condition("k1", "full")["inverse"]            # KL(q||p): r_j = e^{1 - y}
    1 - y
    """
    estimator = get_estimator(estimator)
    key = cache_key(
        [sp.srepr(estimator.expr), sp.srepr(estimator.surrogate_expr), estimator.name, mode],
        [__file__, symbolic_module.__file__],
    )
    stored = cached_json("stationarity", key, lambda: _to_json(_derive_stationarity(estimator, mode)))
    return _from_json(stored)


_EXPRESSIONS = ("generator", "phi", "inverse", "y")


def _to_json(condition: dict) -> dict:
    return {k: (sp.srepr(v) if k in _EXPRESSIONS and v is not None else v) for k, v in condition.items()}


def _from_json(stored: dict) -> dict:
    # srepr strings written by _to_json from SymPy's own derivation (never user input)
    out = {k: (sp.sympify(v) if k in _EXPRESSIONS and v is not None else v) for k, v in stored.items()}
    out["range"] = tuple(out["range"]) if out["range"] is not None else None
    return out


def _derive_stationarity(estimator: Estimator, mode: str) -> dict:
    derived = analyze(estimator)["gradient"][mode]
    g = sp.sympify(derived["generator"], locals={"r": r})
    out = {
        "divergence": derived["divergence"],
        "generator": g,
        "phi": None,
        "convex": False,
        "constant": False,
        "inverse": None,
        "range": None,
    }
    if g.has(sp.Integral):  # SymPy could not integrate the ODE: no generator to differentiate
        return out
    phi = sp.simplify(g - r * sp.diff(g, r))
    if not is_zero(sp.diff(phi - mode_coefficient(estimator, mode), r)):
        raise AssertionError(f"{estimator.name} {mode}: g - r g' is not h + c")  # the ODE of symbolic
    y = sp.Symbol("y", real=True)
    out["phi"] = phi
    out["constant"] = is_zero(sp.diff(phi, r))
    out["convex"] = not out["constant"] and sign_verdict(sp.diff(g, r, 2))["holds"] is True
    if not out["convex"]:  # range and inverse serve the multiplier search of a convex g only
        return out
    phi_t = sp.simplify(in_logratio(phi))
    out["range"] = tuple(float(sp.limit(phi_t, t, end)) for end in (sp.oo, -sp.oo))
    try:
        solutions = [s for s in sp.solve(sp.Eq(phi_t, y), t) if not s.has(sp.I)]
    except (NotImplementedError, ValueError):
        solutions = []
    out["inverse"] = solutions[0] if len(solutions) == 1 else None
    out["y"] = y
    return out


def stationary_point(problem: FixedPointProblem, estimator, mode: str) -> dict | None:
    r"""The interior stationary point of :math:`\mathbb{E}_q[R] - \beta D_g(q, p)`, for a convex g.

    With φ decreasing, :math:`r_j = \varphi^{-1}((R_j - \lambda)/\beta)` and
    :math:`\sum_j p_j / r_j` decreases in λ: one root, found by ``brentq`` on its logarithm.
    Returns ``{"probs", "multiplier", "method"}``; ``{"probs": None, ...}`` when no λ solves
    it (the maximiser lies on the boundary); None when the condition is not a convex gradient
    field (then :func:`fixed_point` integrates the dynamics).

    >>> sp_ = stationary_point(REFERENCE_PROBLEM, "k2", "loss")
    >>> bool(np.allclose(sp_["probs"], optimum(REFERENCE_PROBLEM), atol=1e-12))
    True
    """
    condition = stationarity_condition(
        get_estimator(estimator).name if not isinstance(estimator, Estimator) else estimator, mode
    )
    if not condition["convex"] or condition["constant"]:
        return None
    phi_inf, phi_zero = condition["range"]
    inverse = _inverse_function(condition)
    reward, beta, log_p = problem.reward, problem.beta, log_softmax(problem.p_logits)
    lower = (reward.max() - beta * phi_zero) if math.isfinite(phi_zero) else -math.inf
    upper = (reward.min() - beta * phi_inf) if math.isfinite(phi_inf) else math.inf

    def log_mass(multiplier):  # log sum_j q_j with q_j = p_j / r_j
        log_r = np.clip(inverse((reward - multiplier) / beta), -_T_LIMIT, _T_LIMIT)
        return float(logsumexp(log_p - log_r))

    bracket = _bracket(log_mass, lower, upper, scale=beta + np.ptp(reward))
    method = "SymPy stationarity condition, brentq for the multiplier"
    if bracket is None:
        return {"probs": None, "multiplier": None, "method": method + ": no interior solution"}
    multiplier = brentq(log_mass, *bracket, xtol=1e-15, rtol=4 * np.finfo(float).eps, maxiter=500)
    log_q = log_p - inverse((reward - multiplier) / beta)
    return {"probs": softmax(log_q), "multiplier": multiplier, "method": method}


def _inverse_function(condition: dict):
    y = condition["y"]
    if condition["inverse"] is not None:
        closed = sp.lambdify(y, condition["inverse"], modules="numpy")
        return lambda values: (
            np.asarray(closed(np.asarray(values, dtype=np.float64)), dtype=np.float64) * np.ones_like(values)
        )
    phi_t = sp.lambdify(t, in_logratio(condition["phi"]), modules="numpy")

    def numeric(values):  # phi decreasing in r: one root in t per value
        return np.array(
            [brentq(lambda s, v=v: phi_t(s) - v, -_T_LIMIT, _T_LIMIT, xtol=1e-14) for v in np.atleast_1d(values)]
        )

    return numeric


def _bracket(fn, lower: float, upper: float, scale: float):
    """An interval where the decreasing fn changes sign, inside (lower, upper); None if none."""
    gap = 1e-12 * max(1.0, abs(lower) if math.isfinite(lower) else 1.0, abs(upper) if math.isfinite(upper) else 1.0)
    lo = lower + gap if math.isfinite(lower) else (upper - scale if math.isfinite(upper) else -scale)
    hi = upper - gap if math.isfinite(upper) else (lo + scale)
    with np.errstate(all="ignore"):
        for _ in range(200):
            if not math.isfinite(lower) and fn(lo) <= 0:
                lo -= 2 * (hi - lo)
            elif not math.isfinite(upper) and fn(hi) >= 0:
                hi += 2 * (hi - lo)
            else:
                break
        f_lo, f_hi = fn(lo), fn(hi)
    if not (f_lo > 0 > f_hi):
        return None
    return lo, hi


# --- the expected dynamics ------------------------------------------------------------------------


def integrate_dynamics(
    problem: FixedPointProblem,
    estimator,
    mode: str | None = None,
    *,
    time: float = DYNAMICS_TIME,
    points: int = 200,
    start=None,
) -> dict:
    r"""Integrate :math:`\dot\theta = u(\theta)` from q = p (exact expected dynamics; LSODA).

    Returns ``times`` (log-spaced) and ``probs`` (one row per time); ``finite`` is False when the
    logits left the floating-point range.
    """
    term = kl_term(estimator, mode) if not isinstance(estimator, KLTerm) else estimator
    start = problem.p_logits if start is None else np.asarray(start, dtype=np.float64)
    times = np.concatenate([[0.0], np.geomspace(1e-2, time, points - 1)])
    with np.errstate(all="ignore"):
        solution = solve_ivp(
            lambda _, z: _reduced_field(problem, term, z),
            (0.0, time),
            _reduced(start),
            method="LSODA",
            t_eval=times,
            rtol=1e-6,
            atol=1e-9,
        )  # interior ends get polished
    reduced = solution.y.T
    finite = solution.success and np.isfinite(reduced).all()
    probs = softmax(np.column_stack([reduced, np.zeros(len(reduced))]), axis=1)
    return {"times": solution.t, "probs": probs, "logits": reduced, "finite": bool(finite), "message": solution.message}


def _clamps_idle(problem, term, probs) -> bool:
    """No clamp bites at this point: |t| inside the input clamp, |k| inside the output clamp, with margin."""
    if not term.clamped:
        return True
    log_ratios = np.log(problem.p) - np.log(probs)
    inside = True
    if term.input_clamp is not None:
        inside &= bool(np.all(np.abs(log_ratios) < 0.99 * term.input_clamp))
    if term.output_clamp is not None:
        inside &= bool(np.all(np.abs(term.estimator.numeric(log_ratios)) < 0.99 * term.output_clamp))
    return inside


def _polish(problem, term, logits, support=None):
    """Newton-type refinement of an approximate fixed point, interior or on the face ``support`` (None if it
    does not converge)."""
    if len(logits) < 2:
        return np.asarray(logits, dtype=np.float64)  # a vertex: nothing to refine
    with np.errstate(all="ignore"):
        solution = root(lambda z: _reduced_field(problem, term, z, support), _reduced(logits), method="hybr", tol=1e-14)
        if not solution.success or not np.isfinite(solution.x).all():
            return None
        if np.max(np.abs(_reduced_field(problem, term, solution.x, support))) > 1e-10:
            return None
    return _full(solution.x)


def _boundary_status(problem, probs) -> tuple[str, np.ndarray]:
    """A boundary limit: ``collapse`` if only reward maximisers survive, ``boundary`` if the dropped tokens all
    have lower reward than the survivors (not all maximisers), else ``diverges`` (also when none dropped)."""
    kept = probs >= DROPPED_MASS
    limit = np.where(kept, probs, 0.0)
    limit = limit / limit.sum()
    if np.all(problem.reward[kept] >= problem.reward.max()):
        return "collapse", limit  # all rewards equal and nothing dropped: q stays where it is
    if kept.all() or problem.reward[kept].min() < problem.reward[~kept].max():
        return "diverges", limit
    return "boundary", limit


def _settle_on_face(problem, term, limit):
    """The boundary limit refined to the fixed point of the dynamics on its face (the limit if none is near)."""
    support = limit > 0
    with np.errstate(divide="ignore"):
        face = _polish(problem, term, np.log(limit[support]), support)
    if face is None or np.max(np.abs(softmax(face) - limit[support])) >= 1e-3:
        return limit
    settled = np.zeros_like(limit)
    settled[support] = softmax(face)
    return settled


def fixed_point(
    problem: FixedPointProblem,
    estimator,
    mode: str,
    *,
    input_clamp: float | None = None,
    output_clamp: float | None = None,
) -> dict:
    r"""Where training with this KL term ends up, with how it was found.

    Returns ``probs``, ``KL(q||p)``, ``KL(p||q)``, ``reward`` (:math:`\mathbb{E}_q[R]`),
    ``distance_to_optimum`` (:math:`\mathrm{KL}(q_\text{end}\|q^*)`), ``status``, ``stable``,
    ``eigenvalues`` (Jacobian on the simplex, interior points), ``equals_optimum``, ``follows``
    (the implied divergence), ``method``.

    A convex implied divergence is solved exactly (:func:`stationary_point`) and the exact dynamics
    from q = p confirm it; otherwise the dynamics are integrated for :data:`DYNAMICS_TIME` and an
    interior end point is refined by root finding.
    """
    term = kl_term(estimator, mode, input_clamp, output_clamp)
    condition = stationarity_condition(term.estimator, mode)
    exact = stationary_point(problem, term.estimator, mode)
    if exact is not None and exact["probs"] is not None and _clamps_idle(problem, term, exact["probs"]):
        # concave objective: the dynamics reach it (clamps change the field only where they bite)
        method = exact["method"] + (" (clamps inactive there)" if term.clamped else "")
        return _report(problem, exact["probs"], "interior", None, term, condition["divergence"], method)
    best = problem.reward >= problem.reward.max()
    if condition["constant"] and not term.clamped and best.sum() == 1:
        # no restoring force: pure reward ascent, which ends on the unique maximiser
        return _report(
            problem,
            best.astype(float),
            "collapse",
            True,
            term,
            condition["divergence"],
            "SymPy: the mode's implied divergence has no restoring force (phi constant); "
            "reward ascent ends on the unique reward maximiser",
        )
    dynamics = integrate_dynamics(problem, term)
    end = dynamics["probs"][-1]
    if condition["constant"] and not term.clamped:
        probs, method = end, "SymPy: the mode's implied divergence has no restoring force (phi constant)"
        status, probs = _boundary_status(problem, end) if dynamics["finite"] else ("diverges", end)
        if status == "boundary":
            probs = _settle_on_face(problem, term, probs)
    else:
        method = "numeric: stable fixed point of the exact expected dynamics from q = p" + (
            " (implied divergence not convex)"
            if exact is None
            else " (no interior stationary point)"
            if exact["probs"] is None
            else " (clamps bite)"
        )
        polished = _polish(problem, term, np.log(np.maximum(end, 1e-300))) if end.min() > DROPPED_MASS else None
        if not dynamics["finite"]:
            probs, status = end, "diverges"
        elif polished is not None and np.max(np.abs(softmax(polished) - end)) < 1e-3:
            probs, status = softmax(polished), "interior"
        else:
            status, probs = _boundary_status(problem, end)
            if status == "boundary":
                probs = _settle_on_face(problem, term, probs)
    return _report(problem, probs, status, False, term, condition["divergence"], method)


def _report(problem, probs, status, stable, term, follows, method) -> dict:
    """The result dict; a fixed point gets its Jacobian eigenvalues and ``stable`` from them.

    The Jacobian is taken on the face of the simplex where the point lives (the tokens with q > 0; the whole
    simplex for an interior point): ``stable`` when every eigenvalue has a negative real part (a vertex has
    none: it attracts the dynamics that reached it). ``diverges``: no eigenvalues, ``stable`` False."""
    eigenvalues = None
    if status != "diverges":
        support = probs > 0
        with np.errstate(divide="ignore"):
            eigenvalues = update_jacobian(
                problem, np.log(probs[support]), term, support=None if support.all() else support
            )
        stable = bool(np.all(eigenvalues.real < 0))
    with np.errstate(divide="ignore"):
        q = Categorical(np.log(probs))
    star = Categorical(optimum_log_probs(problem))
    kl = kl_divergences(q, problem.reference)
    distance = max(kl_divergences(q, star)[KL_QP], 0.0)  # rounding can make it -1e-17
    return {
        "probs": np.asarray(probs),
        KL_QP: kl[KL_QP],
        KL_PQ: kl[KL_PQ],
        "reward": float(np.dot(probs, problem.reward)),
        "distance_to_optimum": distance,
        "status": status,
        "stable": stable,
        "eigenvalues": None if eigenvalues is None else _real_if_close(eigenvalues),
        "equals_optimum": bool(status == "interior" and distance < 1e-10),
        "follows": follows,
        "method": method,
    }


def _real_if_close(values: np.ndarray):
    values = np.real_if_close(values, tol=1e6)
    return values.tolist() if np.isrealobj(values) else [[v.real, v.imag] for v in values]


def fixed_point_summary(
    problem: FixedPointProblem,
    estimators=None,
    modes=MODES,
    *,
    input_clamp: float | None = None,
    output_clamp: float | None = None,
) -> dict:
    """The ``klsym fixedpoint`` JSON object: the optimum and each estimator's end point per mode."""
    estimators = [get_estimator(e) for e in (estimators if estimators is not None else BUILTINS)]
    star = optimum(problem)
    out = {
        "p": problem.p,
        "reward_vector": problem.reward,
        "beta": problem.beta,
        "optimum": {
            "probs": star,
            KL_QP: kl_divergences(Categorical(optimum_log_probs(problem)), problem.reference)[KL_QP],
            "reward": float(np.dot(star, problem.reward)),
        },
        "estimators": {},
    }
    for estimator in estimators:
        out["estimators"][estimator.name] = {
            mode: fixed_point(problem, estimator, mode, input_clamp=input_clamp, output_clamp=output_clamp)
            for mode in modes
        }
    return out


#: Table label of ``distance_to_optimum``: KL(q_end || q*), the direction written out.
DISTANCE_LABEL = "KL(end||q*)"


def summary_rows(summary: dict) -> list[dict]:
    """One row per (estimator, mode) of a :func:`fixed_point_summary`, for tables (q* first).

    Columns: status, probs, KL(q||p), KL(p||q), E_q[R], :data:`DISTANCE_LABEL` (``distance_to_optimum``),
    stable, equals q*, follows."""
    star = np.asarray(summary["optimum"]["probs"])
    with np.errstate(divide="ignore"):
        star_kl_pq = kl_divergences(Categorical(np.log(star)), Categorical(np.log(summary["p"])))[KL_PQ]
    rows = [
        {
            "estimator": "optimum q*",
            "mode": "-",
            "status": "-",
            "probs": _fmt(star),
            KL_QP: summary["optimum"][KL_QP],
            KL_PQ: star_kl_pq,
            "reward": summary["optimum"]["reward"],
            DISTANCE_LABEL: 0.0,
            "stable": True,
            "equals q*": True,
            "follows": "KL(q||p)",
        }
    ]
    for name, entry in summary["estimators"].items():
        rows += [
            {
                "estimator": name,
                "mode": mode,
                "status": point["status"],
                "probs": _fmt(point["probs"]),
                KL_QP: point[KL_QP],
                KL_PQ: point[KL_PQ],
                "reward": point["reward"],
                DISTANCE_LABEL: point["distance_to_optimum"],
                "stable": point["stable"],
                "equals q*": point["equals_optimum"],
                "follows": point["follows"],
            }
            for mode, point in entry.items()
        ]
    return rows


def _fmt(probs) -> str:
    return "(" + ", ".join(f"{v:.4f}" for v in probs) + ")"


# --- simulated training --------------------------------------------------------------------------


def expected_ascent(
    problem: FixedPointProblem,
    estimator,
    mode: str | None = None,
    *,
    lr: float = 1.0,
    steps: int = 2000,
    input_clamp=None,
    output_clamp=None,
) -> np.ndarray:
    r"""Exact expected-gradient ascent from q = p: :math:`\theta \leftarrow \theta + \eta\,u(\theta)`.

    Returns the probabilities after each step, shape (steps + 1, V).
    """
    term = estimator if isinstance(estimator, KLTerm) else kl_term(estimator, mode, input_clamp, output_clamp)
    logits, everyone = problem.p_logits.copy(), np.ones(problem.size, dtype=bool)
    path = np.empty((steps + 1, problem.size))
    path[0] = softmax(logits)
    with np.errstate(all="ignore"):
        for step in range(1, steps + 1):
            logits = logits + lr * _face_update(problem, term, everyone, logits)  # the expected update, lean
            path[step] = np.exp(_log_softmax(logits))
    return path


def stochastic_training(
    problem: FixedPointProblem,
    estimator,
    mode: str | None = None,
    *,
    batch: int = 64,
    lr: float = 0.5,
    steps: int = 2000,
    seeds=(0,),
    decay: float = 0.6,
    input_clamp=None,
    output_clamp=None,
) -> dict:
    r"""Training with per-sample updates as a framework computes them, B tokens a step.

    Each step samples :math:`x_1..x_B \sim q` and ascends
    :math:`\frac1B \sum_i \big[A_i - \beta\, w_\text{loss}(t_i)\,1_{\text{loss, full}}\big]\, s(x_i)
    - \beta\,\frac1B\sum_i k(t_i)\,s(x_i)\,1_\text{full}`, with the advantage :math:`A_i` the
    leave-one-out (RLOO) baselined reward, and in ``reward`` mode the reward :math:`R - \beta k`
    (KL in the reward, as PPO/RLOO do). Baselines leave the expected update unchanged. The step
    size decays as :math:`\eta / (1 + n/100)^{decay}` and the Polyak average of the second half of
    the iterates is returned (it converges to the fixed point; a constant step would not).

    Returns ``probs`` (per seed: the Polyak average), ``last`` (last iterate per seed), ``path``
    (per seed, probs every step). The seeds run side by side (arrays over seeds); seed s draws its
    uniforms from ``np.random.default_rng(s)`` in the order a run on its own would.
    """
    term = estimator if isinstance(estimator, KLTerm) else kl_term(estimator, mode, input_clamp, output_clamp)
    if batch < 2:
        raise ValueError("batch must be at least 2 (the leave-one-out baseline)")
    log_p = log_softmax(problem.p_logits)
    seeds = tuple(seeds)
    uniforms = np.stack([np.random.default_rng(seed).random((steps, batch)) for seed in seeds])
    offsets = problem.size * np.arange(len(seeds))[:, None]  # seed s counts its tokens in bins s V .. s V + V - 1
    logits = np.tile(problem.p_logits, (len(seeds), 1))
    path = np.empty((len(seeds), steps + 1, problem.size))
    path[:, 0] = softmax(logits, axis=1)
    with np.errstate(divide="ignore"):
        for step in range(steps):
            probs = path[:, step]
            cumulative = np.cumsum(probs, axis=1)  # inverse-CDF sampling, as searchsorted(side="right")
            draws = uniforms[:, step, :, None] * cumulative[:, -1:, None]
            tokens = np.minimum((cumulative[:, None, :] <= draws).sum(axis=-1), problem.size - 1)
            log_ratio = log_p[tokens] - np.log(np.take_along_axis(probs, tokens, axis=1))
            reward = problem.reward[tokens]
            if term.mode == "reward":
                reward = reward - problem.beta * term.weight(log_ratio)
            # reward minus the mean of the others
            coefficient = (reward * batch - reward.sum(axis=1, keepdims=True)) / (batch - 1)
            if term.mode != "reward":
                coefficient = coefficient - problem.beta * term.weight(log_ratio)
            # mean_i c_i (onehot(x_i) - q)
            counts = np.bincount(
                (tokens + offsets).ravel(), weights=coefficient.ravel(), minlength=offsets.size * problem.size
            ).reshape(probs.shape)
            update = counts / batch - probs * coefficient.mean(axis=1, keepdims=True)
            logits = logits + lr / (1 + step / 100) ** decay * update
            logits -= logits.max(axis=1, keepdims=True)
            path[:, step + 1] = np.exp(_log_softmax(logits))
    averages = path[:, steps // 2 + 1 :].mean(axis=1)
    return {"probs": averages, "last": path[:, -1].copy(), "path": path}


# --- sequences: a terminal reward on the autoregressive family ---------------------------------------


@dataclass(frozen=True, eq=False)
class SequenceProblem:
    r"""A tabular autoregressive reference p, a terminal reward R(y) per sequence, and β.

    ``reward`` has V^T entries, sequences in lexicographic order (the order of the last depth's rows
    of :class:`~klsym.exact.autoregressive.Autoregressive`, token by token).
    """

    reference: Autoregressive
    reward: np.ndarray
    beta: float

    def __post_init__(self):
        if not isinstance(self.reference, Autoregressive):
            raise ValueError(f"the reference must be Autoregressive, got {type(self.reference).__name__}")
        reward = _finite_vector(self.reward, "reward")
        if reward.size != self.reference.n_sequences:
            raise ValueError(
                f"reward has {reward.size} entries but there are V^T = {self.reference.n_sequences} sequences"
            )
        beta = FixedPointProblem(np.zeros(2), np.zeros(2), self.beta).beta  # one check of beta
        object.__setattr__(self, "reward", reward)
        object.__setattr__(self, "beta", beta)


def _reference_sequence_problem() -> SequenceProblem:
    reference = Autoregressive.random(2, 3, seed=0)
    sequences = np.array(np.unravel_index(np.arange(8), (2, 2, 2))).T
    return SequenceProblem(reference, sequences.mean(axis=1), 0.5)


#: V = 2 tokens, T = 3, p = ``Autoregressive.random(2, 3, seed=0)``, R(y) = fraction of tokens equal to 1, β = 0.5.
REFERENCE_SEQUENCE_PROBLEM = _reference_sequence_problem()


def sequence_probs(policy: Autoregressive) -> np.ndarray:
    """Probability of each of the V^T sequences (lexicographic order)."""
    last = policy.rows(policy.horizon - 1)
    return (prefix_mass(policy)[last, None] * policy.probs[last]).ravel()


def sequence_optimum(problem: SequenceProblem) -> Autoregressive:
    r"""The sequence-KL optimum :math:`q^*(y) \propto p(y)\,e^{R(y)/\beta}` as a policy, by a backward pass.

    With :math:`V(y) = R(y)/\beta` at the leaves and :math:`V(u) = \log \sum_a p(a|u)\,e^{V(ua)}` above,
    :math:`q^*(a|u) = p(a|u)\,e^{V(ua) - V(u)}`: its logits are :math:`\log p(a|u) + V(ua)`.

    >>> star = sequence_optimum(REFERENCE_SEQUENCE_PROBLEM)
    >>> p, R = REFERENCE_SEQUENCE_PROBLEM.reference, REFERENCE_SEQUENCE_PROBLEM.reward
    >>> bool(np.allclose(sequence_probs(star), softmax(np.log(sequence_probs(p)) + R / 0.5), atol=1e-14))
    True
    """
    p = problem.reference
    values = np.zeros(p.logits.shape)
    last = p.rows(p.horizon - 1)
    values[last] = problem.reward.reshape(-1, p.vocab_size) / problem.beta
    for depth in range(p.horizon - 2, -1, -1):
        children = p.rows(depth + 1)
        soft_value = logsumexp(p.log_probs[children] + values[children], axis=-1)
        values[p.rows(depth)] = soft_value.reshape(-1, p.vocab_size)
    return Autoregressive(p.log_probs + values)


def sequence_update(problem: SequenceProblem, logits: np.ndarray, estimator, placement: str) -> np.ndarray:
    r"""Expected update (flat, P V) of the logits: :math:`\mathbb{E}_q[R(y) \sum_t s_t] - \beta\,` placement gradient.

    The placement gradient is :func:`klsym.rl.sequences.placement_gradient` (exact, per placement).
    """
    p = problem.reference
    logits = np.asarray(logits, dtype=np.float64).reshape(p.logits.shape)
    logits = np.maximum(logits - logits.max(axis=1, keepdims=True), -_FLOOR)
    q = Autoregressive(logits)
    terminal = np.zeros(p.logits.shape)
    terminal[p.rows(p.horizon - 1)] = problem.reward.reshape(-1, p.vocab_size)
    reward = score_gradient(q, prefix_mass(q), to_go(q, terminal))
    return reward - problem.beta * placement_gradient(estimator, q, p, placement)


def sequence_fixed_point(problem: SequenceProblem, estimator, placement: str, *, time: float = DYNAMICS_TIME) -> dict:
    r"""Where exact expected-gradient training of a placement ends, compared with :math:`q^*`.

    The expected dynamics are integrated from q = p (LSODA) for ``time``; ``converged`` says whether
    the update vanished there (max |u| < 1e-8). Returns the sequence probabilities, both sequence KLs
    to p, :math:`\mathbb{E}_q[R]`, ``distance_to_optimum`` = KL(end||q*) of the sequences, the largest
    difference of a conditional probability from q*'s, ``status`` (interior, collapse, diverges as for
    :func:`fixed_point`, on the sequence distribution) and ``equals_optimum``.
    """
    p = problem.reference
    star = sequence_optimum(problem)
    with np.errstate(all="ignore"):
        solution = solve_ivp(
            lambda _, z: sequence_update(problem, z, estimator, placement),
            (0.0, time),
            p.log_probs.ravel(),
            method="LSODA",
            rtol=1e-8,
            atol=1e-10,
        )  # converged is checked
    end_logits = solution.y[:, -1].reshape(p.logits.shape)
    finite = solution.success and np.isfinite(end_logits).all()
    end = Autoregressive(np.maximum(end_logits - end_logits.max(axis=1, keepdims=True), -_FLOOR)) if finite else p
    probs = sequence_probs(end)
    residual = float(np.max(np.abs(sequence_update(problem, end.logits, estimator, placement))))
    converged = finite and residual < 1e-8
    if not finite:
        status = "diverges"
    elif converged and probs.min() > DROPPED_MASS:
        status = "interior"
    else:
        sequences = FixedPointProblem(np.log(sequence_probs(p)), problem.reward, problem.beta)
        status, _ = _boundary_status(sequences, probs)
    kl = sequence_kls(end, p)
    distance = max(sequence_kls(end, star)[KL_QP], 0.0)
    return {
        "probs": probs,
        KL_QP: kl[KL_QP],
        KL_PQ: kl[KL_PQ],
        "reward": float(probs @ problem.reward),
        "distance_to_optimum": distance,
        "status": status,
        "converged": converged,
        "residual": residual,
        "max_conditional_difference": float(np.max(np.abs(end.probs - star.probs))),
        "equals_optimum": bool(status == "interior" and distance < 1e-10),
    }


def sequence_table(
    problem: SequenceProblem = REFERENCE_SEQUENCE_PROBLEM, estimators=("k1", "k2", "k3"), placements=SEQUENCE_PLACEMENTS
) -> pd.DataFrame:
    """:func:`sequence_fixed_point` for each estimator x placement, with what the placement follows."""
    star = sequence_optimum(problem)
    optimum_kl = sequence_kls(star, problem.reference)[KL_QP]
    rows = [
        {
            "estimator": "optimum q*",
            "placement": "-",
            "status": "-",
            KL_QP: optimum_kl,
            "reward": float(sequence_probs(star) @ problem.reward),
            "distance_to_optimum": 0.0,
        }
    ]
    for estimator in estimators:
        for placement in placements:
            point = sequence_fixed_point(problem, estimator, placement)
            rows.append(
                {
                    "estimator": get_estimator(estimator).name,
                    "placement": placement,
                    "status": point["status"],
                    KL_QP: point[KL_QP],
                    "reward": point["reward"],
                    "distance_to_optimum": point["distance_to_optimum"],
                    "max |q(a|u) - q*(a|u)|": point["max_conditional_difference"],
                    "equals q*": point["equals_optimum"],
                    "converged": point["converged"],
                }
            )
    return pd.DataFrame(rows)


# --- tables and helpers for notebooks and the crosswalk --------------------------------------------


def converges_to(
    estimator,
    mode: str,
    problem: FixedPointProblem = REFERENCE_PROBLEM,
    *,
    input_clamp: float | None = None,
    output_clamp: float | None = None,
) -> str:
    r"""One phrase for the crosswalk: where training with this term ends up at ``problem``.

    >>> converges_to("k1", "reward")
    'q* = p e^{R/beta}/Z'
    >>> converges_to("k1", "loss")
    'collapse onto the reward maximiser(s)'
    """
    point = fixed_point(problem, estimator, mode, input_clamp=input_clamp, output_clamp=output_clamp)
    if point["equals_optimum"]:
        return "q* = p e^{R/beta}/Z"
    if point["status"] == "collapse":
        best = problem.reward >= problem.reward.max()
        if point["probs"][~best].sum() == 0:
            return "collapse onto the reward maximiser(s)"
        return f"collapse to the boundary {_fmt(point['probs'])}"
    if point["status"] == "boundary":
        return (
            f"boundary {_fmt(point['probs'])} (low-reward tokens die), KL(end||q*) = {point['distance_to_optimum']:.3g}"
        )
    if point["status"] == "diverges":
        return "diverges"
    stable = "" if point["stable"] else ", unstable"
    return f"interior {_fmt(point['probs'])}, KL(end||q*) = {point['distance_to_optimum']:.3g}{stable}"


def endpoint_table(problem: FixedPointProblem = REFERENCE_PROBLEM, estimators=None, modes=MODES) -> pd.DataFrame:
    """Every estimator x mode end point at ``problem`` as a DataFrame (probs one column per token)."""
    summary = fixed_point_summary(problem, estimators, modes)
    frame = pd.DataFrame(summary_rows(summary)[1:])
    probs = np.array([point["probs"] for entry in summary["estimators"].values() for point in entry.values()])
    frame = frame.drop(columns="probs").join(pd.DataFrame(probs, columns=[f"q[{j}]" for j in range(problem.size)]))
    if problem.size == 3:
        frame[["x", "y"]] = simplex_xy(probs)
    return frame


def trajectory_frame(
    problem: FixedPointProblem = REFERENCE_PROBLEM,
    estimators=None,
    modes=MODES,
    *,
    lr: float = 1.0,
    steps: int = 2000,
    every: int = 10,
) -> pd.DataFrame:
    """Exact expected-gradient ascent from q = p for each estimator x mode, long format.

    Columns: estimator, mode, step, ``q[j]``, KL(q||p), KL(q||q*), reward.
    """
    frames = []
    for estimator in estimators if estimators is not None else BUILTINS:
        for mode in modes:
            path = expected_ascent(problem, estimator, mode, lr=lr, steps=steps)[::every]
            frames.append(_path_frame(problem, path, every, estimator=get_estimator(estimator).name, mode=mode))
    return pd.concat(frames, ignore_index=True)


#: Corners of the probability simplex of V = 3 in the plane (token 0, 1, 2, and back to 0 to close it).
SIMPLEX_CORNERS = np.array([[0.0, 0.0], [1.0, 0.0], [0.5, math.sqrt(3) / 2], [0.0, 0.0]])


def simplex_xy(probs: np.ndarray) -> np.ndarray:
    """Plane coordinates of V = 3 probability vectors (rows): the barycentric map onto :data:`SIMPLEX_CORNERS`.

    >>> simplex_xy(np.array([[0.0, 0.0, 1.0]])).round(6).tolist()
    [[0.5, 0.866025]]
    """
    return np.asarray(probs) @ SIMPLEX_CORNERS[:3]


def _path_frame(problem, path, every, **labels) -> pd.DataFrame:
    log_q = np.log(np.maximum(path, 1e-300))
    log_p, log_star = log_softmax(problem.p_logits), np.log(optimum(problem))
    frame = pd.DataFrame(path, columns=[f"q[{j}]" for j in range(problem.size)])
    frame.insert(0, "step", np.arange(len(path)) * every)
    for key, value in labels.items():
        frame.insert(0, key, value)
    frame[KL_QP] = np.sum(path * (log_q - log_p), axis=1)
    frame["KL(q||q*)"] = np.sum(path * (log_q - log_star), axis=1)
    frame["reward"] = path @ problem.reward
    if problem.size == 3:
        frame[["x", "y"]] = simplex_xy(path)
    return frame


def stochastic_frame(
    problem: FixedPointProblem,
    runs,
    *,
    batch: int = 64,
    lr: float = 0.5,
    steps: int = 2000,
    seeds=(0, 1, 2),
    every: int = 10,
) -> pd.DataFrame:
    """Stochastic training paths (long format, one run per seed) for each (estimator, mode) in ``runs``."""
    frames = []
    for estimator, mode in runs:
        result = stochastic_training(problem, estimator, mode, batch=batch, lr=lr, steps=steps, seeds=seeds)
        for seed, path in zip(seeds, result["path"]):
            frames.append(
                _path_frame(
                    problem, path[::every], every, estimator=get_estimator(estimator).name, mode=mode, seed=seed
                )
            )
    return pd.concat(frames, ignore_index=True)


def simulation_check(
    problem: FixedPointProblem,
    estimator,
    mode: str,
    *,
    batch: int = 64,
    lr: float = 0.5,
    steps: int = 4000,
    seeds=tuple(range(8)),
    ascent_lr: float = 1.0,
    ascent_steps: int = 20000,
) -> dict:
    r"""Predicted end point vs exact expected ascent vs stochastic training (z per token across seeds).

    ``z`` = (seed mean of the Polyak averages - predicted) / (their standard error, floored at 1e-12:
    some terms, e.g. k1 in the reward, make every per-sample update vanish at q*, so runs agree to
    rounding); ``max_abs_z``. For a boundary end point (collapse, diverges) the limit is only reached as the
    steps go to infinity, so there is no z (NaN): ``off_limit`` gives the mass still outside the limit's
    support, after the exact ascent and in the stochastic runs.
    """
    predicted = fixed_point(problem, estimator, mode)
    ascent = expected_ascent(problem, estimator, mode, lr=ascent_lr, steps=ascent_steps)[-1]
    runs = stochastic_training(problem, estimator, mode, batch=batch, lr=lr, steps=steps, seeds=seeds)["probs"]
    mean, se = runs.mean(axis=0), runs.std(axis=0, ddof=1) / math.sqrt(len(seeds))
    z = (mean - predicted["probs"]) / np.maximum(se, 1e-12)
    if predicted["status"] != "interior":
        z = np.full_like(z, np.nan)
    support = predicted["probs"] > 0
    return {
        "predicted": predicted["probs"],
        "status": predicted["status"],
        "ascent": ascent,
        "ascent_error": float(np.max(np.abs(ascent - predicted["probs"]))),
        "stochastic": mean,
        "stochastic_se": se,
        "z": z,
        "max_abs_z": float(np.max(np.abs(z))),
        "off_limit": {"ascent": float(ascent[~support].sum()), "stochastic": float(mean[~support].sum())},
    }


def simulation_table(
    problem: FixedPointProblem = REFERENCE_PROBLEM, runs=(("k3", "full"), ("k3", "loss")), **options
) -> pd.DataFrame:
    """:func:`simulation_check` for each (estimator, mode), one row each."""
    rows = []
    for estimator, mode in runs:
        check = simulation_check(problem, estimator, mode, **options)
        rows.append(
            {
                "estimator": get_estimator(estimator).name,
                "mode": mode,
                "status": check["status"],
                "predicted": _fmt(check["predicted"]),
                "expected ascent": _fmt(check["ascent"]),
                "max |ascent - predicted|": check["ascent_error"],
                "stochastic (mean of seeds)": _fmt(check["stochastic"]),
                "max |z|": check["max_abs_z"],
                "mass off the limit (ascent)": check["off_limit"]["ascent"],
                "mass off the limit (stochastic)": check["off_limit"]["stochastic"],
            }
        )
    return pd.DataFrame(rows)


def plot_simplex(trajectories: pd.DataFrame, problem: FixedPointProblem = REFERENCE_PROBLEM, **options):
    """V = 3 trajectories of :func:`trajectory_frame` on the simplex, one panel per estimator, one line per mode.

    The grey dot is p, the star q*; returns the seaborn FacetGrid.
    """
    import seaborn as sns

    grid = sns.relplot(
        data=trajectories,
        x="x",
        y="y",
        hue="mode",
        col="estimator",
        kind="line",
        sort=False,
        **{"col_wrap": 3, "height": 3.2, **options},
    )
    start, star = simplex_xy(problem.p[None]), simplex_xy(optimum(problem)[None])
    for axis in grid.axes.flat:
        axis.plot(*SIMPLEX_CORNERS.T, color="grey", linewidth=1)
        axis.scatter(*start.T, color="grey", zorder=3)
        axis.scatter(*star.T, marker="*", s=160, color="black", zorder=3)
        for token, (x, y), align, offset in zip(
            range(3), SIMPLEX_CORNERS[:3], ("left", "right", "left"), ((0, -10), (0, -10), (8, -6))
        ):
            axis.annotate(
                f"token {token}, R = {problem.reward[token]:g}",
                (x, y),
                xytext=offset,
                textcoords="offset points",
                ha=align,
                fontsize="x-small",
            )
        axis.set_aspect("equal")
        axis.set_axis_off()
    return grid


def plot_training(exact: pd.DataFrame, stochastic: pd.DataFrame, problem: FixedPointProblem = REFERENCE_PROBLEM):
    """KL(q||p) and reward over steps: exact ascent (thick) and stochastic runs per seed (thin); q* dashed.

    ``exact`` from :func:`trajectory_frame`, ``stochastic`` from :func:`stochastic_frame`; returns the figure.
    """
    import matplotlib.pyplot as plt
    import seaborn as sns

    exact = exact.assign(term=exact.estimator + " " + exact["mode"])
    stochastic = stochastic.assign(term=stochastic.estimator + " " + stochastic["mode"])
    order = exact.term.unique()
    star = optimum(problem)
    targets = {
        KL_QP: float(np.sum(star * (np.log(star) - log_softmax(problem.p_logits)))),
        "reward": float(star @ problem.reward),
    }
    figure, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    for axis, (column, target) in zip(axes, targets.items()):
        sns.lineplot(
            data=stochastic,
            x="step",
            y=column,
            hue="term",
            hue_order=order,
            units="seed",
            estimator=None,
            alpha=0.4,
            linewidth=0.8,
            ax=axis,
            legend=False,
        )
        sns.lineplot(data=exact, x="step", y=column, hue="term", hue_order=order, linewidth=2, ax=axis)
        axis.axhline(target, color="black", linestyle="--", linewidth=1, label="q*")
        axis.set_xscale("symlog", linthresh=10)
        axis.set(xlim=(0, None), title=f"{column} over training steps")
        axis.legend(fontsize="small")
    figure.tight_layout()
    return figure


def framework_defaults() -> list:
    """Each framework's default KL setting (:mod:`klsym.rl.frameworks`)."""
    from klsym.rl.frameworks import load_settings

    return [setting for setting in load_settings() if setting.default]


def _setting_term(setting) -> KLTerm:
    """The setting's term evaluated through its per-token expression (:func:`klsym.rl.frameworks.expression_term`):
    clamps and weights act where the framework puts them (NeMo-RL's clamp(w k3) zeroes both parts where it bites)."""
    from klsym.rl.frameworks import expression_term

    return expression_term(setting)


def beta_sweep(betas, settings=None, problem: FixedPointProblem = REFERENCE_PROBLEM) -> pd.DataFrame:
    """End point vs β for framework settings (default: each framework's default), long format.

    Each setting enters with its estimator, mode and clamps; settings sharing all three are computed once.
    """
    settings = framework_defaults() if settings is None else settings
    points, rows = {}, []
    for setting in settings:
        term = _setting_term(setting)
        for beta in betas:
            key = (term, float(beta))
            if key not in points:
                points[key] = fixed_point(problem.with_beta(beta), term, term.mode)
            point = points[key]
            rows.append(
                {
                    "setting": setting.key,
                    "estimator": term.estimator.name,
                    "mode": term.mode,
                    "beta": float(beta),
                    "status": point["status"],
                    KL_QP: point[KL_QP],
                    "reward": point["reward"],
                    "distance_to_optimum": point["distance_to_optimum"],
                    **{f"q[{j}]": v for j, v in enumerate(point["probs"])},
                }
            )
    return pd.DataFrame(rows)


def converges_to_table(settings=None, problem: FixedPointProblem = REFERENCE_PROBLEM) -> pd.DataFrame:
    """The crosswalk's "converges to" column (clamps included); default: every framework setting."""
    if settings is None:
        from klsym.rl.frameworks import load_settings

        settings = load_settings()
    phrases, rows = {}, []
    for setting in settings:
        term = _setting_term(setting)
        if term not in phrases:  # settings sharing estimator, mode and clamps are computed once
            phrases[term] = converges_to(term, term.mode, problem)
        rows.append(
            {
                "setting": setting.key,
                "estimator": term.estimator.name,
                "mode": term.mode,
                "input_clamp": term.input_clamp,
                "output_clamp": term.output_clamp,
                "converges to": phrases[term],
            }
        )
    return pd.DataFrame(rows)


__all__ = [
    "STATUSES",
    "DYNAMICS_TIME",
    "DROPPED_MASS",
    "FixedPointProblem",
    "REFERENCE_PROBLEM",
    "KLTerm",
    "kl_term",
    "optimum",
    "score_expectation",
    "kl_gradient",
    "expected_update",
    "update_jacobian",
    "stationarity_condition",
    "stationary_point",
    "integrate_dynamics",
    "fixed_point",
    "fixed_point_summary",
    "summary_rows",
    "expected_ascent",
    "stochastic_training",
    "converges_to",
    "endpoint_table",
    "trajectory_frame",
    "stochastic_frame",
    "simulation_check",
    "simulation_table",
    "beta_sweep",
    "converges_to_table",
    "framework_defaults",
    "SIMPLEX_CORNERS",
    "simplex_xy",
    "plot_simplex",
    "plot_training",
    "SequenceProblem",
    "REFERENCE_SEQUENCE_PROBLEM",
    "sequence_probs",
    "sequence_optimum",
    "sequence_update",
    "sequence_fixed_point",
    "sequence_table",
]
