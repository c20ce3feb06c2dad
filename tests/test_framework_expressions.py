"""Every crosswalk row's expression: its derived expected gradient against finite differences of the expected
per-token loss (detached arguments held at theta_0), near q and far from q where every clamp bites."""

import numpy as np
import pytest
from scipy.special import log_softmax

from klsym.exact.expectations import KL_PQ, KL_QP, true_gradients
from klsym.exact.families import Categorical
from klsym.rl import expressions as ex
from klsym.rl.frameworks import crosswalk, get_setting, load_settings
from klsym.rl.offpolicy import exact_expression

SETTINGS = load_settings()
V = 7
LOGITS_Q = np.random.default_rng(13).normal(size=V)
# t = log p - log q per token before p's renormalisation: far reaches |t| > 40 on both sides (every clamp bites)
T_NEAR = np.array([0.3, -0.2, 0.1, 0.05, -0.25, 0.15, -0.1])
T_FAR = np.array([-47.0, -15.0, -4.0, 0.2, 3.0, 12.0, 45.0])
LOGITS_B_SHIFT = np.array([0.4, -0.3, 0.2, 0.0, -0.5, 0.3, 0.1])


def _triple(shift, off_policy):
    q = Categorical(LOGITS_Q)
    p = Categorical(q.log_probs + shift)
    b = Categorical(LOGITS_Q + LOGITS_B_SHIFT) if off_policy else q
    return q, p, b


def _expected_loss(setting, theta, q0, p, b):
    """E_{x~b}[L(log q_theta(x); sg at theta_0)] by brute force: a sum over the V tokens, b and p fixed."""
    loss = ex.numeric(ex.surrogate(setting.expr, setting.enters))
    lq = log_softmax(theta)
    return float(np.sum(b.probs * loss(lq, p.log_probs, b.log_probs, q0.log_probs)))


def _finite_difference(setting, q, p, b, step=1e-6):
    grad = np.zeros(V)
    for j in range(V):
        e = np.zeros(V)
        e[j] = step
        grad[j] = (_expected_loss(setting, LOGITS_Q + e, q, p, b) - _expected_loss(setting, LOGITS_Q - e, q, p, b)) / (
            2 * step
        )
    return grad


@pytest.mark.parametrize("distance", ["near", "far"])
@pytest.mark.parametrize("off_policy", [False, True], ids=["b=q", "b!=q"])
@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: s.key)
def test_derived_gradient_matches_finite_differences(setting, distance, off_policy):
    q, p, b = _triple(T_NEAR if distance == "near" else T_FAR, off_policy)
    derived = exact_expression(setting.expr, setting.enters, q, p, b)["gradient"]
    fd = _finite_difference(setting, q, p, b)
    # central differences of a sum of size |F| carry a rounding error ~ eps |F| / step
    rounding = 1e3 * np.finfo(float).eps * abs(_expected_loss(setting, LOGITS_Q, q, p, b)) / 1e-6
    scale = max(np.abs(derived).max(), 1e-3)
    assert np.allclose(derived, fd, rtol=1e-5, atol=max(1e-6 * scale, rounding)), (derived, fd)


def _t(q, p):
    return p.log_probs - q.log_probs


@pytest.mark.parametrize("setting", [s for s in SETTINGS if ex.clamp_nodes(s.expr)], ids=lambda s: s.key)
def test_far_pair_puts_tokens_in_every_clamp_region_and_near_pair_in_none(setting):
    q, p_far, _ = _triple(T_FAR, False)
    _, p_near, _ = _triple(T_NEAR, False)
    region = ex.clamp_region(setting.expr)

    def in_region(values):
        return np.array([any(lo < v < hi for lo, hi in region) for v in values])

    assert in_region(_t(q, p_far)).any() and not in_region(_t(q, p_near)).any()
    # each clamp node is active on some far token (the test exercises every clamp)
    for node in ex.clamp_nodes(setting.expr):
        argument = ex.numeric(node.args[0])(q.log_probs, p_far.log_probs, q.log_probs)
        lo, hi = float(node.args[1]), float(node.args[2])
        assert np.any((argument < lo) | (argument > hi)), node


@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: s.key)
def test_named_gradient_divergence_is_the_exact_gradient_on_policy(setting):
    row = crosswalk(setting, answers=False)  # the divergence columns only: no reference-problem answers
    label = row["gradient_divergence"]
    q, p, b = _triple(T_NEAR, False)
    derived = exact_expression(setting.expr, setting.enters, q, p, b)["gradient"]
    truth = true_gradients(q, p)
    if label in (KL_QP, KL_PQ):
        assert np.allclose(derived, truth[label], rtol=1e-10, atol=1e-13)
    elif label == "zero":
        assert np.allclose(derived, 0.0, atol=1e-13)
    else:  # no divergence claimed: it must then follow neither KL
        assert not np.allclose(derived, truth[KL_QP], rtol=1e-6) and not np.allclose(derived, truth[KL_PQ], rtol=1e-6)


def test_nemo_rl_clamp_after_weight_kills_both_gradient_parts():
    setting = get_setting("nemo-rl", "loss")
    coefficient = ex.numeric(ex.coefficient(setting.expr))
    lq = np.array([0.0, 0.0, 0.0])
    lp = np.array([3.0, -12.0, 1.0])  # k3 > 10 at t = 3 and t = -12; t = 1 is inside
    c = coefficient(lq, lp, lq)
    assert c[0] == 0.0 and c[1] == 0.0
    assert c[2] == pytest.approx(-1.0)  # 1 - r + k3 = -t on-policy, unclamped
    # the superseded model clamp(k3) * w kept the score part (the clamped value 10) there
    old = ex.parse_expression("clamp(exp(logp - logq) - 1 - (logp - logq), -10, 10) * exp(logq - sg(logq))")
    assert ex.numeric(ex.coefficient(old))(lq, lp, lq)[0] == pytest.approx(10.0)
    # far from q the two models' expected gradients differ by order 100%
    q, p, b = _triple(T_FAR, False)
    new = exact_expression(setting.expr, "loss", q, p, b)["gradient"]
    superseded = exact_expression(old, "loss", q, p, b)["gradient"]
    assert np.linalg.norm(new - superseded) / np.linalg.norm(superseded) > 0.5


@pytest.mark.parametrize(
    "key, estimator, mode, clamps",
    [
        ("verl/kl_loss", "k3", "loss", (20.0, 10.0)),
        ("verl/kl_loss_k3+", "k3+", "loss", (20.0, 10.0)),
        ("nemo-rl/loss", "k3", "full", (20.0, 10.0)),
        ("trl-grpo/bias_correction", "k3", "full", (None, None)),
        ("open-instruct/kl3", "k3", "loss", (40.0, None)),
        ("open-instruct/kl4", "k1", "full", (40.0, None)),
        ("openrlhf/reward", "k1", "reward", (None, 10.0)),
        ("nemo-aligner/ppo", "Abs(log(r))", "reward", (None, None)),
    ],
)
def test_structured_fields_are_derived_from_the_expression(key, estimator, mode, clamps):
    setting = get_setting(*key.split("/"))
    assert (setting.estimator, setting.mode, (setting.input_clamp, setting.output_clamp)) == (estimator, mode, clamps)


def test_data_corrections():
    assert get_setting("roll", "reward").enabled_by_default is False
    assert "add_token_level_kl" in get_setting("roll", "reward").default_flags
    assert "GAE" in get_setting("nemo-rl", "reward").placement
    assert (
        "importance_sampling_level='token'" in get_setting("trl-grpo", "bias_correction").notes.replace('"', "'")
        or "token" in get_setting("trl-grpo", "bias_correction").offpolicy
    )


@pytest.mark.parametrize(
    "text, needle",
    [
        ("__import__('os')", "not allowed"),
        ("logq.real", "attribute access is not allowed"),
        ("clamp(logq, logp, 1)", "bounds"),
        ("logx + 1", "unknown name"),
        ("exp(logq, 2)", "takes exactly one argument"),
        ("", "expression is empty"),
    ],
)
def test_bad_expressions_get_one_clear_error(text, needle):
    with pytest.raises(ex.ExpressionError, match=needle):
        ex.parse_expression(text)


def test_cli_framework_shows_the_expression_and_off_policy_weighting(capsys):
    import json

    from klsym.cli import main

    assert main(["framework", "trl-grpo", "--setting", "bias_correction", "--format", "json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["expression"].startswith("exp(logq - logb)") and out["enters"] == "loss"
    assert out["offpolicy_weighting"] == "token-is-differentiable" and out["mode"] == "full"
