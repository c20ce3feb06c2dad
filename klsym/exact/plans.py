r"""What SymPy derives for the exact layer, kept as data: one *plan* per estimator, in the disk cache.

A plan holds, for an estimator k with surrogate s (``loss`` mode), everything :mod:`klsym.exact.expectations`
evaluates, each part derived by SymPy once and stored as JSON (:mod:`klsym.derive.diskcache`):

* ``numeric``: generated NumPy code of :math:`t \mapsto k(e^t)` and :math:`t \mapsto \frac{d}{dt} s(e^t)`
  (:func:`klsym.derive.estimators.numeric_code`: the stable forms, Taylor branch near t = 0);
* ``gaussian``: the decompositions :math:`\sum c\, r^a t^n` of k, :math:`k^2` and s with the generated mpmath
  code of each term (:mod:`klsym.derive.gaussian_closed_form`, run by :mod:`klsym.exact.closed_form`) and the
  existence conditions of :math:`\mathbb{E}_q[k]`, :math:`\mathbb{E}_q[k^2]`;
* ``limits``: k and :math:`dk_{sur}/dt` as :math:`t \to -\infty` (tokens with p(x) = 0);
* ``mpmath``: generated mpmath code of k and :math:`dk_{sur}/dt` (exact sums over categorical supports).

A built-in's plan is keyed by its name, the klsym version, SymPy's release and the source of the deriving
modules, so reading it needs neither SymPy nor the :class:`~klsym.derive.estimators.Estimator`: a warm
``klsym exact`` on built-ins never imports SymPy. Any other estimator (a user's formula) is keyed by its
expressions (it was parsed by SymPy anyway). A changed formula or deriving module gives a new key: derived afresh.

>>> plan = plan_of("low_var_kl")
>>> plan.name, plan.target, [(t.coefficient(), t.a, t.n) for t in plan.terms["value"]]
('k3', 'KL(q||p)', [(mpf('-1.0'), Fraction(0, 1), 0), (mpf('-1.0'), Fraction(0, 1), 1), (mpf('1.0'), Fraction(1, 1), 0)])
"""

from __future__ import annotations

from functools import cache, cached_property

import numpy as np

from klsym.derive.generated import compile_code, logratio_function
from klsym.derive.registry import BUILTIN_INFO, canonical_name
from klsym.exact.closed_form import terms_from_data
from klsym.paths import PACKAGE_DIR

#: The modules whose source the derivations depend on (a built-in plan's key holds their digests).
DERIVING_SOURCES = tuple(
    str(PACKAGE_DIR / path)
    for path in (
        "derive/registry.py",
        "derive/estimators.py",
        "derive/symbols.py",
        "derive/gaussian_closed_form.py",
        "derive/generated.py",
        "exact/plans.py",
    )
)
#: Decompositions of a plan's ``gaussian`` part: k, k^2 and the surrogate.
DECOMPOSED = ("value", "square", "surrogate")

_PLANS: dict = {}


def plan_of(estimator) -> Plan:
    """The plan of a built-in name or alias (no SymPy) or of an :class:`~klsym.derive.estimators.Estimator`;
    a plan passes through."""
    if isinstance(estimator, Plan):
        return estimator
    if isinstance(estimator, str):
        return _builtin_plan(canonical_name(estimator))
    from klsym.derive.estimators import BUILTINS

    builtin = BUILTINS.get(estimator.name)
    if builtin is not None and builtin == estimator and builtin.stable_expr == estimator.stable_expr:
        return _builtin_plan(estimator.name)
    key = _key(["estimator", *_sreprs(estimator)])  # on disk: what is derived depends on the expressions only
    labelled = (key, estimator.name, estimator.target)
    if labelled not in _PLANS:
        _PLANS[labelled] = Plan(estimator.name, estimator.target, key, lambda: estimator)
    return _PLANS[labelled]


def _builtin_plan(name: str) -> Plan:
    if name not in _PLANS:

        def estimator():
            from klsym.derive.estimators import BUILTINS

            return BUILTINS[name]

        _PLANS[name] = Plan(name, BUILTIN_INFO[name].target, _key(["builtin", name]), estimator)
    return _PLANS[name]


def _key(parts) -> str:
    from klsym.derive.diskcache import cache_key

    return cache_key(parts, DERIVING_SOURCES)


def _sreprs(estimator) -> list[str]:
    import sympy as sp

    return [sp.srepr(e) for e in (estimator.expr, estimator.surrogate_expr, estimator.stable_expr)]


class Plan:
    """The cached derivations of one estimator; each part is read (or derived and stored) on first use.

    ``estimator()`` builds the :class:`~klsym.derive.estimators.Estimator`; it is called only where a part
    must be derived (or, for a user's formula whose generated code cannot be cached, compiled).
    """

    def __init__(self, name: str, target: str | None, key: str, estimator):
        self.name, self.target, self.key, self.estimator = name, target, key, estimator

    @cache  # noqa: B019 - plans live as long as the process (one per estimator)
    def part(self, name: str):
        from klsym.derive.diskcache import cached_json

        return cached_json(f"plan-{name}", self.key, lambda: _DERIVE[name](self.estimator()))

    @cached_property
    def numeric(self):
        r"""Vectorised :math:`t \mapsto k(e^t)` (:attr:`Estimator.numeric`)."""
        return self._logratio("value")

    @cached_property
    def numeric_dt(self):
        r"""Vectorised :math:`t \mapsto \frac{d}{dt} s(e^t)` (:attr:`Estimator.numeric_dt`)."""
        return self._logratio("slope")

    def _logratio(self, kind: str):
        attribute = "numeric" if kind == "value" else "numeric_dt"
        code = self.part("numeric")[kind]
        if code is None:  # generated code that reads a global klsym cannot name: compiled from SymPy
            return getattr(self.estimator(), attribute)
        return logratio_function(code, np, lambda: getattr(self.estimator(), attribute).expression)

    @cached_property
    def terms(self) -> dict:
        """``{"value", "square", "surrogate"}``: lists of :class:`~klsym.exact.closed_form.Term` (None: no closed form)."""
        gaussian = self.part("gaussian")
        return {need: terms_from_data(gaussian[need]) for need in DECOMPOSED}

    @property
    def conditions(self) -> dict:
        """Existence conditions (text) of ``mean`` and ``second_moment``."""
        return self.part("gaussian")["conditions"]

    def limit(self, kind: str) -> float:
        """k (``"value"``) or dk_sur/dt (``"slope"``) as t -> -inf."""
        value = self.part("limits")[kind]
        if value is None:  # SymPy found no limit: ask again, for its error
            return limit_at_minus_inf(_in_t(self.estimator(), kind))
        return float(value)

    @cache  # noqa: B019
    def mp_function(self, kind: str):
        """Elementwise t -> k(e^t) (``"value"``) or dk_sur/dt (``"slope"``) on mpmath numbers; at t = -inf the limit."""
        import mpmath

        code = self.part("mpmath")[kind]
        if code is None:
            import sympy as sp

            from klsym.derive.symbols import t

            evaluate = sp.lambdify(t, _in_t(self.estimator(), kind), modules="mpmath")
        else:
            evaluate = compile_code(code, mpmath)
        at_minus_inf = mpmath.mpf(self.limit(kind))

        def apply(log_ratios):
            return np.array(
                [at_minus_inf if v == -mpmath.inf else mpmath.mpf(evaluate(v)) for v in log_ratios], dtype=object
            )

        return apply


# --- derivations (SymPy) ---------------------------------------------------------------------------


@cache
def limit_at_minus_inf(expr_in_t) -> float:
    """k(e^t) as t -> -inf (p(x) = 0 < q(x)): the value where the formula gives inf * 0."""
    import sympy as sp

    from klsym.derive.symbols import t

    return float(sp.limit(expr_in_t, t, -sp.oo))


def _in_t(estimator, kind: str):
    import sympy as sp

    from klsym.derive.estimators import in_logratio
    from klsym.derive.symbols import t

    if kind == "value":
        return in_logratio(estimator.expr)
    return sp.diff(in_logratio(estimator.surrogate), t)


def check_no_free_symbols(estimator) -> None:
    """One clear error for an estimator with symbolic parameters (no number can be computed)."""
    import sympy as sp

    free = (estimator.expr.free_symbols | estimator.surrogate.free_symbols) - {sp.Symbol("r", positive=True)}
    if free:
        names = ", ".join(sorted(map(str, free)))
        raise ValueError(f"estimator {estimator.name!r} has free parameters ({names}): give them numeric values")


def _derive_numeric(estimator) -> dict:
    from klsym.derive.estimators import numeric_code

    return {kind: numeric_code(**forms) for kind, forms in estimator.numeric_forms.items()}


def _derive_gaussian(estimator) -> dict:
    import sympy as sp

    from klsym.derive import gaussian_closed_form as gcf

    check_no_free_symbols(estimator)
    decomposed = {
        "value": gcf.decompose(estimator.expr),
        "square": gcf.decompose(sp.expand(estimator.expr**2)),
        "surrogate": gcf.decompose(estimator.surrogate),
    }
    out = {}
    for need, terms in decomposed.items():
        try:
            out[need] = gcf.terms_data(terms)
        except (TypeError, ValueError):  # an irrational power of r: no closed form here, quadrature
            out[need] = None
    out["conditions"] = {
        key: None if terms is None else gcf.moment_condition_text([a for _, a, _ in terms])
        for key, terms in (("mean", decomposed["value"]), ("second_moment", decomposed["square"]))
    }
    return out


def _derive_limits(estimator) -> dict:
    out = {}
    for kind in ("value", "slope"):
        try:
            out[kind] = limit_at_minus_inf(_in_t(estimator, kind))
        except Exception:  # noqa: BLE001 - no limit: Plan.limit asks again, for SymPy's error
            out[kind] = None
    return out


def _derive_mpmath(estimator) -> dict:
    import mpmath

    from klsym.derive.estimators import _code
    from klsym.derive.generated import NotCacheable

    out = {}
    for kind in ("value", "slope"):
        try:
            out[kind] = _code(_in_t(estimator, kind), mpmath, "mpmath", cacheable=True)
        except NotCacheable:
            out[kind] = None
    return out


_DERIVE = {"numeric": _derive_numeric, "gaussian": _derive_gaussian, "limits": _derive_limits, "mpmath": _derive_mpmath}


__all__ = ["plan_of", "Plan", "DERIVING_SOURCES", "limit_at_minus_inf", "check_no_free_symbols"]
