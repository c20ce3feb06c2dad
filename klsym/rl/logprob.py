r"""Estimators from log-probabilities, for any array library (NumPy, CuPy, PyTorch, ...).

Frameworks hold per-token log-probabilities ``log_q`` (the sampling policy :math:`\pi`) and
``log_p`` (the reference :math:`\pi_\text{ref}`). These functions compute :math:`t = \log p - \log q`
and each estimator's value :math:`k(e^t)` with the stable forms of
:meth:`klsym.derive.estimators.Estimator.numeric` (``expm1``/``log1p``, Taylor branch for tiny
:math:`|t|`): the SymPy expression is the one formula, walked here into calls of the array's own
namespace (found by :func:`array_namespace`), so nothing is re-typed and torch is only touched
when a torch tensor is given.

Optional clamps as in the frameworks (input: t to ``[-a, a]``; output: k to ``[-c, c]``) and the
straight-through trick (value of the base estimator, gradient of its surrogate, e.g. verl's
``k3+``): for autograd tensors ``s - stop(s) + stop(v)``; for other arrays the value.

>>> import numpy as np
>>> log_q = np.log(np.array([0.5, 0.25, 0.25]))
>>> log_p = np.log(np.array([0.25, 0.5, 0.25]))
>>> estimate("k3", log_p, log_q).round(6)
array([0.193147, 0.306853, 0.      ])
>>> float(estimate("k3", np.array(-5.0), np.array(-15.0)))   # NeMo-RL's anchor: e^10 - 11
22015.465794806718
"""

from __future__ import annotations

import operator
from functools import lru_cache

import numpy as np
import sympy as sp
from array_api_compat import array_namespace
from sympy.codegen.cfunctions import expm1, log1p

from klsym.derive.estimators import Estimator, get_estimator, get_estimators, make_numeric
from klsym.derive.symbols import t as _t

_RELATIONS = {
    sp.StrictLessThan: operator.lt,
    sp.LessThan: operator.le,
    sp.StrictGreaterThan: operator.gt,
    sp.GreaterThan: operator.ge,
}
_FUNCTIONS = {sp.exp: "exp", sp.log: "log", expm1: "expm1", log1p: "log1p", sp.Abs: "abs", sp.sign: "sign"}


def _compile(expr: sp.Expr):
    """Turn a SymPy expression in ``t`` into ``f(xp, t)`` calling only namespace functions."""
    if expr == _t:
        return lambda xp, t: t
    if expr.is_Number:
        value = float(expr)
        return lambda xp, t: value
    if isinstance(expr, (sp.Add, sp.Mul)):
        parts = [_compile(a) for a in expr.args]
        combine = operator.add if isinstance(expr, sp.Add) else operator.mul

        def nary(xp, t):
            out = parts[0](xp, t)
            for part in parts[1:]:
                out = combine(out, part(xp, t))
            return out

        return nary
    if isinstance(expr, sp.Pow):
        base, exponent = _compile(expr.base), expr.exp
        if exponent.is_Integer:
            n = int(exponent)
            return lambda xp, t: base(xp, t) ** n
        power = _compile(exponent)
        return lambda xp, t: base(xp, t) ** power(xp, t)
    for function, name in _FUNCTIONS.items():
        if isinstance(expr, function):
            argument = _compile(expr.args[0])
            return lambda xp, t: getattr(xp, name)(argument(xp, t))
    if type(expr) in _RELATIONS:
        compare, lhs, rhs = _RELATIONS[type(expr)], _compile(expr.lhs), _compile(expr.rhs)
        return lambda xp, t: compare(lhs(xp, t), rhs(xp, t))
    if isinstance(expr, sp.Piecewise):
        pieces = [(_compile(value), None if cond == sp.true else _compile(cond)) for value, cond in expr.args]

        def piecewise(xp, t):
            out = pieces[-1][0](xp, t) + xp.zeros_like(t)
            for value, cond in reversed(pieces[:-1]):
                out = xp.where(cond(xp, t), value(xp, t) + xp.zeros_like(t), out)
            return out

        return piecewise
    raise ValueError(f"cannot evaluate {type(expr).__name__} ({expr}) on arrays")


@lru_cache(maxsize=256)
def _compiled(expr: sp.Expr, stable: sp.Expr | None, variable_is_t: bool):
    # make_numeric builds the stable body (expm1/log1p + Taylor branch); reuse it verbatim.
    body = make_numeric(expr, stable, variable_is_t=variable_is_t).expression
    return _compile(body)


def _value_function(estimator: Estimator):
    return _compiled(estimator.expr, estimator.stable_expr, False)


def _surrogate_function(estimator: Estimator):
    return _compiled(estimator.surrogate, None, False)


def log_ratio(log_p, log_q, *, input_clamp: float | None = None, dtype=None):
    r""":math:`t = \log p - \log q`, optionally computed in ``dtype`` and clamped to ``[-a, a]``.

    ``dtype`` (e.g. ``np.float32``, ``torch.float32``) casts both inputs first: computing t from
    bfloat16 log-probs in bfloat16 loses the digits that make t small (see
    :mod:`klsym.exact.precision`).

    >>> log_ratio(np.array([-1.0, -30.0]), np.array([-2.0, -1.0]), input_clamp=20)
    array([  1., -20.])
    """
    xp = array_namespace(log_p, log_q)
    if dtype is not None:
        log_p, log_q = xp.astype(log_p, dtype), xp.astype(log_q, dtype)
    t = log_p - log_q
    if input_clamp is not None:
        t = xp.clip(t, -float(input_clamp), float(input_clamp))
    return t


def _is_autograd(x) -> bool:
    return hasattr(x, "detach") and hasattr(x, "requires_grad")


def _stop_gradient(x):
    return x.detach() if _is_autograd(x) else x


def estimate_from_logratio(
    estimator: Estimator | str,
    t,
    *,
    input_clamp: float | None = None,
    output_clamp: float | None = None,
    straight_through: bool = True,
):
    r"""Per-token values :math:`k(e^t)` of ``estimator`` from log-ratios ``t`` (any array API).

    Parameters
    ----------
    estimator : Estimator or str
        A klsym estimator (``"k3"``, ``"low_var_kl"``, ``"k3+"``, ...).
    t : array
        :math:`\log r = \log p - \log q`.
    input_clamp, output_clamp : float, optional
        Clamp t to ``[-a, a]`` before, and k to ``[-c, c]`` after evaluating.
    straight_through : bool
        For straight-through estimators on autograd tensors, return
        ``s - stop(s) + stop(v)`` (value v, gradient of the surrogate s computed from the
        unclamped t, as verl does). Ignored for other estimators and for arrays without autograd.

    Examples
    --------
    >>> estimate_from_logratio("k3", np.array([1e-12, 700.0])).tolist()
    [5.000000000001666e-25, 1.0142320547350045e+304]
    >>> estimate_from_logratio("k3", np.array([3.0, -30.0]), input_clamp=20, output_clamp=10)
    array([10., 10.])
    """
    estimator = get_estimator(estimator)
    xp = array_namespace(t)
    inner = t if input_clamp is None else xp.clip(t, -float(input_clamp), float(input_clamp))
    with np.errstate(over="ignore", invalid="ignore"):  # the unused Piecewise branch may overflow
        value = _value_function(estimator)(xp, inner)
    if output_clamp is not None:
        value = xp.clip(value, -float(output_clamp), float(output_clamp))
    if estimator.straight_through and straight_through and _is_autograd(t):
        with np.errstate(over="ignore", invalid="ignore"):
            surrogate = _surrogate_function(estimator)(xp, t)
        value = surrogate - _stop_gradient(surrogate) + _stop_gradient(value)
    return value


def estimate(
    estimator: Estimator | str,
    log_p,
    log_q,
    *,
    input_clamp: float | None = None,
    output_clamp: float | None = None,
    straight_through: bool = True,
    dtype=None,
):
    r"""Per-token values of ``estimator`` from reference log-probs ``log_p`` and sampler log-probs
    ``log_q`` (note the order: p is the reference, q the policy that sampled the tokens).

    See :func:`estimate_from_logratio` for the options; ``dtype`` is passed to :func:`log_ratio`.

    >>> estimate("k1", np.array([-2.0]), np.array([-1.0]))   # -log r = log q - log p
    array([1.])
    """
    t = log_ratio(log_p, log_q, dtype=dtype)
    return estimate_from_logratio(
        estimator, t, input_clamp=input_clamp, output_clamp=output_clamp, straight_through=straight_through
    )


def estimate_all(log_p, log_q, estimators="k1,k2,k3", **options) -> dict:
    """:func:`estimate` for several estimators: ``{name: values}``.

    >>> {k: v.round(4).tolist() for k, v in estimate_all(np.array([-2.0]), np.array([-1.0])).items()}
    {'k1': [1.0], 'k2': [0.5], 'k3': [0.3679]}
    """
    dtype = options.pop("dtype", None)
    t = log_ratio(log_p, log_q, dtype=dtype)
    return {e.name: estimate_from_logratio(e, t, **options) for e in get_estimators(estimators)}


__all__ = ["log_ratio", "estimate", "estimate_from_logratio", "estimate_all"]
