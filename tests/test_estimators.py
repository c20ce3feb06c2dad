"""The estimator registry and its numeric forms: one SymPy formula, evaluated stably."""

import mpmath as mp
import numpy as np
import pytest
import sympy as sp

from klsym.derive.estimators import (
    ALIASES,
    BUILTINS,
    UnknownEstimatorError,
    bregman,
    control_variate,
    get_estimator,
    get_estimators,
    in_logratio,
)
from klsym.derive.symbols import r, t

LOG_RATIOS = np.array([-700, -300, -30, -1, -1e-4, -1e-12, 0.0, 1e-12, 1e-4, 0.5, 1, 30, 300, 700])


def _reference(expr, values):
    """The cited expression evaluated at 60 significant digits (mpmath), not the numeric form."""
    fn = sp.lambdify(t, in_logratio(expr), "mpmath")
    with mp.workdps(60):
        return np.array([float(fn(mp.mpf(float(v)))) for v in values])


@pytest.mark.parametrize("name", list(BUILTINS))
def test_numeric_form_matches_the_formula_to_full_precision(name):
    est = get_estimator(name)
    got, want = est.numeric(LOG_RATIOS), _reference(est.expr, LOG_RATIOS)
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, want, rtol=1e-13, atol=0)


@pytest.mark.parametrize("name", list(BUILTINS))
def test_numeric_derivative_matches_the_surrogate(name):
    est = get_estimator(name)
    got = est.numeric_dt(LOG_RATIOS)
    want = _reference(sp.diff(in_logratio(est.surrogate), t).subs(t, sp.log(r)), LOG_RATIOS)
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, want, rtol=1e-13, atol=1e-300)


@pytest.mark.parametrize("name", [n for n, e in BUILTINS.items() if e.stable_expr is not None])
def test_stable_form_equals_the_cited_formula(name):
    est = get_estimator(name)
    stable = est.stable_expr.rewrite(sp.exp).rewrite(sp.log)
    cited = in_logratio(est.expr)
    for piece, condition in stable.args:
        point = sp.Rational(-3, 2) if condition.subs(t, -1) is sp.true else sp.Rational(5, 2)
        assert (
            sp.simplify(sp.expand_log(piece - cited, force=True)) == 0
            or abs(sp.N((piece - cited).subs(t, point), 40)) < 1e-35
        )


def test_k3_has_no_cancellation_near_zero():
    """exp(t) - 1 - t computed naively loses all digits at t = 1e-9; the numeric form must not."""
    tiny = np.array([1e-9, -1e-9, 1e-6])
    np.testing.assert_allclose(get_estimator("k3").numeric(tiny), tiny**2 / 2 + tiny**3 / 6, rtol=1e-9)


@pytest.mark.parametrize("alias, name", sorted(ALIASES.items()))
def test_aliases_resolve(alias, name):
    assert get_estimator(alias) is get_estimator(name)


def test_straight_through_estimators_keep_k2_gradient():
    for name, base in [("k1+", "k1"), ("k3+", "k3")]:
        est = get_estimator(name)
        assert est.expr == get_estimator(base).expr
        assert est.surrogate == get_estimator("k2").expr and est.straight_through


def test_unknown_estimator_error_lists_choices():
    with pytest.raises(UnknownEstimatorError, match="unknown estimator 'k9'.*built-ins: k1"):
        get_estimator("k9")


def test_get_estimators_from_comma_string():
    assert [e.name for e in get_estimators("k1, low_var_kl,k3+")] == ["k1", "k3", "k3+"]


def test_constructors():
    assert sp.simplify(bregman("kl_forward").expr - get_estimator("rev_k3").expr) == 0
    assert sp.simplify(control_variate(1).expr - get_estimator("k3").expr) == 0
    with pytest.raises(ValueError, match="free parameters"):
        control_variate().numeric(np.zeros(2))


@pytest.mark.parametrize("name", ["k3", "k4", "rev_k2"])
def test_shared_taylor_indices_give_the_functions_own_values(name):
    from klsym.derive.generated import near_zero

    estimator = get_estimator(name)
    t = np.random.default_rng(8).normal(scale=2e-3, size=(3, 400))  # many |t| below the Taylor radius
    t[0, :3] = [0.0, -0.0, 1e-300]
    shared = near_zero(np, t)
    assert 0 < shared.size < t.size
    for function in (estimator.numeric, estimator.numeric_dt):
        np.testing.assert_array_equal(function(t, lambda: shared), function(t))
        np.testing.assert_array_equal(function(t[:, ::2], None), function(np.ascontiguousarray(t[:, ::2])))


def test_functions_at_one_array_share_its_exp_and_expm1_and_give_their_own_values():
    """Within sharing_calls, exp(t) and expm1(t) are computed once for every function evaluated at t (the
    engine's block), with each function's own numbers; a result that is the shared array itself (k3's slope,
    expm1(t)) is handed out as a copy, so that writing into it (the Taylor part does) leaves the others intact."""
    from klsym.derive.generated import sharing_calls

    t = np.random.default_rng(9).normal(scale=3.0, size=(2, 500))
    t[0, :4] = [0.0, 1e-5, -1e-4, 700.0]  # Taylor parts, and the far tail
    functions = [
        f for name in ("k3", "k4", "rev_k1", "rev_k3") for f in (BUILTINS[name].numeric, BUILTINS[name].numeric_dt)
    ]
    alone = [f(t) for f in functions]
    memo: dict = {}
    with sharing_calls(t, memo):
        together = [f(t) for f in functions]
        elsewhere = BUILTINS["k3"].numeric(t.copy())  # another array: nothing shared
    assert set(memo) == {"exp", "expm1"}
    kept = {name: value.copy() for name, value in memo.items()}
    for one, other in zip(together, alone):
        np.testing.assert_array_equal(one, other)
        assert all(one is not value for value in memo.values())
        one[...] = np.nan  # a caller may write into what it gets
    np.testing.assert_array_equal(elsewhere, alone[0])
    for name, value in memo.items():
        np.testing.assert_array_equal(value, kept[name])
