"""The framework crosswalk: data integrity, clamp regions, derived divergences, sequence-level placement and what it
follows, where training converges, CLI contract."""

import json
import math
import subprocess
import sys

import numpy as np
import pytest
from scipy.special import lambertw

from klsym.cli import main
from klsym.exact.autoregressive import prefix_sums, score_gradient, to_go
from klsym.paths import ROOT
from klsym.rl import expressions as ex
from klsym.rl import fixedpoint as fp
from klsym.rl import sequences as seq
from klsym.rl.frameworks import (
    AGGREGATIONS,
    FRAMEWORKS_FILE,
    MODES,
    converges_to,
    crosswalk,
    expression_term,
    framework_names,
    get_setting,
    load_settings,
    sequence_answer,
    sequence_placement,
    sequence_reference,
)

SETTINGS = load_settings()
REQUIRED_FRAMEWORKS = {
    "verl",
    "openrlhf",
    "trl-grpo",
    "trl-ppo",
    "trl-rloo",
    "nemo-rl",
    "slime",
    "roll",
    "open-instruct",
    "areal",
}


def test_every_required_framework_is_present():
    assert REQUIRED_FRAMEWORKS <= set(framework_names())


@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: s.key)
def test_row_is_complete_and_cited(setting):
    assert setting.mode in MODES
    assert setting.get_estimator().expr is not None
    assert "/" in setting.repo and setting.file and setting.commit
    assert setting.verified == "code" and setting.checked
    # re-read at the cited commit itself
    assert len(setting.verified_at_commit) == 40 and setting.verified_at_commit.startswith(setting.commit)
    # A straight-through row is one whose expression has a stop-gradient but no importance weight.
    assert setting.straight_through == (setting.expr.has(ex.sg) and not ex.weights(setting.expr))


def _clamped_k3(t, a, c):
    # Written out independently of klsym: verl's formula with r = exp(t).
    t = np.clip(t, -a, a)
    return np.clip(np.exp(t) - 1 - t, -c, c)


def test_verl_k3_region_matches_lambert_w():
    # e^t - 1 - t = c  <=>  t = -(c + 1) - W_k(-e^{-(c+1)}), k = 0 (lower root) and -1 (upper root).
    c = 10.0
    lower = -(c + 1) - lambertw(-math.exp(-(c + 1)), 0).real
    upper = -(c + 1) - lambertw(-math.exp(-(c + 1)), -1).real
    row = crosswalk(get_setting("verl", "kl_loss"), derive=False)
    (lo_a, lo_b), (hi_a, hi_b) = row["clamp_region_intervals"]
    assert lo_a == -math.inf and hi_b == math.inf
    assert lo_b == pytest.approx(lower, rel=1e-12) and hi_a == pytest.approx(upper, rel=1e-12)
    assert upper == pytest.approx(2.611, abs=1e-3)  # the reference file's rounded value
    # The clamped value is flat inside the region and moves outside it.
    eps = 1e-6
    for inside in (upper + 0.5, lower - 0.5, 30.0, -30.0):
        assert _clamped_k3(inside + eps, 20, c) == _clamped_k3(inside - eps, 20, c)
    for outside in (upper - 0.01, lower + 0.01, 0.5):
        assert _clamped_k3(outside + eps, 20, c) != _clamped_k3(outside - eps, 20, c)


@pytest.mark.parametrize("setting", [s for s in SETTINGS if s.input_clamp or s.output_clamp], ids=lambda s: s.key)
def test_region_is_where_the_clamped_value_is_flat(setting):
    k = setting.get_estimator().numeric
    a = setting.input_clamp or np.inf
    c = setting.output_clamp or np.inf
    intervals = crosswalk(setting, derive=False)["clamp_region_intervals"]
    grid = np.linspace(-60, 60, 24001)
    inside = np.zeros_like(grid, dtype=bool)
    for lo, hi in intervals:
        inside |= (grid > float(lo)) & (grid < float(hi))
    step = 1e-7
    clamped = lambda t: np.clip(k(np.clip(t, -a, a)), -c, c)  # noqa: E731
    flat = (clamped(grid + step) == clamped(grid)) & (clamped(grid - step) == clamped(grid))
    away = np.ones_like(inside)
    for lo, hi in intervals:  # grid points within 1e-6 of an edge are ambiguous
        for edge in (float(lo), float(hi)):
            if math.isfinite(edge):
                away &= np.abs(grid - edge) > 1e-6
    assert np.array_equal(flat[away], inside[away])


# Implied gradient divergence of each framework's default, from the gradient-mode algebra
# (E_q[grad k1] = 0; reward of k1 and full of k3 are grad KL(q||p); loss of k3 is grad KL(p||q)).
EXPECTED_DEFAULT_GRADIENT = {
    "verl": "KL(p||q)",
    "openrlhf": "KL(q||p)",
    "trl-grpo": "KL(p||q)",
    "trl-ppo": "KL(q||p)",
    "trl-rloo": "KL(q||p)",
    "nemo-rl": "KL(q||p)",
    "slime": "zero",
    "roll": "KL(q||p)",
    "open-instruct": "KL(p||q)",
    "areal": "KL(q||p)",
}


@pytest.mark.parametrize("framework", sorted(EXPECTED_DEFAULT_GRADIENT))
def test_default_setting_divergences(framework):
    row = crosswalk(get_setting(framework))
    assert row["value_divergence"] == "KL(q||p)"
    assert row["gradient_divergence"] == EXPECTED_DEFAULT_GRADIENT[framework]


def test_straight_through_follows_k2_gradient():
    row = crosswalk(get_setting("verl", "kl_loss_k3+"))
    assert row["gradient_divergence"] == "KL(q||p)"
    assert "unclamped" in row["clamp_effect"] and "straight-through" in row["clamp_effect"]


def test_cli_json(capsys):
    assert main(["framework", "verl", "--format", "json"]) == 0
    out = json.loads(capsys.readouterr().out)
    for key in ("expr", "mode", "value_divergence", "gradient_divergence", "clamp_region", "citation"):
        assert key in out
    assert out["clamp_region_intervals"][0][0] == "-inf"


def test_cli_list_names_every_setting(capsys):
    assert main(["framework", "--list", "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {(r["framework"], r["setting"]) for r in rows} == {(s.framework, s.setting) for s in SETTINGS}


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["framework", "nosuch"], "known: verl, openrlhf"),
        (["framework", "verl", "--setting", "nosuch"], "settings: kl_loss"),
        (["framework"], "--list"),
    ],
)
def test_cli_errors_are_one_line(argv, needle):
    proc = subprocess.run([sys.executable, "-m", "klsym", *argv], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("klsym: error:")
    assert needle in proc.stderr


def test_data_file_has_one_default_per_framework():
    rows = json.loads(FRAMEWORKS_FILE.read_text())["rows"]
    for name in framework_names():
        assert sum(r["default"] for r in rows if r["framework"] == name) == 1


# --- sequence level (issue 12) and training end point (issue 14) ----------------------------------------------

PQP, PPQ = "partial KL(q||p)", "partial KL(p||q)"
# The sequence-level math (klsym.rl.sequences): k1 as a per-token reward with reward-to-go, or summed into one
# sequence reward, follows grad KL(q||p) of the sequence; a per-token loss at best the partial gradient (states
# held fixed): k3 in the loss of KL(p||q), k2 (or k3 with a per-token weight exp(logq - sg logq)) of KL(q||p);
# k1 in the loss has zero expected gradient; |k1| (NeMo-Aligner) follows no KL.
EXPECTED_DEFAULT_SEQUENCE = {
    "verl": ("loss", PPQ),
    "openrlhf": ("reward-to-go", "KL(q||p)"),
    "trl-grpo": ("loss", PPQ),
    "trl-ppo": ("reward-to-go", "KL(q||p)"),
    "trl-rloo": ("sequence-reward", "KL(q||p)"),
    "nemo-rl": ("loss+reward", PQP),
    "nemo-aligner": ("reward-to-go", None),
    "slime": ("loss", "zero"),
    "roll": ("reward-to-go", "KL(q||p)"),
    "open-instruct": ("loss", PPQ),
    "areal": ("reward-to-go", "KL(q||p)"),
}


def test_expected_sequence_table_covers_every_framework():
    assert set(EXPECTED_DEFAULT_SEQUENCE) == set(framework_names())


@pytest.mark.parametrize("framework", sorted(EXPECTED_DEFAULT_SEQUENCE))
def test_default_sequence_answer(framework):
    answer = sequence_answer(get_setting(framework))
    assert (answer["placement"], answer["follows"]) == EXPECTED_DEFAULT_SEQUENCE[framework]


def _expression_sequence_gradient(setting, q, p):
    """Exact expected sequence gradient from the row's own expression (clamps and weights included, b = q)."""
    t = p.log_probs - q.log_probs
    zeros = np.zeros_like(t)
    if setting.enters == "loss":  # each token's coefficient dL/dlogq on its own score
        return score_gradient(q, q.prefix_probs, ex.numeric(ex.coefficient(setting.expr, "loss"))(zeros, t, zeros))
    k = ex.numeric(setting.expr)(zeros, t, zeros)
    weights = to_go(q, k)
    if setting.aggregation != "per-token":  # one sequence reward also weights by the penalty collected before
        weights = weights + prefix_sums(q, k)[:, None]
    return score_gradient(q, q.prefix_probs, weights)


@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: s.key)
def test_sequence_follows_is_the_expressions_own_gradient(setting):
    """The label (from the identified estimator in the derived placement) against the expression itself."""
    q, p, references = sequence_reference()
    gradient = _expression_sequence_gradient(setting, q, p)
    label = sequence_answer(setting)["follows"]
    scale = max(np.linalg.norm(r) for r in references.values())
    if label == "zero":
        assert np.linalg.norm(gradient) < 1e-10 * scale
    elif label is None:
        assert all(np.linalg.norm(gradient - r) > 1e-3 * scale for r in references.values())
    else:
        assert np.linalg.norm(gradient - references[label]) < 1e-10 * np.linalg.norm(references[label])


@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: s.key)
def test_sequence_placement_agrees_with_the_sequences_module(setting):
    where = sequence_placement(setting)
    assert setting.aggregation in AGGREGATIONS[setting.enters]
    mode = "reward" if setting.enters == "reward" else setting.mode
    assert where["placement"] == seq.placement_of_setting(mode, setting.aggregation, weight="per-token")
    assert (where["weight"] == "per-token") == (setting.mode == "full")
    q, p, _ = sequence_reference()
    answer = seq.sequence_answer(setting.get_estimator(), mode, setting.aggregation, q, p)
    assert answer["follows"] == sequence_answer(setting)["follows"]


def test_nemo_aligner_signed_k1_split_by_trainer():
    ppo, reinforce = get_setting("nemo-aligner", "ppo_signed"), get_setting("nemo-aligner", "reinforce_signed")
    assert ppo.expr == reinforce.expr and (ppo.aggregation, reinforce.aggregation) == ("per-token", "sequence-mean")
    assert [sequence_answer(s)["placement"] for s in (ppo, reinforce)] == ["reward-to-go", "sequence-reward"]
    assert sequence_placement(reinforce)["scale"] == "1/T"
    assert all(sequence_answer(s)["follows"] == "KL(q||p)" for s in (ppo, reinforce))


# Settings whose single-token expected gradient is grad KL(q||p): k1 as a reward, k2 or k3+ in the loss, k3 (or k1)
# with a differentiable weight (full); training must land on q* = p e^{R/beta}/Z.
FOLLOWS_KL_QP = [
    "verl/kl_loss_k3+",
    "verl/kl_in_reward",
    "openrlhf/reward",
    "openrlhf/loss_k2",
    "trl-grpo/bias_correction",
    "trl-ppo/default",
    "trl-rloo/default",
    "nemo-rl/loss",
    "nemo-rl/loss_on_policy_kl_approximation",
    "nemo-aligner/ppo_signed",
    "slime/k3_unbiased",
    "slime/low_var_kl_unbiased",
    "slime/reward",
    "roll/reward",
    "open-instruct/kl2",
    "open-instruct/kl4",
    "areal/reward",
]


def _setting(key):
    return get_setting(*key.split("/"))


def _expression_update(setting, probs):
    """Expected logit update E_q[R s] - beta E_q[c s] of the REFERENCE_PROBLEM with the expression's coefficient."""
    problem = fp.REFERENCE_PROBLEM
    t = np.log(problem.p) - np.log(probs)
    zeros = np.zeros_like(t)
    a = problem.reward - problem.beta * ex.numeric(ex.coefficient(setting.expr, setting.enters))(zeros, t, zeros)
    return probs * (a - probs @ a)


@pytest.mark.parametrize("key", FOLLOWS_KL_QP)
def test_settings_following_reverse_kl_converge_to_q_star(key):
    setting = _setting(key)
    assert crosswalk(setting, answers=False)["gradient_divergence"] == "KL(q||p)"
    problem = fp.REFERENCE_PROBLEM
    star = np.exp(np.log(problem.p) + problem.reward / problem.beta)
    star /= star.sum()
    assert np.abs(_expression_update(setting, star)).max() < 1e-12  # q* is a fixed point of the expression
    assert converges_to(setting) == "q* = p e^{R/beta}/Z"


@pytest.mark.parametrize("key", ["slime/kl_loss", "open-instruct/kl1"])
def test_k1_in_the_loss_collapses(key):
    setting = _setting(key)
    # k1 in the loss: dL/dlogq = 1 for every token, whose expected score is zero: no KL force at any q
    probs = np.array([0.2, 0.5, 0.3])
    assert (
        np.abs(
            _expression_update(setting, probs)
            - probs * (fp.REFERENCE_PROBLEM.reward - probs @ fp.REFERENCE_PROBLEM.reward)
        ).max()
        < 1e-15
    )
    assert converges_to(setting) == "collapse onto the reward maximiser(s)"


def test_k3_in_the_loss_ends_elsewhere():
    """k3 in the loss follows grad KL(p||q): an interior end point that is not q*."""
    phrase = converges_to(get_setting("verl"))
    assert phrase.startswith("interior") and not phrase.startswith("q*")


def test_cli_shows_the_sequence_and_converges_to_fields(capsys):
    assert main(["framework", "trl-rloo", "--format", "json"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert (row["aggregation"], row["sequence_placement"], row["sequence_follows"]) == (
        "sequence",
        "sequence-reward",
        "KL(q||p)",
    )
    assert row["converges_to"] == "q* = p e^{R/beta}/Z"
    assert main(["framework", "slime", "--format", "table"]) == 0
    out = capsys.readouterr().out
    assert "sequence_follows" in out and "collapse onto the reward maximiser(s)" in out


# Settings whose single-token expected gradient is grad KL(p||q) (k3 in the loss, clamps idle at the end point):
# stationarity of E_q[R] - beta KL(p||q) on the simplex is q_j (R_j - E_q[R] - beta) = -beta p_j (issue 14).
FOLLOWS_KL_PQ = [
    "verl/kl_loss",
    "openrlhf/loss_k3",
    "trl-grpo/default",
    "slime/low_var_kl",
    "roll/kl_loss",
    "open-instruct/kl3",
]


@pytest.mark.parametrize("key", FOLLOWS_KL_PQ)
def test_settings_following_forward_kl_end_on_its_closed_form(key):
    setting = _setting(key)
    assert crosswalk(setting, answers=False)["gradient_divergence"] == "KL(p||q)"
    problem = fp.REFERENCE_PROBLEM
    point = fp.fixed_point(problem, expression_term(setting), setting.mode)
    q, R, p, beta = point["probs"], problem.reward, problem.p, problem.beta
    np.testing.assert_allclose(q * (R - q @ R - beta), -beta * p, atol=1e-10)
    assert np.abs(_expression_update(setting, q)).max() < 1e-10  # and it is the expression's own fixed point
    assert converges_to(setting).startswith("interior") and point["distance_to_optimum"] > 1e-3


def test_sequence_reference_is_the_documented_pair():
    from klsym.exact.autoregressive import Autoregressive

    q, p, references = sequence_reference()
    expected_p = Autoregressive.random(3, 3, seed=0)
    np.testing.assert_array_equal(p.logits, expected_p.logits)
    np.testing.assert_array_equal(q.logits, expected_p.perturbed(0.5, seed=1).logits)
    assert set(references) == set(seq.FOLLOWS_ORDER)
    row = crosswalk(get_setting("verl"), derive=False, answers=True)
    assert "T = 3 over V = 3" in row["sequence_reference"] and "beta = 0.5" in row["converges_to_reference"]


def test_expression_term_weight_is_the_expressions_coefficient_in_the_clamp_region():
    """NeMo-RL clamps w*k3: where the output clamp bites the token's coefficient is 0 (a clamp(k3) in full mode
    would keep the capped score part, 10); inside, it is k3's full-mode coefficient -k3'(t) + k3(t) = -t."""
    term = expression_term(get_setting("nemo-rl"))
    t = np.array([3.0, -12.0, 1.0, -0.5])  # k3(3) = e^3 - 4 > 10 and k3(-12) = 11 + e^-12 > 10: clamped
    expected = np.where(np.abs(np.expm1(t) - t) > 10, 0.0, -np.expm1(t) + (np.expm1(t) - t))
    np.testing.assert_allclose(term.weight(t), expected, rtol=1e-14, atol=0)
