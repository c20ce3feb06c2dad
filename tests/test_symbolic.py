"""The symbolic core: exact derivations, checked exactly and cross-checked numerically."""

import mpmath as mp
import numpy as np
import pytest
import sympy as sp
from scipy import integrate
from scipy.special import log_softmax

from klsym.derive.divergences import REGISTRY, dual, get_divergence, jeffreys, kl_forward, kl_reverse, symmetrized
from klsym.derive.estimators import BUILTINS, bregman, control_variate, from_formula, get_estimator
from klsym.derive.symbolic import (
    MODES,
    analyze,
    analyze_symbolic,
    convexity,
    derivatives_at_one,
    identify,
    implied_gradient_divergence,
    implied_gradient_generator,
    local_expansion,
    mode_coefficient,
    nonnegativity,
    value_divergence,
)
from klsym.derive.symbols import delta, r

ALL = list(BUILTINS)


@pytest.mark.parametrize("name", ["k1", "k2", "k3"])
def test_schulman_estimators_have_unit_curvature(name):
    assert derivatives_at_one(get_estimator(name).expr, 2)[2] == 1


def test_k3_nonnegative_and_convex_k1_not_nonnegative():
    k1, k3 = get_estimator("k1"), get_estimator("k3")
    assert nonnegativity(k3)["holds"] is True and convexity(k3)["holds"] is True
    verdict = nonnegativity(k1)
    assert verdict["holds"] is False
    assert k1.expr.subs(r, verdict["counterexample"]).evalf() < 0


@pytest.mark.parametrize("name", ALL)
def test_counterexamples_are_real(name):
    """Every False verdict carries an r at which the property fails, checked by direct substitution."""
    est = get_estimator(name)
    for verdict, expr in [(nonnegativity(est), est.expr), (convexity(est), sp.diff(est.expr, r, 2))]:
        if verdict["holds"] is False:
            assert expr.subs(r, verdict["counterexample"]).evalf(30) < 0


@pytest.mark.parametrize(
    "name, mode, expected",
    [
        # Yang (2025), seed 003: the gradient of an estimator used as a loss is not the gradient of its value.
        ("k1", "loss", "zero"),  # E[grad k1] = E[score] = 0
        ("k2", "loss", "KL(q||p)"),  # k2 as a loss gives the true gradient of KL(q||p)
        ("k3", "loss", "KL(p||q)"),  # k3 as a loss descends the *other* direction
        ("rev_k2", "loss", "KL(p||q)"),
        ("k1", "reward", "KL(q||p)"),  # REINFORCE with k1 in the reward is unbiased for KL(q||p)
        ("k1+", "loss", "KL(q||p)"),  # verl straight-through: gradient of k2
        ("k3+", "loss", "KL(q||p)"),
    ],
)
def test_seed_003_gradient_facts(name, mode, expected):
    assert implied_gradient_divergence(get_estimator(name), mode)["divergence"] == expected


# Straight-through estimators are left out by design: their pathwise part uses the surrogate.
@pytest.mark.parametrize("name", [n for n in ALL if not get_estimator(n).straight_through])
def test_full_mode_follows_the_value_divergence(name):
    """grad E_q[k] is the gradient of E_q[k]: same label, generators equal up to a + b r."""
    est = get_estimator(name)
    full = analyze_symbolic(est)["gradient"]["full"]
    value = value_divergence(est)
    assert full["divergence"] == value["divergence"]
    assert sp.simplify(sp.diff(full["generator"] - value["generator"], r, 2)) == 0


@pytest.mark.parametrize("name", list(REGISTRY))
def test_bregman_of_every_generator_is_nonnegative_with_zero_slope(name):
    divergence = get_divergence(name)
    est = bregman(divergence)
    assert nonnegativity(est)["holds"] is True
    df1 = derivatives_at_one(est.expr, 1)[1]
    if name in ("total_variation", "log1p_abs"):
        assert df1 is None  # kinked at r = 1: f'(1) does not exist, so None rather than a guess
    else:
        assert df1 == 0
        assert identify(est.expr) == identify(divergence.generator)  # same divergence: E[r - 1] = 0


@pytest.mark.parametrize(
    "name, d2f1",
    [
        # f''(1) as listed for TFP's Csiszar functions in shared/references/kl-in-rl-frameworks.md
        ("kl_reverse", 1),
        ("kl_forward", 1),
        ("jensen_shannon", sp.Rational(1, 2)),
        ("arithmetic_geometric", sp.Rational(1, 2)),
        ("pearson", 2),
        ("squared_hellinger", sp.Rational(1, 2)),
        ("triangular", 1),
        ("jeffreys", 1),
        ("chi_square", 2),
        ("modified_gan", sp.Rational(3, 4)),
        ("amari_alpha", 1),
        ("neyman", 2),
    ],
)
def test_registry_generators(name, d2f1):
    f = get_divergence(name).generator
    values = derivatives_at_one(f, 2)
    assert values[0] == 0
    assert sp.simplify(values[2] - d2f1) == 0


@pytest.mark.parametrize("name", list(REGISTRY))
def test_registry_entries_identify_as_themselves(name):
    # TFP's chi_square r^2 - 1 is Pearson's (r - 1)^2 plus 2(r - 1): the same divergence, first entry wins.
    expected = "Pearson chi^2" if name == "chi_square" else get_divergence(name).label
    assert identify(get_divergence(name).generator) == expected


def test_dual_and_symmetrized():
    assert sp.simplify(dual(kl_reverse()) - kl_forward()) == 0
    assert sp.simplify(symmetrized(kl_forward()) - jeffreys()) == 0
    assert identify(dual(get_divergence("pearson").generator)) == "Neyman chi^2"


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("n", [1, 2, 3])
def test_derivatives_at_one_match_numerical_differentiation(name, n):
    est = get_estimator(name)
    exact = derivatives_at_one(est.expr, 3)[n]
    fn = sp.lambdify(r, est.expr, "mpmath")
    with mp.workdps(40):
        assert abs(mp.diff(fn, 1, n) - sp.N(exact, 40)) < 1e-25


def _categorical_mode_gradient(est, mode, logits_q, logp):
    """The mode's expected gradient w.r.t. q's logits, from its definition (central differences)."""
    logq = log_softmax(logits_q)
    q = np.exp(logq)
    eps = 1e-6
    value, surrogate = est.numeric, sp.lambdify(r, est.surrogate, "numpy")
    grad = np.zeros_like(logits_q)
    for j in range(len(logits_q)):
        step = np.zeros_like(logits_q)
        step[j] = eps
        lq_plus, lq_minus = log_softmax(logits_q + step), log_softmax(logits_q - step)
        # loss: samples fixed, differentiate k_sur(p(x)/q_theta(x)) only through the ratio
        loss = np.sum(q * (surrogate(np.exp(logp - lq_plus)) - surrogate(np.exp(logp - lq_minus)))) / (2 * eps)
        # reward: k fixed, differentiate log q_theta(x): E[k * score]
        reward = np.sum(q * value(logp - logq) * (lq_plus - lq_minus)) / (2 * eps)
        grad[j] = {"loss": loss, "reward": reward, "full": loss + reward}[mode]
    return grad


def _categorical_true_gradient(g, logits_q, logp):
    eps = 1e-6
    g = sp.lambdify(r, g, "numpy")
    grad = np.zeros_like(logits_q)
    for j in range(len(logits_q)):
        step = np.zeros_like(logits_q)
        step[j] = eps
        vals = []
        for sign in (1, -1):
            lq = log_softmax(logits_q + sign * step)
            vals.append(np.sum(np.exp(lq) * g(np.exp(logp - lq))))
        grad[j] = (vals[0] - vals[1]) / (2 * eps)
    return grad


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("mode", MODES)
def test_implied_generator_reproduces_the_mode_gradient(name, mode):
    """Independent check of the ODE: grad E_q[g] (finite differences) = the mode's gradient (definition)."""
    est = get_estimator(name)
    g = implied_gradient_generator(est, mode)
    assert not g.has(sp.Integral)
    assert sp.simplify(g.subs(r, 1)) == 0
    rng = np.random.default_rng(3)
    logits_q, logp = rng.normal(size=6), log_softmax(rng.normal(size=6))
    expected = _categorical_mode_gradient(est, mode, logits_q, logp)
    got = _categorical_true_gradient(g, logits_q, logp)
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-8)


def test_mode_coefficients_add_up():
    for est in BUILTINS.values():
        h = {m: mode_coefficient(est, m) for m in MODES}
        assert sp.simplify(h["full"] - h["loss"] - h["reward"]) == 0


def test_local_expansion_of_k2_is_third_order_biased():
    exp = local_expansion(get_estimator("k2"))
    assert sp.simplify(exp["series"] - (delta**2 / 2 + delta**4 / 8)) == 0
    assert exp["bias_leading"] == delta**4 / 8


@pytest.mark.parametrize("name", ["k1", "k2", "k3", "k4", "rev_k1", "rev_k3"])
def test_local_expansion_matches_quadrature(name):
    """Series in delta for q = N(0,1), p = N(delta,1) vs the integral, error O(delta^5)."""
    est = get_estimator(name)
    series = sp.lambdify(delta, local_expansion(est)["series"])
    for d in (0.05, 0.1):
        exact, _ = integrate.quad(
            lambda x, d=d: np.exp(-x * x / 2) / np.sqrt(2 * np.pi) * est.numeric(d * x - d * d / 2),
            -40,
            40,
            epsabs=1e-14,
            epsrel=1e-13,
        )
        assert abs(exact - series(d)) < 50 * d**5


def test_k4_is_twice_kl_near_p_equals_q():
    """Zhang's K4 has f''(1) = 2: E_q[k4] ~ 2 KL(q||p) locally (the leading bias is KL itself)."""
    a = analyze("k4")
    assert a["d2f1"] == "2"
    assert sp.simplify(local_expansion(get_estimator("k4"))["bias_leading"] - delta**2 / 2) == 0


def test_straight_through_full_mode_is_twice_kl():
    assert implied_gradient_divergence(get_estimator("k1+"), "full")["divergence"] == "2*KL(q||p)"


def test_control_variate_with_symbolic_lambda():
    est = control_variate()
    a = analyze_symbolic(est)
    assert a["value"]["divergence"] == "KL(q||p)"  # unbiased for every lambda
    assert a["convex"]["holds"] is True
    assert a["nonnegative"]["holds"] is None  # depends on lambda: undecided, not guessed
    assert analyze_symbolic(control_variate(1))["nonnegative"]["holds"] is True


def test_user_formula_analysis():
    a = analyze(from_formula("(r - 1)**2 / 2"))
    assert a["value"]["divergence"] == "1/2*Pearson chi^2"
    assert a["nonnegative"] is True and a["convex"] is True


def test_analyze_contract_and_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KLSYM_CACHE_DIR", str(tmp_path))
    first = analyze("k3")
    assert set(first) >= {
        "name",
        "expr",
        "latex",
        "f1",
        "df1",
        "d2f1",
        "d3f1",
        "nonnegative",
        "convex",
        "value",
        "gradient",
    }
    assert set(first["value"]) == {"generator", "divergence", "expectation"}
    assert first["value"]["expectation"] == "KL(q||p)" and first["undecided"] == []
    assert set(first["gradient"]) == set(MODES)
    assert all(set(g) == {"generator", "divergence", "d2g1"} for g in first["gradient"].values())
    assert list(tmp_path.glob("derive-*.json"))  # written to the disk cache
    assert analyze("k3") == first
