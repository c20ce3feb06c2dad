"""User formulas are parsed from a whitelist and never evaluated as Python."""

import pytest
import sympy as sp
from hypothesis import given, settings
from hypothesis import strategies as st

from klsym.derive.estimators import from_formula
from klsym.derive.formula import FormulaError, parse_formula
from klsym.derive.symbols import r


@pytest.mark.parametrize(
    "text, expected",
    [
        ("r - 1 - log(r)", r - 1 - sp.log(r)),
        ("log((r-1)**2 + 1)", sp.log((r - 1) ** 2 + 1)),
        ("0.5*log(r)^2", sp.log(r) ** 2 / 2),
        ("t**2/2", sp.log(r) ** 2 / 2),
        ("sqrt(r) - 1", sp.sqrt(r) - 1),
        ("Abs(log(r))", sp.Abs(sp.log(r))),
        ("exp(-t) * -2", -2 / r),
        ("(r - 1)**2 / (1 + r)", (r - 1) ** 2 / (1 + r)),
    ],
)
def test_parses_whitelisted_formulas_exactly(text, expected):
    assert sp.simplify(parse_formula(text) - expected) == 0


@pytest.mark.parametrize(
    "text, reason",
    [
        ("__import__('os')", "function '__import__' is not allowed"),
        ("r.__class__", "attribute access is not allowed"),
        ("(lambda: 1)()", "only plain function calls"),
        ("lambda r: r", "lambda expressions are not allowed"),
        ("x + 1", "unknown name 'x'"),
        ("open('f')", "function 'open' is not allowed"),
        ("[r for r in ()]", "ListComp is not allowed"),
        ("'r'", "constant 'r' is not a number"),
        ("log(r, base=2)", "log takes exactly one argument"),
        ("r**1000", "exponents larger than 100"),
        ("10**10000000", "larger than"),
        ("r +", "not an expression"),
        ("", "formula is empty"),
        ("1/0", "does not define a finite expression"),
    ],
)
def test_rejects_with_a_clear_message(text, reason):
    with pytest.raises(FormulaError) as info:
        parse_formula(text)
    assert reason in str(info.value)


def test_rejected_formula_runs_nothing(monkeypatch):
    calls = []
    monkeypatch.setattr("builtins.__import__", lambda *a, **k: calls.append(a) or None, raising=True)
    with pytest.raises(FormulaError):
        parse_formula("__import__('os').system('echo hacked')")
    assert calls == []


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="r()*+-/^.,0123456789 logexpsqrtAbs_'[]{}:;=<>!&|%@lambda", max_size=40))
def test_any_string_gives_an_expression_or_a_formula_error(text):
    try:
        expr = parse_formula(text)
    except FormulaError:
        return
    assert isinstance(expr, sp.Expr) and expr.free_symbols <= {r}


def test_from_formula_builds_an_estimator():
    est = from_formula("r*log(r) - (r - 1)", name="my_rev_k3")
    assert est.name == "my_rev_k3" and est.source == "user formula"
    assert float(est.numeric(0.0)) == 0.0
