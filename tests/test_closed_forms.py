"""Gaussian closed forms (``klsym derive --family gaussian``): checked against the exact layer at
random seeded points, and symbolically (full = d/dtheta E_q[k], full = loss + reward)."""

import json
import math

import numpy as np
import pytest
import sympy as sp

from klsym.cli import main
from klsym.derive import closed_forms as cf
from klsym.derive.estimators import BUILTINS, from_formula
from klsym.exact.expectations import MODES, estimator_gradient, estimator_stats
from klsym.exact.families import Gaussian

WITH_CLOSED_FORM = [name for name in BUILTINS if cf.closed_forms(name)["closed_form"]]
POINTS = 4


def _random_pairs(seed: int, count: int = POINTS):
    """Seeded (q, p) with sigma_p^2 < 1.8 sigma_q^2, so every moment used here is finite."""
    rng = np.random.default_rng(seed)
    pairs = []
    while len(pairs) < count:
        mu_q, mu_p = rng.uniform(-1.5, 1.5, 2)
        sigma_q, sigma_p = rng.uniform(0.5, 2.0, 2)
        if sigma_p**2 < 1.8 * sigma_q**2 and sigma_q**2 < 1.8 * sigma_p**2:
            pairs.append(((float(mu_q), float(sigma_q)), (float(mu_p), float(sigma_p))))
    return pairs


def _value(text, q, p):
    return float(cf.numeric(text)(q[0], q[1], p[0], p[1]))


def test_every_builtin_is_covered():
    assert set(BUILTINS) - set(WITH_CLOSED_FORM) == {"k4"}
    assert len(WITH_CLOSED_FORM) >= 8


@pytest.mark.parametrize("name", WITH_CLOSED_FORM)
def test_mean_and_variance_match_exact_layer(name):
    forms = cf.closed_forms(name)
    for index, (q, p) in enumerate(_random_pairs(seed=100 + list(BUILTINS).index(name))):
        for method in ("closed_form", "quadrature"):  # quadrature: independent of the MGF machinery
            stats = estimator_stats(name, Gaussian(*q), Gaussian(*p), method=method)
            tolerance = 1e-9 if method == "closed_form" else 1e-6
            assert _value(forms["mean"], q, p) == pytest.approx(stats["mean"], rel=tolerance, abs=tolerance), (
                name,
                index,
                method,
            )
            assert _value(forms["variance"], q, p) == pytest.approx(stats["std"] ** 2, rel=tolerance, abs=tolerance), (
                name,
                index,
                method,
            )


@pytest.mark.parametrize("name", WITH_CLOSED_FORM)
@pytest.mark.parametrize("mode", MODES)
def test_gradients_match_exact_layer(name, mode):
    forms = cf.closed_forms(name)
    for q, p in _random_pairs(seed=200 + list(BUILTINS).index(name)):
        exact = estimator_gradient(name, Gaussian(*q), Gaussian(*p), mode)
        derived = [_value(forms["gradient"][mode][parameter], q, p) for parameter in cf.PARAMETERS]
        np.testing.assert_allclose(derived, exact, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("name", WITH_CLOSED_FORM)
def test_full_mode_is_the_gradient_of_the_mean(name):
    forms = cf.derive(name)
    for parameter in cf.PARAMETERS:
        symbol = cf.SYMBOLS[parameter]
        full = forms["gradient"]["full"][parameter]
        difference = sp.simplify(full - sp.diff(forms["mean"], symbol))
        # straight-through estimators differentiate a surrogate: their full mode is not grad E_q[k]
        assert (difference == 0) == (not BUILTINS[name].straight_through), (name, parameter, difference)
        assert sp.simplify(full - forms["gradient"]["loss"][parameter] - forms["gradient"]["reward"][parameter]) == 0


def test_conditions():
    k3 = cf.closed_forms("k3")
    assert k3["conditions"]["mean"] == "True"
    assert k3["conditions"]["variance"] == "sigma_p**2 < 2*sigma_q**2"
    assert cf.closed_forms("rev_k1")["conditions"]["variance"] == "sigma_p**2 < 2*sigma_q**2"
    # outside the condition the exact layer's variance is infinite
    stats = estimator_stats("k3", Gaussian(0.0, 1.0), Gaussian(0.0, 1.5))
    assert math.isinf(stats["std"])
    cubic = cf.closed_forms(from_formula("r**3"))  # E_q[r^6] needs 5 sigma_p^2 < 6 sigma_q^2
    assert cubic["conditions"]["variance"] == "5*sigma_p**2 < 6*sigma_q**2"


def test_no_closed_form_for_k4():
    k4 = cf.closed_forms("k4")
    assert not k4["closed_form"]
    assert k4["mean"] is None and k4["variance"] is None
    assert k4["conditions"]["mean"] == cf.NO_CLOSED_FORM
    assert all(k4["gradient"][mode]["mu_q"] is None for mode in MODES)


def test_symbols_are_declared():
    expr = sp.sympify(cf.closed_forms("k1")["mean"], locals=cf.SYMBOLS)
    assert expr.free_symbols == {cf.MU_Q, cf.SIGMA_Q, cf.MU_P, cf.SIGMA_P}
    assert cf.SIGMA_Q.is_positive and cf.SIGMA_P.is_positive


def test_disk_cache_round_trip(tmp_path, monkeypatch):
    monkeypatch.setenv("KLSYM_CACHE_DIR", str(tmp_path))
    estimator = from_formula("r - 1 - log(r) + (log(r))**2 / 7", name="cache-probe")
    first = cf.closed_forms(estimator)
    files = list(tmp_path.glob("closed-forms-*.json"))
    assert len(files) == 1
    assert json.loads(files[0].read_text())["mean"] == first["mean"]


def test_cli_json_contract(capsys):
    assert main(["derive", "k3", "k4", "--family", "gaussian", "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [row["name"] for row in rows] == ["k3", "k4"]
    for key in ("name", "mean", "variance", "gradient", "conditions"):
        assert key in rows[0]
    assert set(rows[0]["gradient"]) == set(MODES)
    assert set(rows[0]["gradient"]["loss"]) == {"mu_q", "sigma_q"}
    assert rows[1]["conditions"]["variance"] == "no closed form"


def _family_output(capsys, output_format, *names):
    """stdout of ``derive NAMES --family gaussian --format FORMAT`` (which must succeed)."""
    assert main(["derive", *names, "--family", "gaussian", "--format", output_format]) == 0
    return capsys.readouterr().out


def test_cli_markdown_and_latex(capsys):
    text = _family_output(capsys, "markdown", "k3")
    assert "Var_q[k]" in text and "sigma_p**2 < 2*sigma_q**2" in text
    tex = _family_output(capsys, "latex", "k3")
    assert r"\begin{align*}" in tex and r"\mathrm{Var}_q[k]" in tex
    assert tex.count(r"\text{if }") == 1 and r"\text{True}" not in tex  # only the variance has a condition


def test_bad_input_is_one_clear_error(capsys):
    assert main(["derive", "k9", "--family", "gaussian"]) == 2
    assert "unknown estimator 'k9'" in capsys.readouterr().err
    from klsym.derive.estimators import control_variate

    with pytest.raises(ValueError, match=r"free parameters \(lambda\)"):
        cf.closed_forms(control_variate())


def test_write_closed_forms(tmp_path):
    rows = cf.write_closed_forms(tmp_path, ["k1", "k4"])
    assert [row["name"] for row in rows] == ["k1", "k4"]
    tex = (tmp_path / "closed_forms.tex").read_text()
    assert tex.count(r"\begin{align*}") == 1 and "No closed form" in tex
    assert json.loads((tmp_path / "closed_forms.json").read_text())[0]["name"] == "k1"


_GAUSSIAN_KL = {  # KL(N(mu_a, s_a^2) || N(mu_b, s_b^2)), written out here, not taken from klsym
    "KL(q||p)": lambda q, p: math.log(p[1] / q[1]) + (q[1] ** 2 + (q[0] - p[0]) ** 2) / (2 * p[1] ** 2) - 0.5,
    "KL(p||q)": lambda q, p: math.log(q[1] / p[1]) + (p[1] ** 2 + (q[0] - p[0]) ** 2) / (2 * q[1] ** 2) - 0.5,
}


@pytest.mark.parametrize(
    "name, equals",
    [
        ("k1", "KL(q||p)"),
        ("k3", "KL(q||p)"),
        ("k1+", "KL(q||p)"),
        ("k3+", "KL(q||p)"),
        ("rev_k1", "KL(p||q)"),
        ("rev_k3", "KL(p||q)"),
        ("rev_k2", "1"),
        ("k2", None),
        ("k4", None),
    ],
)
def test_mean_names_the_divergence_it_equals(name, equals, capsys):
    from klsym.derive.symbolic import value_divergence

    forms = cf.closed_forms(name)
    assert forms["mean_equals"] == equals == value_divergence(BUILTINS[name])["expectation"]
    if equals in _GAUSSIAN_KL:  # the claim holds numerically at random pairs
        for q, p in _random_pairs(seed=300):
            assert _value(forms["mean"], q, p) == pytest.approx(_GAUSSIAN_KL[equals](q, p), rel=1e-12, abs=1e-14)
    lines = _family_output(capsys, "markdown", name).splitlines()
    if forms["closed_form"]:  # k4 has no E_q[k] line
        mean_line = next(line for line in lines if line.startswith("- E_q[k]"))
        assert mean_line.endswith(f"` = {equals}") == (equals is not None and equals != forms["mean"]), mean_line


def test_straight_through_shows_its_surrogate(capsys):
    k1_plus, k1 = json.loads(_family_output(capsys, "json", "k1+", "k1"))
    assert k1["surrogate"] is None and k1_plus["mean_equals"] == "KL(q||p)"
    surrogate = sp.sympify(k1_plus["surrogate"], locals={"r": BUILTINS["k2"].expr.free_symbols.pop()})
    assert sp.simplify(surrogate - BUILTINS["k2"].expr) == 0
    # the loss lines are k2's, not the gradient of E_q[-log r]
    k2 = cf.closed_forms("k2")
    for parameter in cf.PARAMETERS:
        assert (
            sp.simplify(
                sp.sympify(k1_plus["gradient"]["loss"][parameter], locals=cf.SYMBOLS)
                - sp.sympify(k2["gradient"]["loss"][parameter], locals=cf.SYMBOLS)
            )
            == 0
        )
    text = _family_output(capsys, "markdown", "k1+")
    assert "Straight-through" in text and "s(r) = `log(r)**2/2` (the gradient of `k2`)" in text
    tex = _family_output(capsys, "latex", "k1+")
    assert r"(the gradient of \texttt{k2})" in tex and r"= \text{$\mathrm{KL}(q\|p)$}" in tex
    assert "Straight-through" not in _family_output(capsys, "markdown", "k1")
