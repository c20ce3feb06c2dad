r"""A framework's per-token KL term as the expression it writes, and everything derived from it.

A setting is one expression in three per-token log-probabilities of the sampled token: ``logq``
(the policy :math:`\log\pi_\theta`, differentiable), ``logp`` (the reference, detached) and ``logb``
(the behaviour policy that drew the token: the old policy, the rollout engine; detached). The
operations are those the frameworks use, in the order they apply them:

============================  ======================================================================
``sg(x)``                     stop-gradient (``x.detach()``): value x, derivative 0
``clamp(x, lo, hi)``          ``torch.clamp``: derivative 1 on the open interval (lo, hi), 0 outside
``inside(x, lo, hi)``         the detached indicator of ``lo <= x <= hi`` (a ``torch.where`` condition)
``exp log expm1 abs``         elementwise functions
``max(x, y)``, ``min(x, y)``  elementwise maximum/minimum (PPO's clipped objective)
============================  ======================================================================

``enters="loss"``: the expression is a per-token loss, differentiated through ``logq``.
``enters="reward"``: it is a per-token reward (a cost, subtracted from the reward), so the gradient
is the score-function one; its surrogate loss is ``sg(k) * logq``. Either way one token's gradient
is :math:`c(x)\,\nabla_\theta \log q_\theta(x)` with :math:`c = \partial L/\partial \log q`, and

.. math:: \mathbb{E}_{x\sim b}[\nabla L] = \mathbb{E}_{x\sim b}\bigl[c(x)\, \nabla_\theta \log q_\theta(x)\bigr].

On-policy (``logb = logq``, ``sg(logq) = logq``) the value and :math:`c` are functions of
:math:`t = \log p - \log q` alone: the estimator :math:`k(e^t)` and the mode coefficient
:math:`h(r)` of :func:`klsym.derive.symbolic.mode_coefficient`, from which the mode (loss, reward,
full), the implied divergences and the clamp region follow.

>>> e = parse_expression("clamp(exp(logp - logq) - 1 - (logp - logq), -10, 10)")
>>> on_policy(e)["value"]
clamp(-t + exp(t) - 1, -10, 10)
>>> on_policy(e)["coefficient"]           # 1 - r where the clamp is open, 0 where it bites
(1 - exp(t))*Piecewise((1, (t - exp(t) > -11) & (t - exp(t) < 9)), (0, True))
>>> parse_expression("__import__('os')")
Traceback (most recent call last):
...
klsym.rl.expressions.ExpressionError: malformed expression "__import__('os')": function '__import__' is not allowed (allowed: abs, clamp, exp, expm1, inside, log, max, min, sg)
"""

from __future__ import annotations

import math
from functools import cache

import numpy as np
import sympy as sp
from scipy.optimize import brentq
from sympy.codegen.cfunctions import expm1

from klsym.derive.formula import Grammar
from klsym.derive.symbols import r, t

logq, logp, logb = sp.symbols("logq logp logb", real=True)
#: Stand-in for ``logq`` inside stop-gradients when the detached values are held at theta_0.
logq0 = sp.Symbol("logq0", real=True)
ENTERS = ("loss", "reward")
MAX_LENGTH = 1000


class ExpressionError(ValueError):
    """A framework expression that is not a whitelisted expression in logq, logp, logb."""


class sg(sp.Function):
    r"""Stop-gradient: value :math:`x`, derivative 0 (``x.detach()``)."""

    nargs = 1

    @classmethod
    def eval(cls, x):
        if x.is_number or isinstance(x, sg):
            return x

    def fdiff(self, argindex=1):
        return sp.S.Zero


class clamp(sp.Function):
    r"""``torch.clamp(x, lo, hi)``; its derivative in x is the indicator of the open interval."""

    nargs = 3

    @classmethod
    def eval(cls, x, lo, hi):
        if x.is_number and lo.is_number and hi.is_number:
            return sp.Min(sp.Max(x, lo), hi)

    def fdiff(self, argindex=1):
        x, lo, hi = self.args
        if argindex == 1:
            return sp.Piecewise((1, sp.And(x > lo, x < hi)), (0, True))
        return sp.S.Zero  # bounds are numbers (checked by the parser)


class inside(sp.Function):
    r"""Detached indicator of :math:`lo \le x \le hi` (``torch.where``'s condition): derivative 0."""

    nargs = 3

    @classmethod
    def eval(cls, x, lo, hi):
        if x.is_number and lo.is_number and hi.is_number:
            return sp.S.One if bool(lo <= x <= hi) else sp.S.Zero

    def fdiff(self, argindex=1):
        return sp.S.Zero


_FUNCTIONS = {
    "sg": (sg, 1),
    "clamp": (clamp, 3),
    "inside": (inside, 3),
    "exp": (sp.exp, 1),
    "log": (sp.log, 1),
    "expm1": (expm1, 1),
    "abs": (sp.Abs, 1),
    "max": (sp.Max, 2),
    "min": (sp.Min, 2),
}
_NAMES = {"logq": logq, "logp": logp, "logb": logb}


def _check_bounds(name: str, args) -> None:
    if name in ("clamp", "inside") and not all(a.is_number for a in args[1:]):
        raise ExpressionError(f"the bounds of {name} must be numbers")


#: The grammar of framework expressions: logq, logp, logb and the functions above (numbers of any size).
GRAMMAR = Grammar(
    _NAMES,
    _FUNCTIONS,
    ExpressionError,
    "expression",
    max_length=MAX_LENGTH,
    max_number=None,
    max_depth=60,
    check_call=_check_bounds,
)


def parse_expression(text: str) -> sp.Expr:
    r"""The SymPy expression of a framework's per-token term, parsed from a whitelist (never ``eval``).

    >>> parse_expression("exp(logq - sg(logq)) * (logq - logp)")
    (-logp + logq)*exp(logq - sg(logq))
    >>> parse_expression("clamp(logq, logp, 1)")
    Traceback (most recent call last):
    ...
    klsym.rl.expressions.ExpressionError: malformed expression 'clamp(logq, logp, 1)': the bounds of clamp must be numbers
    """
    return GRAMMAR.parse(text)


# --- derivatives and numeric forms -------------------------------------------------------------


def surrogate(expr: sp.Expr, enters: str) -> sp.Expr:
    """The per-token loss whose gradient the framework takes: the expression, or ``sg(k) * logq``."""
    if enters not in ENTERS:
        raise ValueError(f"enters must be one of {', '.join(ENTERS)}, got {enters!r}")
    return expr if enters == "loss" else sg(expr) * logq


@cache
def coefficient(expr: sp.Expr, enters: str = "loss") -> sp.Expr:
    r""":math:`c = \partial L / \partial \log q` with ``sg' = 0`` and ``clamp'`` = indicator.

    >>> coefficient(parse_expression("exp(logq - sg(logq)) * (logq - logp)"))
    (-logp + logq)*exp(logq - sg(logq)) + exp(logq - sg(logq))
    """
    return sp.diff(surrogate(expr, enters), logq)


def _detached_at_theta0(expr: sp.Expr) -> sp.Expr:
    """Replace ``sg(e)`` by ``e`` evaluated at ``logq0`` (detached values held at theta_0)."""
    return expr.replace(sg, lambda arg: arg.subs(logq, logq0))


def _numpy_inside(x, lo, hi):
    return ((x >= lo) & (x <= hi)).astype(np.result_type(x, np.float64))


_MODULES = [{"clamp": np.clip, "inside": _numpy_inside, "expm1": np.expm1, "Heaviside": np.heaviside}, "numpy"]


@cache
def numeric(expr: sp.Expr):
    r"""Vectorised ``f(logq, logp, logb, logq0)``; every ``sg(e)`` is e at ``logq0`` (default: logq).

    >>> f = numeric(parse_expression("exp(logq - sg(logq))"))
    >>> float(f(np.array(-1.0), 0.0, 0.0)), float(f(np.array(-1.0), 0.0, 0.0, np.array(-1.5)))
    (1.0, 1.6487212707001282)
    """
    body = sp.lambdify((logq, logp, logb, logq0), _detached_at_theta0(expr), modules=_MODULES)

    def evaluate(lq, lp, lb, lq0=None):
        lq = np.asarray(lq)
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            out = body(lq, lp, lb, lq if lq0 is None else lq0)
        return np.broadcast_to(out, np.broadcast_shapes(np.shape(lq), np.shape(lp), np.shape(lb))).astype(
            np.result_type(lq, np.float64)
        )

    return evaluate


# --- on-policy views: functions of t ----------------------------------------------------------------


def _on_policy(expr: sp.Expr) -> sp.Expr:
    on = expr.subs(logb, logq).replace(sg, lambda arg: arg).subs(logp, logq + t)
    on = sp.expand_log(on, force=True)
    if logq in on.free_symbols:
        on = sp.simplify(on)
    if on.free_symbols - {t}:
        raise ExpressionError(f"on-policy the expression {expr} is not a function of t = logp - logq alone")
    return on


def unclamped(expr: sp.Expr) -> sp.Expr:
    """The same expression with every clamp removed and every ``inside`` true."""
    return expr.replace(clamp, lambda x, lo, hi: x).replace(inside, lambda x, lo, hi: sp.S.One)


@cache
def on_policy(expr: sp.Expr, enters: str = "loss") -> dict:
    r"""Value :math:`k(t)` and coefficient :math:`h(t)` on-policy, with and without clamps.

    >>> on_policy(parse_expression("(logq - logp)**2/2 - sg((logq - logp)**2/2) + sg(logq - logp)"))["coefficient"]
    -t
    """
    bare = unclamped(expr)
    return {
        "value": _on_policy(expr),
        "coefficient": _on_policy(coefficient(expr, enters)),
        "value_unclamped": _on_policy(bare),
        "coefficient_unclamped": _on_policy(coefficient(bare, enters)),
    }


_PROBES = (-2.3, -0.4, 0.6, 1.7)


def same_function_of_t(a: sp.Expr, b: sp.Expr) -> bool:
    """Exact equality of two expressions in t: ``sympy.simplify`` of the difference is 0.

    Probe points reject most unequal pairs before SymPy runs (simplify takes a while).
    """
    difference = sp.expand(a - b).replace(expm1, lambda arg: sp.exp(arg) - 1)
    f = sp.lambdify(t, difference, modules=_MODULES)
    with np.errstate(all="ignore"):
        values = np.asarray(f(np.array(_PROBES)), dtype=float)
    if not np.all(np.abs(values) < 1e-9):
        return False
    return sp.simplify(difference) == 0


# --- clamp region -------------------------------------------------------------------------------

T_MAX = 700.0
_GRID = 40001


def clamp_nodes(expr: sp.Expr) -> list[sp.Expr]:
    """Every ``clamp``/``inside`` node of the expression (deduplicated, in order)."""
    return list(dict.fromkeys(node for node in sp.preorder_traversal(expr) if isinstance(node, (clamp, inside))))


def _active_region_edges(argument_t: sp.Expr, lo: float, hi: float) -> list[float]:
    f = sp.lambdify(t, argument_t, modules=_MODULES)
    grid = np.linspace(-T_MAX, T_MAX, _GRID)
    with np.errstate(over="ignore", invalid="ignore"):
        values = np.broadcast_to(np.asarray(f(grid), dtype=float), grid.shape)
    edges = []
    for level in (lo, hi):
        shifted = values - level
        for i in np.flatnonzero(np.sign(shifted[:-1]) * np.sign(shifted[1:]) < 0):
            edges.append(
                brentq(
                    lambda s, level=level: float(f(np.array(s))) - level,
                    grid[i],
                    grid[i + 1],
                    xtol=1e-15,
                    rtol=4 * np.finfo(float).eps,
                )
            )
    return edges


def clamp_region(expr: sp.Expr) -> list[tuple[float, float]]:
    r"""On-policy t-intervals where some clamp of the expression is active (``inside`` false counts).

    >>> region = clamp_region(parse_expression(
    ...     "clamp(exp(clamp(logp - logq, -20, 20)) - clamp(logp - logq, -20, 20) - 1, -10, 10)"))
    >>> [(round(lo, 6), round(hi, 6)) for lo, hi in region]
    [(-inf, -10.999983), (2.610869, inf)]
    """
    nodes = clamp_nodes(expr)
    if not nodes:
        return []
    arguments = [
        (_on_policy(node.args[0]), float(node.args[1]), float(node.args[2]), isinstance(node, inside)) for node in nodes
    ]
    edges = sorted({e for argument, lo, hi, _ in arguments for e in _active_region_edges(argument, lo, hi)})
    points = [-math.inf, *edges, math.inf]

    def active(s: float) -> bool:
        for argument, lo, hi, closed in arguments:
            value = float(argument.subs(t, s)) if argument.free_symbols else float(argument)
            if (closed and not lo <= value <= hi) or (not closed and not lo < value < hi):
                return True
        return False

    region = []
    for a, b in zip(points[:-1], points[1:]):
        middle = (
            (a + b) / 2
            if math.isfinite(a) and math.isfinite(b)
            else ((b - 1.0) if math.isfinite(b) else (a + 1.0) if math.isfinite(a) else 0.0)
        )
        if active(middle):
            if region and region[-1][1] == a:
                region[-1] = (region[-1][0], b)
            else:
                region.append((a, b))
    return region


# --- derived views: estimator, mode, clamps, weights ----------------------------------------------


def _as_ratio(expr_t: sp.Expr) -> sp.Expr:
    return sp.expand(sp.expand_log(expr_t.subs(t, sp.log(r)), force=True))


@cache
def identify(expr: sp.Expr, enters: str = "loss") -> dict:
    r"""The klsym estimator and gradient mode the expression is, on-policy and without clamps.

    The first built-in (then a custom estimator :math:`k(r)`) whose value is the unclamped on-policy value
    and whose :func:`~klsym.derive.symbolic.mode_coefficient` in some mode is the unclamped coefficient.
    ``mode`` is None where no mode matches.

    >>> found = identify(parse_expression("exp(logq - sg(logq)) * (exp(logp - logq) - 1 - (logp - logq))"))
    >>> found["estimator"].name, found["mode"]
    ('k3', 'full')
    >>> identify(parse_expression("abs(logb - logp)"), "reward")["estimator"].name
    'Abs(log(r))'
    """
    from klsym.derive.estimators import BUILTINS, Estimator, in_logratio
    from klsym.derive.symbolic import mode_coefficient

    on = on_policy(expr, enters)
    value, coefficient_t = on["value_unclamped"], on["coefficient_unclamped"]
    candidates = [e for e in BUILTINS.values() if same_function_of_t(in_logratio(e.expr), value)]
    if not candidates:
        value_r = _as_ratio(value.replace(expm1, lambda arg: sp.exp(arg) - 1))
        candidates = [Estimator(sp.sstr(value_r), value_r, None, "framework expression")]
    # k3 in full mode and k3+ in loss mode have the same coefficient (-t): a weight in the expression says full
    # and k1 as a reward has k1+'s loss coefficient: the expression's structure decides
    if enters == "reward":
        modes = ("reward",)
    else:
        modes = ("full", "loss", "reward") if weights(expr) else ("loss", "reward", "full")
    if not expr.has(sg):
        candidates = [e for e in candidates if not e.straight_through] or candidates
    for mode in modes:
        for estimator in candidates:
            if same_function_of_t(in_logratio(mode_coefficient(estimator, mode)), coefficient_t):
                return {"estimator": estimator, "mode": mode}
    return {"estimator": candidates[0], "mode": None}


def clamps(expr: sp.Expr) -> dict:
    r"""Output clamp c (the outermost operation is ``clamp(., -c, c)``) and input clamp a (any other
    clamp or ``inside`` of :math:`\pm t` on :math:`[-a, a]`).

    >>> clamps(parse_expression("clamp(expm1(-clamp(logq - logp, -40, 40)) + clamp(logq - logp, -40, 40), -10, 10)"))
    {'input_clamp': 40.0, 'output_clamp': 10.0}
    """
    found = {"input_clamp": None, "output_clamp": None}
    for node in clamp_nodes(expr):
        argument, lo, hi = _on_policy(node.args[0]), float(node.args[1]), float(node.args[2])
        if node is expr or node == expr:
            key = "output_clamp"
        elif argument - t == 0 or argument + t == 0:
            key = "input_clamp"
        else:
            key = "output_clamp"
        if lo == -hi:
            found[key] = hi if found[key] is None else min(found[key], hi)
    return found


def weights(expr: sp.Expr) -> list[dict]:
    r"""The importance weights :math:`e^{\log q - \cdot}` in the expression (1 on-policy).

    >>> weights(parse_expression("exp(logq - logb) * (logq - logp)"))
    [{'weight': 'exp(-logb + logq)', 'differentiable': True, 'uses_behaviour': True}]
    """
    found = []
    for node in sp.preorder_traversal(expr):
        if isinstance(node, sp.exp) and node.args[0].has(logq) and not node.args[0].has(logp):
            if _on_policy(node.args[0]) == 0 and not isinstance(node, sg):
                found.append(
                    {
                        "weight": sp.sstr(node),
                        "differentiable": sp.diff(node, logq) != 0,
                        "uses_behaviour": node.has(logb),
                    }
                )
    return list({w["weight"]: w for w in found}.values())


def offpolicy_weighting(expr: sp.Expr, enters: str) -> str:
    """Which off-policy weighting (klsym.rl.offpolicy names) the expression implements for tokens from b."""
    if enters == "reward":
        return "reward (of b where it reads logb): weighted by the policy loss's ratio q/b"
    live = [w for w in weights(expr) if w["uses_behaviour"]]
    if not live:
        return "none"
    kind = "token-is-differentiable" if any(w["differentiable"] for w in live) else "token-is"
    outer = expr if not isinstance(expr, clamp) else None
    return kind if outer is not None else kind + " (output clamp after the weight)"


def clamp_effect(expr: sp.Expr, enters: str = "loss") -> str:
    """What the clamps do to one token's gradient coefficient inside the clamp region (probed on-policy)."""
    region = clamp_region(expr)
    if not region:
        return "no clamp"
    on = on_policy(expr, enters)
    h = sp.lambdify(t, on["coefficient"], modules=_MODULES)
    h0 = sp.lambdify(t, on["coefficient_unclamped"], modules=_MODULES)
    k = sp.lambdify(t, on["value"], modules=_MODULES)
    probes = np.array([_probe(lo, hi) for lo, hi in region])
    with np.errstate(over="ignore", invalid="ignore"):
        hv, h0v, kv = (np.broadcast_to(np.asarray(f(probes), float), probes.shape) for f in (h, h0, k))
    if np.all(hv == 0):
        return "value frozen and gradient zero in the region (no part of the token's gradient survives)"
    if np.allclose(hv, h0v, rtol=1e-12):
        return "value frozen in the region; the gradient is unclamped there (straight-through)"
    if enters == "reward" and np.allclose(hv, kv, rtol=1e-12):
        return "reward saturates at the clamp in the region (score-function gradient with a capped reward)"
    if np.allclose(hv, kv, rtol=1e-12):
        return "pathwise part zero in the region; the score part keeps the capped value"
    return "gradient coefficient changed in the region: " + sp.sstr(on["coefficient"])


def _probe(lo: float, hi: float) -> float:
    if math.isfinite(lo) and math.isfinite(hi):
        return (lo + hi) / 2
    return hi - 1.0 if math.isfinite(hi) else lo + 1.0 if math.isfinite(lo) else 0.0


__all__ = [
    "logq",
    "logp",
    "logb",
    "logq0",
    "ENTERS",
    "ExpressionError",
    "sg",
    "clamp",
    "inside",
    "parse_expression",
    "surrogate",
    "coefficient",
    "numeric",
    "on_policy",
    "unclamped",
    "same_function_of_t",
    "clamp_nodes",
    "clamp_region",
    "T_MAX",
    "identify",
    "clamps",
    "weights",
    "offpolicy_weighting",
    "clamp_effect",
]
