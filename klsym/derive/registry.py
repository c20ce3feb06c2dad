"""Names of the built-in estimators, their aliases, targets and sources: resolvable without SymPy.

The SymPy expressions live in :mod:`klsym.derive.estimators`, which builds its ``BUILTINS`` from this table;
the exact layer (:mod:`klsym.exact.plans`) looks names up here, so ``klsym exact`` on built-ins answers from
cached derivations without importing SymPy.

>>> canonical_name("low_var_kl"), BUILTIN_INFO["k3"].target
('k3', 'KL(q||p)')
>>> canonical_name("k5")
Traceback (most recent call last):
...
klsym.derive.registry.UnknownEstimatorError: unknown estimator 'k5'; built-ins: k1, k2, k3, k4, rev_k1, rev_k2, rev_k3, k1+, k3+; aliases: kl, mse, low_var_kl, low_var_kl+, reverse_k1, reverse_k2
"""

from __future__ import annotations

from typing import NamedTuple


class UnknownEstimatorError(KeyError):
    """An estimator name that is neither built in nor an alias."""

    def __str__(self) -> str:  # KeyError quotes its message; print it plainly
        return str(self.args[0])


class BuiltinInfo(NamedTuple):
    target: str
    source: str


_SCHULMAN = "Schulman (2020), Approximating KL Divergence (seeds 001, 002)"
_YANG = "Yang (2025), Gradient Estimation of KL Divergence in LLM RL (seed 003)"
_VERL = "verl core_algos.kl_penalty: value of the base estimator, gradient of k2 (straight-through)"

#: Built-in estimators in display order: the divergence each is meant to estimate, and where it comes from.
BUILTIN_INFO: dict[str, BuiltinInfo] = {
    "k1": BuiltinInfo("KL(q||p)", _SCHULMAN),
    "k2": BuiltinInfo("KL(q||p)", _SCHULMAN),
    "k3": BuiltinInfo("KL(q||p)", _SCHULMAN),
    "k4": BuiltinInfo("KL(q||p)", "Zhang (2025), Yet another new KL estimator (seed 000)"),
    "rev_k1": BuiltinInfo("KL(p||q)", _YANG + ", reverse_k1"),
    "rev_k2": BuiltinInfo("KL(p||q)", _YANG + ", reverse_k2 (for gradients of KL(p||q))"),
    "rev_k3": BuiltinInfo("KL(p||q)", _SCHULMAN + ", reverse estimator"),
    "k1+": BuiltinInfo("KL(q||p)", _VERL),
    "k3+": BuiltinInfo("KL(q||p)", _VERL),
}

#: Names RL frameworks use for the built-ins (verl ``kl_penalty``; Yang's code).
ALIASES: dict[str, str] = {
    "kl": "k1",  # verl, ROLL
    "mse": "k2",  # verl, ROLL
    "low_var_kl": "k3",  # verl, slime
    "low_var_kl+": "k3+",  # verl straight-through
    "reverse_k1": "rev_k1",  # Yang (2025)
    "reverse_k2": "rev_k2",  # Yang (2025)
}


def canonical_name(name: str) -> str:
    """The built-in name of ``name`` (itself or the estimator it is an alias of); one clear error otherwise."""
    key = ALIASES.get(name, name)
    if key in BUILTIN_INFO:
        return key
    raise UnknownEstimatorError(
        f"unknown estimator {name!r}; built-ins: {', '.join(BUILTIN_INFO)}; aliases: {', '.join(ALIASES)}"
    )


def split_names(names) -> list[str]:
    """A comma-separated string (or a list) of names, stripped, empty entries dropped."""
    if isinstance(names, str):
        return [n.strip() for n in names.split(",") if n.strip()]
    return list(names)


__all__ = ["UnknownEstimatorError", "BuiltinInfo", "BUILTIN_INFO", "ALIASES", "canonical_name", "split_names"]
