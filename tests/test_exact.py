"""The exact layer: closed forms = quadrature = textbook formulas = finite differences; categorical sums
= brute force; bad input gives one clear error."""

import math

import numpy as np
import pytest
from scipy import stats

from klsym.derive.estimators import BUILTINS, control_variate, from_formula, get_estimator
from klsym.exact.expectations import (
    KL_PQ,
    KL_QP,
    MODES,
    estimator_gradient,
    estimator_stats,
    exact_summary,
    kl_divergences,
    quadrature,
    true_gradients,
)
from klsym.exact.families import Categorical, Gaussian, log_ratio

# (q, p) pairs: seeds' settings plus wider/narrower references; all keep sigma_p^2 < 2 sigma_q^2 with
# margin so E[r^2] terms converge fast enough for the quadrature cross-check.
PAIRS = [
    ((0.0, 1.0), (1.0, 1.0)),
    ((0.0, 1.0), (0.1, 1.0)),
    ((0.0, 1.0), (1.0, 1.1)),
    ((1.3, 2.5), (0.5, 1.2)),
    ((0.0, 1.0), (0.5, 0.6)),
    ((0.2, 0.8), (-0.3, 1.0)),
    ((0.0, 2.0), (1.0, 2.5)),
    ((0.0, 1.0), (-2.0, 0.3)),
]
CLOSED_FORM = [name for name, e in BUILTINS.items() if name != "k4"]
RTOL = 1e-10


def _gaussians(pair):
    return Gaussian(*pair[0]), Gaussian(*pair[1])


def _textbook_kl(a, b):
    """KL(N(a) || N(b)) for (mu, sigma) tuples."""
    return math.log(b[1] / a[1]) + (a[1] ** 2 + (a[0] - b[0]) ** 2) / (2 * b[1] ** 2) - 0.5


def _close(x, y, rtol=RTOL, atol=1e-13):
    return abs(x - y) <= max(rtol * max(abs(x), abs(y)), atol)


@pytest.mark.parametrize("pair", PAIRS)
def test_kl_equals_textbook_gaussian_formula(pair):
    q, p = _gaussians(pair)
    kl = kl_divergences(q, p)
    assert kl[KL_QP] == pytest.approx(_textbook_kl(pair[0], pair[1]), rel=1e-13, abs=1e-15)
    assert kl[KL_PQ] == pytest.approx(_textbook_kl(pair[1], pair[0]), rel=1e-13, abs=1e-15)


@pytest.mark.parametrize("name", CLOSED_FORM)
@pytest.mark.parametrize("pair", PAIRS)
def test_closed_form_moments_equal_quadrature(pair, name):
    q, p = _gaussians(pair)
    closed = estimator_stats(name, q, p, method="closed_form")
    quad = estimator_stats(name, q, p, method="quadrature")
    for key in ("mean", "second_moment", "std"):
        assert _close(closed[key], quad[key]), (key, closed[key], quad[key])
    assert quad["error_estimate"]["mean"] < 1e-11 * max(1.0, abs(quad["mean"]))


@pytest.mark.parametrize("mode", ["loss", "reward"])
@pytest.mark.parametrize("name", CLOSED_FORM)
@pytest.mark.parametrize("pair", PAIRS)
def test_closed_form_gradients_equal_quadrature(pair, name, mode):
    q, p = _gaussians(pair)
    closed = estimator_gradient(name, q, p, mode, method="closed_form")
    quad = estimator_gradient(name, q, p, mode, method="quadrature")
    scale = max(np.max(np.abs(closed)), 1e-3)
    assert np.all(np.abs(closed - quad) <= RTOL * scale), (closed, quad)


@pytest.mark.parametrize("pair", PAIRS)
def test_true_gradients_equal_textbook_derivatives(pair):
    (mq, sq), (mp, sp) = pair
    grads = true_gradients(*_gaussians(pair))
    # d/d(mu_q, sigma_q) of the textbook formulas, derived by hand
    np.testing.assert_allclose(grads[KL_QP], [(mq - mp) / sp**2, -1 / sq + sq / sp**2], rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(
        grads[KL_PQ], [(mq - mp) / sq**2, 1 / sq - (sp**2 + (mp - mq) ** 2) / sq**3], rtol=1e-12, atol=1e-14
    )


def _finite_difference(function, params, h=1e-5):
    out = []
    for i in range(len(params)):
        up, down = list(params), list(params)
        up[i] += h
        down[i] -= h
        out.append((function(tuple(up)) - function(tuple(down))) / (2 * h))
    return np.array(out)


@pytest.mark.parametrize("name", ["k1", "k2", "k3", "k4", "rev_k1", "rev_k3"])
@pytest.mark.parametrize("pair", PAIRS[:4])
def test_full_mode_is_the_derivative_of_the_mean(pair, name):
    """full = grad_theta E_q[k] when k has no straight-through surrogate."""
    q, p = _gaussians(pair)
    estimator = get_estimator(name)

    def mean_at(theta):  # by quadrature: independent of the closed form being checked
        moved = Gaussian(*theta)
        return quadrature.expect(moved, lambda x: estimator.numeric(log_ratio(p, moved, x)))[0]

    fd = _finite_difference(mean_at, q.params)
    np.testing.assert_allclose(estimator_gradient(name, q, p, "full"), fd, rtol=1e-7, atol=1e-8)


@pytest.mark.parametrize("name", ["k2", "k3", "k4", "rev_k1", "k3+"])
@pytest.mark.parametrize("pair", PAIRS[:4])
def test_loss_mode_is_the_derivative_with_samples_held_fixed(pair, name):
    """loss = d/dtheta E_{x ~ q fixed}[k_sur(p(x)/q_theta(x))]: only the ratio moves."""
    q, p = _gaussians(pair)
    estimator = get_estimator(name)
    surrogate = from_formula(str(estimator.surrogate))

    def mean_with_ratio_at(theta):
        moved = Gaussian(*theta)
        return quadrature.expect(q, lambda x: surrogate.numeric(log_ratio(p, moved, x)))[0]

    fd = _finite_difference(mean_with_ratio_at, q.params)
    np.testing.assert_allclose(estimator_gradient(name, q, p, "loss"), fd, rtol=1e-7, atol=1e-8)


def test_fractional_power_matches_bhattacharyya_coefficient():
    """E_q[sqrt(r)] is the Bhattacharyya coefficient, a closed form with a = 1/2."""
    (mq, sq), (mp, sp) = (0.3, 1.4), (-0.2, 0.7)
    expected = math.sqrt(2 * sq * sp / (sq**2 + sp**2)) * math.exp(-((mq - mp) ** 2) / (4 * (sq**2 + sp**2)))
    stats_ = estimator_stats(from_formula("sqrt(r)"), Gaussian(mq, sq), Gaussian(mp, sp))
    assert stats_["method"] == "closed_form"
    assert stats_["mean"] == pytest.approx(expected, rel=1e-13)


@pytest.mark.parametrize("sigma_p, finite", [(1.5, False), (math.sqrt(2.0), False), (1.3, True)])
def test_k3_variance_is_infinite_iff_sigma_p_squared_at_least_twice_sigma_q_squared(sigma_p, finite):
    s = estimator_stats("k3", Gaussian(0.0, 1.0), Gaussian(0.2, sigma_p))
    assert s["condition"]["second_moment"] == "sigma_p**2 < 2*sigma_q**2"
    assert s["condition"]["second_moment_holds"] is finite
    assert math.isfinite(s["second_moment"]) is finite
    assert math.isfinite(s["std"]) is finite
    assert math.isfinite(s["mean"])


def test_quadrature_reports_divergence_as_inf():
    value, error = quadrature.expect(Gaussian(0.0, 1.0), lambda x: np.exp(np.asarray(x) ** 2))
    assert value == math.inf and error == math.inf


@pytest.mark.parametrize("delta", [0.1, 1.0, -0.7])
def test_prob_negative_of_k1_equal_sigmas(delta):
    """k1 < 0 iff t > 0 iff x > delta/2 (q = N(0,1), p = N(delta,1), delta > 0; reversed if delta < 0)."""
    s = estimator_stats("k1", Gaussian(0, 1), Gaussian(delta, 1))
    expected = stats.norm.sf(delta / 2) if delta > 0 else stats.norm.cdf(delta / 2)
    assert s["prob_negative"] == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("formula", ["-log(r)", "r*log(r)", "r - 2", "log(r)**2 - 1/4"])
@pytest.mark.parametrize("pair", [PAIRS[3], PAIRS[4], PAIRS[7]])
def test_prob_negative_matches_monte_carlo(pair, formula):
    q, p = _gaussians(pair)
    estimator = from_formula(formula)
    exact = estimator_stats(estimator, q, p)["prob_negative"]
    rng = np.random.default_rng(2024)
    n = 400_000
    x = q.sample(rng, n)
    freq = float(np.mean(estimator.numeric(log_ratio(p, q, x)) < 0))
    se = math.sqrt(max(exact * (1 - exact), 1e-12) / n)
    assert abs(freq - exact) / se < 5


@pytest.mark.parametrize("name", ["k3", "k4", "rev_k3"])
def test_nonnegative_estimators_have_zero_prob_negative(name):
    assert estimator_stats(name, Gaussian(1.3, 2.5), Gaussian(0.5, 1.2))["prob_negative"] == 0.0


# --- T i.i.d. positions ----------------------------------------------------------------------------


@pytest.mark.parametrize("positions", [1, 2, 5])
def test_sequence_moments_of_k1_k2_from_single_position_cumulants(positions):
    """Sum of T i.i.d. t_i: mean T m, variance T v; so E[k1] = T KL and E[k2] = (T v + T^2 m^2)/2."""
    q, p = Gaussian(0.0, 1.0), Gaussian(1.0, 1.1)
    kl = _textbook_kl(q.params, p.params)
    m = -kl
    v = 2 * estimator_stats("k2", q, p)["mean"] - m**2
    assert estimator_stats("k1", q, p, positions)["mean"] == pytest.approx(positions * kl, rel=1e-12)
    assert estimator_stats("k2", q, p, positions)["mean"] == pytest.approx(
        (positions * v + positions**2 * m**2) / 2, rel=1e-12
    )
    assert kl_divergences(q, p, positions)[KL_QP] == pytest.approx(positions * kl, rel=1e-12)


def test_sequence_moments_of_powers_factorise():
    q, p = Gaussian(0.0, 1.0), Gaussian(0.4, 1.2)
    one = estimator_stats("rev_k2", q, p)
    three = estimator_stats("rev_k2", q, p, positions=3)
    assert three["mean"] == pytest.approx(1.0, rel=1e-13)
    assert three["second_moment"] == pytest.approx(one["second_moment"] ** 3, rel=1e-12)


# --- categorical -------------------------------------------------------------------------------------

CATEGORICAL_PAIRS = [
    ([0.0, 1.0, -0.5, 2.0, 0.3], [0.5, -1.0, 0.0, 1.5, 0.0]),
    ([2.0, -3.0, 0.0, 0.1], [-1.0, 0.5, 0.2, 2.5]),
]


def _brute_force(q_logits, p_logits, function):
    q = np.exp(q_logits) / np.sum(np.exp(q_logits))
    p = np.exp(p_logits) / np.sum(np.exp(p_logits))
    return sum(q[i] * function(math.log(p[i] / q[i])) for i in range(len(q)))


@pytest.mark.parametrize("name", list(BUILTINS))
@pytest.mark.parametrize("logits", CATEGORICAL_PAIRS)
def test_categorical_moments_equal_brute_force_sums(logits, name):
    q, p = Categorical(logits[0]), Categorical(logits[1])
    estimator = get_estimator(name)

    def k(t):
        return float(estimator.numeric(np.array(t)))

    s = estimator_stats(name, q, p)
    assert s["method"] == "exact_sum"
    mean = _brute_force(*logits, k)
    assert s["mean"] == pytest.approx(mean, rel=1e-13)
    assert s["second_moment"] == pytest.approx(_brute_force(*logits, lambda t: k(t) ** 2), rel=1e-13)
    assert s["std"] == pytest.approx(math.sqrt(_brute_force(*logits, lambda t: (k(t) - mean) ** 2)), rel=1e-12)
    assert s["prob_negative"] == pytest.approx(_brute_force(*logits, lambda t: float(k(t) < 0)), abs=1e-15)


@pytest.mark.parametrize("logits", CATEGORICAL_PAIRS)
def test_categorical_kl_equals_brute_force(logits):
    kl = kl_divergences(Categorical(logits[0]), Categorical(logits[1]))
    assert kl[KL_QP] == pytest.approx(_brute_force(*logits, lambda t: -t), rel=1e-13)
    assert kl[KL_PQ] == pytest.approx(_brute_force(*logits, lambda t: math.exp(t) * t), rel=1e-13)


def _logit_finite_difference(function, logits, h=1e-6):
    logits = np.asarray(logits, float)
    out = np.zeros_like(logits)
    for j in range(logits.size):
        step = np.eye(logits.size)[j] * h
        out[j] = (function(logits + step) - function(logits - step)) / (2 * h)
    return out


@pytest.mark.parametrize("name", ["k1", "k2", "k3", "k4", "rev_k1", "rev_k2", "k3+"])
@pytest.mark.parametrize("logits", CATEGORICAL_PAIRS)
def test_categorical_gradients_equal_finite_differences(logits, name):
    q, p = Categorical(logits[0]), Categorical(logits[1])
    estimator = get_estimator(name)
    surrogate = from_formula(str(estimator.surrogate))

    def loss_objective(moved):  # q fixed as sampler, ratio uses the moved logits
        t = p.log_probs - Categorical(moved).log_probs
        return float(np.sum(q.probs * surrogate.numeric(t)))

    def reward_objective(moved):  # sampler moves, ratio fixed
        return float(np.sum(Categorical(moved).probs * estimator.numeric(p.log_probs - q.log_probs)))

    np.testing.assert_allclose(
        estimator_gradient(name, q, p, "loss"), _logit_finite_difference(loss_objective, q.logits), rtol=1e-7, atol=1e-9
    )
    np.testing.assert_allclose(
        estimator_gradient(name, q, p, "reward"),
        _logit_finite_difference(reward_objective, q.logits),
        rtol=1e-7,
        atol=1e-9,
    )


@pytest.mark.parametrize("logits", CATEGORICAL_PAIRS)
def test_categorical_true_gradients_equal_finite_differences(logits):
    q, p = Categorical(logits[0]), Categorical(logits[1])
    grads = true_gradients(q, p)
    for label in (KL_QP, KL_PQ):
        fd = _logit_finite_difference(lambda moved, label=label: kl_divergences(Categorical(moved), p)[label], q.logits)
        np.testing.assert_allclose(grads[label], fd, rtol=1e-7, atol=1e-9)


def test_categorical_zero_probability_tokens():
    """p = 0 where q > 0: KL(q||p) = inf and k1, k3 are inf there; q = 0 where p > 0: KL(p||q) = inf."""
    q, p = Categorical([0.0, 0.0, -np.inf]), Categorical([0.0, -np.inf, 0.0])
    kl = kl_divergences(q, p)
    assert kl[KL_QP] == math.inf and kl[KL_PQ] == math.inf
    assert estimator_stats("k1", q, p)["mean"] == math.inf
    # r log r -> 0 as r -> 0 and r = 1 on token 0: rev_k1's mean is 0, blind to p's mass outside q's support
    assert estimator_stats("rev_k1", q, p)["mean"] == 0.0
    assert np.isnan(true_gradients(q, p)[KL_QP]).all()


@pytest.mark.parametrize("positions", [2, 3])
@pytest.mark.parametrize("name", ["k1", "k3", "k4", "rev_k1"])
def test_categorical_sequences_equal_brute_force_enumeration(name, positions):
    q_logits, p_logits = CATEGORICAL_PAIRS[1]
    q, p = Categorical(q_logits), Categorical(p_logits)
    estimator = get_estimator(name)
    import itertools

    mean = second = 0.0
    for seq in itertools.product(range(q.size), repeat=positions):
        prob = math.prod(q.probs[i] for i in seq)
        t = sum(p.log_probs[i] - q.log_probs[i] for i in seq)
        k = float(estimator.numeric(np.array(t)))
        mean += prob * k
        second += prob * k * k
    s = estimator_stats(name, q, p, positions)
    assert s["mean"] == pytest.approx(mean, rel=1e-12)
    assert s["second_moment"] == pytest.approx(second, rel=1e-12)
    assert kl_divergences(q, p, positions)[KL_QP] == pytest.approx(positions * kl_divergences(q, p)[KL_QP])


def test_large_vocabulary_is_vectorised():
    rng = np.random.default_rng(0)
    q, p = Categorical(rng.normal(size=1_000_000)), Categorical(rng.normal(size=1_000_000))
    s = estimator_stats("k3", q, p)
    assert s["mean"] == pytest.approx(kl_divergences(q, p)[KL_QP], rel=1e-9)
    assert estimator_gradient("k3", q, p, "loss").shape == (1_000_000,)


# --- bad input -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: estimator_stats("k3", Gaussian(0, 1), Categorical([0.0, 1.0])), "same family"),
        (lambda: estimator_stats("k3", Categorical([0.0, 1.0]), Categorical([0.0, 1.0, 2.0])), "vocabulary size"),
        (
            lambda: estimator_stats("k4", Gaussian(0, 1), Gaussian(1, 1), method="closed_form"),
            "no Gaussian closed form",
        ),
        (lambda: estimator_stats("k3", Gaussian(0, 1), Gaussian(1, 1), positions=0), "positive integer"),
        (lambda: estimator_gradient("k3", Gaussian(0, 1), Gaussian(1, 1), "bogus"), "unknown gradient mode"),
        (lambda: estimator_stats(control_variate(), Gaussian(0, 1), Gaussian(1, 1)), "free parameters"),
    ],
)
def test_bad_input_gives_one_clear_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_summary_has_the_cli_contract_keys():
    summary = exact_summary(Gaussian(0, 1), Gaussian(1, 1), ["k1", "k4"])
    assert set(summary["kl"]) == {KL_QP, KL_PQ}
    for stats_ in summary["estimators"].values():
        assert {"mean", "std", "second_moment", "prob_negative", "method", "bias"} <= set(stats_)
    assert summary["estimators"]["k4"]["method"] == "quadrature"
    assert set(MODES) == {"loss", "reward", "full"}


def test_quadrature_terminates_when_rounding_noise_dominates():
    """A tiny divergence computed by cancellation used to split intervals forever (Jensen-Shannon, delta=1e-3)."""
    from klsym.derive.estimators import bregman

    stats = estimator_stats(bregman("jensen_shannon"), Gaussian(0, 1), Gaussian(0.001, 1.00025))
    assert stats["method"] == "quadrature" and stats["prob_negative"] == 0.0
    assert 0 < stats["mean"] < 1e-6  # ~ f''(1)/2 * theta^T F theta = 1/4 * (1e-6 + 2 * 0.00025**2)


def test_prob_negative_at_a_triple_root():
    """(r - 1)^3 changes sign at r = 1 with a triple root; brentq may not converge, the grid cell bounds it."""
    from klsym.derive.estimators import from_formula

    q, p = Gaussian(0, 1), Gaussian(0.003, 1)
    stats = estimator_stats(from_formula("(r - 1)**3"), q, p)
    # k < 0 exactly where t < 0, i.e. x < delta/2: probability Phi(0.0015)
    from scipy.special import ndtr

    assert abs(stats["prob_negative"] - ndtr(0.0015)) < 1e-3
