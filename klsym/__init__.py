r"""klsym: Monte Carlo estimators of KL divergence, derived, computed exactly and sampled.

One verified chain, one subpackage per role::

    derive  (SymPy)  ->  exact (closed forms, sums, quadrature)  ->  simulate (streaming Monte Carlo)
        -> rl (frameworks, sequences, off-policy, fixed points)  ->  report (comparison tables, HTML)

The names below are the public API; each is imported from its module on first use, so
``import klsym`` stays cheap (SymPy and SciPy load only when a name that needs them is used).

>>> import klsym
>>> klsym.get_estimator("k3").expr
r - log(r) - 1
>>> round(klsym.kl_divergences(klsym.Gaussian(0, 1), klsym.Gaussian(1, 1))["KL(q||p)"], 12)
0.5
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

#: public name -> module that defines it
_API = {
    # derive: estimators, divergences, symbolic analysis
    "Estimator": "klsym.derive.estimators",
    "get_estimator": "klsym.derive.estimators",
    "get_estimators": "klsym.derive.estimators",
    "from_formula": "klsym.derive.estimators",
    "bregman": "klsym.derive.estimators",
    "control_variate": "klsym.derive.estimators",
    "gradient_weights": "klsym.derive.estimators",
    "MODES": "klsym.derive.estimators",
    "BUILTINS": "klsym.derive.estimators",
    "get_divergence": "klsym.derive.divergences",
    "analyze": "klsym.derive.symbolic",
    "implied_gradient_divergence": "klsym.derive.symbolic",
    # exact: families and reference numbers
    "Gaussian": "klsym.exact.families",
    "Categorical": "klsym.exact.families",
    "KL_QP": "klsym.exact.expectations",
    "KL_PQ": "klsym.exact.expectations",
    "kl_divergences": "klsym.exact.expectations",
    "estimator_stats": "klsym.exact.expectations",
    "estimator_gradient": "klsym.exact.expectations",
    "true_gradients": "klsym.exact.expectations",
    "exact_summary": "klsym.exact.expectations",
    "gradient_summary": "klsym.exact.expectations",
    # simulate: the streaming Monte Carlo engine
    "monte_carlo": ("klsym.simulate.montecarlo", "run"),
    "mc_gradient": ("klsym.simulate.montecarlo", "gradient"),
    "gradient_trials": "klsym.simulate.montecarlo",
    "crosscheck": "klsym.simulate.montecarlo",
    "sweep": "klsym.simulate.sweep",
    # exact + rl: autoregressive sequences
    "Autoregressive": "klsym.exact.autoregressive",
    "sequence_summary": "klsym.rl.sequences",
    "placement_gradients": "klsym.rl.sequences",
    # rl: off-policy samples, where training ends up, frameworks
    "offpolicy_gradient": "klsym.rl.offpolicy",
    "offpolicy_summary": "klsym.rl.offpolicy",
    "FixedPointProblem": "klsym.rl.fixedpoint",
    "fixed_point": "klsym.rl.fixedpoint",
    "fixed_point_summary": "klsym.rl.fixedpoint",
    "converges_to": "klsym.rl.fixedpoint",
    "crosswalk_table": "klsym.rl.frameworks",
    "get_setting": "klsym.rl.frameworks",
    "load_settings": "klsym.rl.frameworks",
    # report: comparison tables, recorded findings, closed forms to cite
    "compare": "klsym.report.compare",
    "record": "klsym.report.findings",
    "closed_forms": "klsym.derive.closed_forms",
}


def __getattr__(name: str):
    try:
        target = _API[name]
    except KeyError:
        raise AttributeError(f"module 'klsym' has no attribute {name!r}") from None
    module, attribute = target if isinstance(target, tuple) else (target, name)
    value = getattr(importlib.import_module(module), attribute)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_API])


__all__ = ["__version__", *_API]
