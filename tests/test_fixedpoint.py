"""Where KL-regularised training ends up: fixed points against closed forms derived here, simulations
against the predicted end point (tolerances from their noise), the CLI contract and bad input.

Closed forms (softmax policy, expected update u_j = q_j (a_j - E_q[a]), a_j = R_j - beta h(p_j / q_j)):

* grad KL(q||p) (h = 1 - log r + c): a_j = const  <=>  q_j = p_j e^{R_j/beta} / Z  (q*).
* grad KL(p||q) (h = -r + c): R_j + beta p_j / q_j = lambda; summing q_j (lambda - R_j) = beta p_j over j gives
  lambda = E_q[R] + beta, hence q_j (R_j - E_q[R] - beta) = -beta p_j.
* grad 2 KL(q||p) (k1+ full): q_j = p_j e^{R_j/(2 beta)} / Z.
* zero gradient (k1 loss, rev_k2 full): u = E_q[R s], pure reward ascent: q -> the reward maximiser.
* Jacobian at the KL(q||p) optimum: J = -beta (diag(q) - q q^T) (the Fisher matrix of the softmax), whose
  nonzero eigenvalues are the ones reported.
"""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import sympy as sp

from klsym.cli import main
from klsym.derive.symbols import r
from klsym.exact.autoregressive import Autoregressive
from klsym.exact.expectations import estimator_gradient
from klsym.exact.families import Categorical
from klsym.rl import fixedpoint as fp
from klsym.rl.sequences import true_gradients

PROBLEMS = [
    fp.REFERENCE_PROBLEM,
    fp.FixedPointProblem(np.log([0.05, 0.15, 0.8]), [1.0, 0.2, 0.0], 0.3),
    fp.FixedPointProblem([0.3, -1.0, 0.0, 2.0, -0.5], [0.1, 0.9, -0.4, 0.0, 0.5], 2.0),
]
FORWARD = [
    ("k1", "reward"),
    ("k1", "full"),
    ("k2", "loss"),
    ("k3", "full"),
    ("k1+", "loss"),
    ("k1+", "reward"),
    ("k3+", "loss"),
]
REVERSE = [("k3", "loss"), ("rev_k1", "full"), ("rev_k2", "loss"), ("rev_k3", "full")]
ZERO = [("k1", "loss"), ("rev_k2", "full")]


def closed_form_optimum(problem, scale=1.0):
    weights = problem.p * np.exp(problem.reward / (scale * problem.beta))
    return weights / weights.sum()


@pytest.mark.parametrize("problem", PROBLEMS, ids=["reference", "reward-on-rare", "V5"])
@pytest.mark.parametrize("estimator,mode", FORWARD)
def test_modes_that_follow_grad_kl_qp_land_on_q_star(problem, estimator, mode):
    point = fp.fixed_point(problem, estimator, mode)
    assert point["status"] == "interior" and point["equals_optimum"] and point["stable"]
    np.testing.assert_allclose(point["probs"], closed_form_optimum(problem), rtol=1e-10, atol=1e-14)
    assert point["distance_to_optimum"] < 1e-12
    assert np.abs(fp.expected_update(problem, np.log(point["probs"]), estimator, mode)).max() < 1e-12


@pytest.mark.parametrize("problem", PROBLEMS, ids=["reference", "reward-on-rare", "V5"])
@pytest.mark.parametrize("estimator,mode", REVERSE)
def test_modes_that_follow_grad_kl_pq_satisfy_their_condition(problem, estimator, mode):
    point = fp.fixed_point(problem, estimator, mode)
    q, R, beta = point["probs"], problem.reward, problem.beta
    np.testing.assert_allclose(q * (R - q @ R - beta), -beta * problem.p, rtol=0, atol=1e-12)
    assert point["status"] == "interior" and point["stable"] and not point["equals_optimum"]
    assert point["distance_to_optimum"] > 1e-6
    assert point["follows"] == "KL(p||q)"


@pytest.mark.parametrize("problem", PROBLEMS, ids=["reference", "reward-on-rare", "V5"])
def test_straight_through_k1_in_full_mode_follows_twice_kl(problem):
    point = fp.fixed_point(problem, "k1+", "full")
    np.testing.assert_allclose(point["probs"], closed_form_optimum(problem, scale=2.0), rtol=1e-10)
    assert not point["equals_optimum"]


@pytest.mark.parametrize("problem", PROBLEMS, ids=["reference", "reward-on-rare", "V5"])
@pytest.mark.parametrize("estimator,mode", ZERO)
def test_zero_kl_gradient_collapses_onto_the_reward_maximiser(problem, estimator, mode):
    point = fp.fixed_point(problem, estimator, mode)
    vertex = (problem.reward == problem.reward.max()).astype(float)
    assert point["status"] == "collapse" and point["stable"]
    np.testing.assert_array_equal(point["probs"], vertex)
    assert point["reward"] == problem.reward.max()
    assert point[fp.KL_QP] == pytest.approx(-np.log(problem.p[vertex == 1][0]), rel=1e-12)


def test_collapse_splits_between_tied_maximisers():
    problem = fp.FixedPointProblem(np.log([0.4, 0.4, 0.2]), [1.0, 1.0, 0.0], 0.5)
    point = fp.fixed_point(problem, "k1", "loss")
    assert point["status"] == "collapse"
    assert point["probs"][2] == 0 and point["probs"][0] == pytest.approx(0.5, abs=1e-9)  # symmetric start


def test_equal_rewards_and_no_restoring_force_leave_q_at_p():
    # every token maximises the reward and the KL gradient is zero: the update vanishes, q = p throughout
    problem = fp.FixedPointProblem(np.log([0.5, 0.3, 0.2]), [0.5, 0.5, 0.5], 0.5)
    point = fp.fixed_point(problem, "rev_k2", "full")
    assert point["status"] == "collapse"
    np.testing.assert_allclose(point["probs"], problem.p, rtol=1e-12)
    np.testing.assert_allclose(point["eigenvalues"], [0.0, 0.0], atol=1e-9)  # neutral: every point is fixed


def test_reward_mode_k3_runs_away_from_the_reward_maximiser():
    # h = r - 1 - log r >= 0 penalises both directions and is flat at r = 1: the token that stays nearest
    # to p wins. At beta = 3 the dynamics end on the middle token, which does not maximise the reward.
    problem = fp.FixedPointProblem(np.log([0.5, 0.3, 0.2]), [0.0, 0.5, 1.0], 3.0)
    point = fp.fixed_point(problem, "k3", "reward")
    assert point["status"] == "diverges" and not point["stable"]
    np.testing.assert_array_equal(point["probs"], [0.0, 1.0, 0.0])
    path = fp.expected_ascent(problem, "k3", "reward", lr=0.5, steps=4000)
    assert path[-1, 1] > 0.99  # discrete ascent agrees with the integrated dynamics


def test_a_boundary_point_is_not_a_collapse():
    # k2 in full mode at the reference problem: token 0 (R = 0) dies out, tokens 1 and 2 settle inside their
    # edge. Not a collapse (the reward maximiser alone); the point and its eigenvalue live on that edge.
    problem = fp.REFERENCE_PROBLEM
    point = fp.fixed_point(problem, "k2", "full")
    q = point["probs"]
    assert point["status"] == "boundary" and q[0] == 0 and q[1:].min() > 0.1 and q.sum() == pytest.approx(1)
    assert fp.converges_to("k2", "full").startswith("boundary")
    # checked with the full-simplex update (not the face code): token 0 almost dead, the rest at q
    near = np.log(np.where(q > 0, q, np.exp(-40.0)))
    assert np.abs(fp.expected_update(problem, near, "k2", "full")).max() < 1e-12
    # the full Jacobian there is block triangular: the face eigenvalue is one of its eigenvalues
    (face,) = point["eigenvalues"]
    full = fp.update_jacobian(problem, near, fp.kl_term("k2", "full"))
    assert np.min(np.abs(full - face)) < 1e-6 * abs(face)
    assert point["stable"] is bool(face < 0)


def test_collapse_onto_a_vertex_has_no_face_eigenvalues():
    point = fp.fixed_point(fp.REFERENCE_PROBLEM, "k1", "loss")
    assert point["status"] == "collapse" and point["eigenvalues"] == [] and point["stable"] is True


def test_jacobian_at_q_star_is_minus_beta_times_the_fisher_matrix():
    problem = PROBLEMS[2]
    point = fp.fixed_point(problem, "k3", "full")
    q = point["probs"]
    fisher = np.diag(q) - np.outer(q, q)
    expected = np.sort(np.linalg.eigvalsh(-problem.beta * fisher))[:-1]  # drop the shift direction's 0
    np.testing.assert_allclose(np.sort(point["eigenvalues"]), expected, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize(
    "estimator,mode,phi",
    [
        ("k3", "loss", 1 - r),
        ("k1", "full", 1 - sp.log(r)),
        ("k2", "loss", 1 - sp.log(r)),
        ("rev_k2", "loss", -r),
        ("k1+", "full", -2 * sp.log(r)),
    ],
)
def test_stationarity_condition_by_sympy(estimator, mode, phi):
    condition = fp.stationarity_condition(estimator, mode)
    # phi is defined up to a constant (g up to a + b r), which the multiplier absorbs
    assert sp.simplify(sp.diff(condition["phi"] - phi, r)) == 0
    assert condition["convex"] and not condition["constant"]


def test_numeric_fixed_points_are_zeros_of_the_expected_update():
    for estimator, mode in [("k4", "loss"), ("rev_k1", "loss"), ("rev_k3", "loss")]:
        point = fp.fixed_point(fp.REFERENCE_PROBLEM, estimator, mode)
        assert point["status"] == "interior" and point["method"].startswith("numeric")
        update = fp.expected_update(fp.REFERENCE_PROBLEM, np.log(point["probs"]), estimator, mode)
        assert np.abs(update).max() < 1e-10
        assert point["stable"] == bool(np.all(np.real(point["eigenvalues"]) < 0))


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3", "k4", "rev_k1", "rev_k2", "rev_k3", "k1+", "k3+"])
@pytest.mark.parametrize("mode", ["loss", "reward", "full"])
def test_kl_gradient_is_the_exact_layer_estimator_gradient(estimator, mode):
    problem = PROBLEMS[2]
    for logits in (problem.p_logits, np.random.default_rng(1).normal(size=5), np.array([9.0, -8.0, 0.0, 3.0, -2.0])):
        expected = estimator_gradient(estimator, Categorical(logits), problem.reference, mode)
        np.testing.assert_allclose(
            fp.kl_gradient(problem, logits, fp.kl_term(estimator, mode)), expected, rtol=1e-12, atol=1e-15
        )


def test_expected_update_is_the_exact_layer_gradient_with_clamps_off():
    problem, logits = fp.REFERENCE_PROBLEM, np.array([0.3, -0.2, 0.1])
    q = np.exp(logits) / np.exp(logits).sum()
    by_hand = q * (problem.reward - q @ problem.reward)
    t = np.log(problem.p / q)
    h = 1 - np.exp(t)  # k3 loss: h = -r k'(r) = 1 - r
    by_hand -= problem.beta * q * (h - q @ h)
    np.testing.assert_allclose(fp.expected_update(problem, logits, "k3", "loss"), by_hand, rtol=1e-12)
    everyone = np.ones(3, dtype=bool)  # the dynamics' field (the face update on the whole simplex) agrees
    np.testing.assert_allclose(
        fp._face_update(problem, fp.kl_term("k3", "loss"), everyone, logits), by_hand, rtol=1e-12
    )
    clamped = fp.kl_term("k3", "loss", input_clamp=1e3, output_clamp=1e3)  # clamps that never bite
    np.testing.assert_allclose(fp.expected_update(problem, logits, clamped), by_hand, rtol=1e-12)


@pytest.mark.parametrize("estimator,mode", [("k3", "loss"), ("k1", "reward"), ("k3", "full")])
def test_simulated_training_lands_on_the_predicted_point(estimator, mode):
    check = fp.simulation_check(
        fp.REFERENCE_PROBLEM, estimator, mode, batch=64, lr=0.5, steps=3000, seeds=tuple(range(8)), ascent_steps=1000
    )  # converged to 1e-9 by step ~170
    assert check["ascent_error"] < 1e-9  # exact expected ascent from q = p
    assert check["max_abs_z"] < 5, check  # stochastic: seed mean of Polyak averages vs prediction


def test_stochastic_training_is_reproducible_by_seed():
    a = fp.stochastic_training(fp.REFERENCE_PROBLEM, "k3", "loss", steps=50, seeds=(3,))["path"]
    b = fp.stochastic_training(fp.REFERENCE_PROBLEM, "k3", "loss", steps=50, seeds=(3,))["path"]
    c = fp.stochastic_training(fp.REFERENCE_PROBLEM, "k3", "loss", steps=50, seeds=(4,))["path"]
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


@pytest.mark.parametrize(
    "p_logits,reward,beta,message",
    [
        ([0.0, 0.0], [0.0, 1.0], 0.0, "beta must be a finite number > 0"),
        ([0.0, 0.0], [0.0, 1.0], -1.0, "beta must be a finite number > 0"),
        ([0.0, 0.0], [0.0, 1.0], math.inf, "beta must be a finite number > 0"),
        ([0.0, 0.0], [0.0, 1.0, 2.0], 1.0, "reward has 3 entries but the reference has 2 tokens"),
        ([0.0, math.nan], [0.0, 1.0], 1.0, "reference logits contain non-finite values"),
        ([0.0, 0.0], [0.0, math.inf], 1.0, "reward contain non-finite values"),
        ([0.0], [0.0], 1.0, "at least 2 tokens"),
        (
            [[0.0, 0.0]],
            [0.0, 1.0],
            1.0,
            "reference logits must be a vector (one number per token), got an array of shape (1, 2)",
        ),
        ([0.0, 0.0, 0.0], np.zeros((3, 1)), 1.0, "reward must be a vector"),
        ([0.0, 0.0], [0.0, 1.0], 1e-300, "(max reward - min reward) / beta = 1e+300 exceeds 500"),
        ([0.0, 0.0, 0.0], [0.0, 1e300, 1.0], 0.5, "(max reward - min reward) / beta = 2e+300 exceeds 500"),
        ([0.0, 0.0], [-1e308, 1e308], 1.0, "(max reward - min reward) / beta = inf exceeds 500"),
    ],
)
def test_bad_problems_get_one_clear_error(p_logits, reward, beta, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        fp.FixedPointProblem(p_logits, reward, beta)


@pytest.mark.parametrize(
    "arguments,message",
    [
        (["--beta", "0"], "beta must be a finite number > 0"),
        (["--beta", "1", "--reward", "0,1"], "reward has 2 entries"),
        (["--beta", "1", "--reward", "0,nan,1"], "non-finite"),
        (["--beta", "1", "--reward", "missing.npy"], "file not found"),
        (["--beta", "1", "--modes", "sideways"], "unknown mode"),
        (["--beta", "1e-300"], "(max reward - min reward) / beta = 1e+300 exceeds 500"),
        (["--beta", "0.5", "--reward", "0,1e300,1", "--estimators", "k1"], "/ beta = 2e+300 exceeds 500"),
    ],
)
@pytest.mark.filterwarnings("error::RuntimeWarning")  # no numpy warning may reach the user
def test_cli_bad_input_is_one_line(arguments, message, capsys):
    base = {"--p-logits": "0,0,0", "--reward": "0,0.5,1"}
    for flag, value in zip(arguments[::2], arguments[1::2]):
        base[flag] = value
    argv = ["fixedpoint"] + [item for pair in base.items() for item in pair]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.parametrize("flag", ["--p-logits", "--reward"])
def test_cli_rejects_an_array_of_rank_two(flag, tmp_path, capsys):
    np.save(tmp_path / "a.npy", np.zeros((2, 3)))
    base = {"--p-logits": "0,0,0", "--reward": "0,0.5,1", "--beta": "1", flag: str(tmp_path / "a.npy")}
    assert main(["fixedpoint"] + [item for pair in base.items() for item in pair]) == 2
    err = capsys.readouterr().err
    assert f"{flag}: " in err and "shape (2, 3)" in err and "one-dimensional" in err and err.count("\n") == 1


def test_cli_json_contract(tmp_path, capsys):
    np.save(tmp_path / "p.npy", fp.REFERENCE_PROBLEM.p_logits)
    (tmp_path / "R.txt").write_text("0, 0.5\n1\n")
    argv = [
        "fixedpoint",
        "--p-logits",
        str(tmp_path / "p.npy"),
        "--reward",
        str(tmp_path / "R.txt"),
        "--beta",
        "0.5",
        "--estimators",
        "k1,k3",
        "--modes",
        "loss,full",
        "--format",
        "json",
    ]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out["optimum"]) == {"probs", "KL(q||p)", "reward"}
    np.testing.assert_allclose(out["optimum"]["probs"], closed_form_optimum(fp.REFERENCE_PROBLEM), rtol=1e-12)
    assert set(out["estimators"]) == {"k1", "k3"} and set(out["estimators"]["k3"]) == {"loss", "full"}
    required = {"probs", "KL(q||p)", "KL(p||q)", "reward", "distance_to_optimum", "status", "stable"}
    for modes in out["estimators"].values():
        for point in modes.values():
            assert required <= set(point) and point["status"] in fp.STATUSES
    assert out["estimators"]["k1"]["loss"]["status"] == "collapse"
    assert out["estimators"]["k1"]["loss"]["probs"] == [0.0, 0.0, 1.0]
    assert out["estimators"]["k3"]["full"]["distance_to_optimum"] < 1e-12


def test_cli_table_lists_every_estimator_and_mode(capsys):
    assert (
        main(
            [
                "fixedpoint",
                "--p-logits",
                "0,0,0",
                "--reward",
                "0,0.5,1",
                "--beta",
                "1",
                "--estimators",
                "k2,k3",
                "--modes",
                "loss,full",
            ]
        )
        == 0
    )
    lines = capsys.readouterr().out.splitlines()
    spans = [match.span() for match in re.finditer(r"-+", lines[2])]  # the dashes under each column
    header, *rows = [[line[a:b].strip() for a, b in spans] for line in [lines[1]] + lines[3:]]
    assert header[:4] == ["estimator", "mode", "status", "probs"]
    assert {"KL(q||p)", "KL(p||q)", "KL(end||q*)", "stable"} <= set(header)
    table = {tuple(row[:2]): dict(zip(header, row)) for row in rows}
    assert list(table) == [("optimum q*", "-"), ("k2", "loss"), ("k2", "full"), ("k3", "loss"), ("k3", "full")]
    assert float(table["k2", "loss"]["KL(end||q*)"]) < 1e-12 and float(table["k3", "loss"]["KL(end||q*)"]) > 1e-6
    assert table["k3", "loss"]["stable"] == "True" and table["k3", "loss"]["status"] == "interior"
    point = fp.fixed_point(fp.FixedPointProblem([0.0, 0.0, 0.0], [0.0, 0.5, 1.0], 1.0), "k3", "loss")
    for column, key in [("KL(q||p)", fp.KL_QP), ("KL(p||q)", fp.KL_PQ), ("KL(end||q*)", "distance_to_optimum")]:
        assert float(table["k3", "loss"][column]) == pytest.approx(point[key], rel=1e-5)  # 6 digits printed


def test_converges_to_phrases():
    assert fp.converges_to("k3", "full") == "q* = p e^{R/beta}/Z"
    assert fp.converges_to("k2", "full").startswith("boundary (0.0000, 0.4552, 0.5448)")
    assert fp.converges_to("rev_k2", "full") == "collapse onto the reward maximiser(s)"
    assert fp.converges_to("k3", "loss").startswith("interior (0.2125, 0.2217, 0.5659)")


# --- sequences ---------------------------------------------------------------------------------


def brute_force_optimum(problem):
    """q*(y) over all sequences, then its conditionals q*(a|u) = q*(ua...) / q*(u...) by enumeration."""
    p = problem.reference
    V, T = p.vocab_size, p.horizon
    sequences = np.array(np.unravel_index(np.arange(V**T), (V,) * T)).T
    log_p = np.array([p.log_prob(y) for y in sequences])
    joint = np.exp(log_p + problem.reward / problem.beta)
    joint /= joint.sum()
    conditionals = np.zeros(p.logits.shape)
    for row_prefix in [()] + [tuple(y[:d]) for d in range(1, T) for y in sequences]:
        match = np.all(sequences[:, : len(row_prefix)] == row_prefix, axis=1)
        for a in range(V):
            conditionals[p.row_of(row_prefix), a] = (
                joint[match & (sequences[:, len(row_prefix)] == a)].sum() / joint[match].sum()
            )
    return joint, conditionals


def test_sequence_optimum_matches_enumeration():
    problem = fp.SequenceProblem(Autoregressive.random(3, 3, seed=5), np.linspace(-1, 2, 27) ** 2, 0.7)
    joint, conditionals = brute_force_optimum(problem)
    star = fp.sequence_optimum(problem)
    np.testing.assert_allclose(fp.sequence_probs(star), joint, rtol=1e-12)
    np.testing.assert_allclose(star.probs, conditionals, rtol=1e-12)


def test_sequence_update_vanishes_at_q_star_for_the_true_kl_gradient():
    # E_q[R sum_t s_t] = beta grad KL(q||p) exactly at q* (the sequence-level Gibbs variational principle)
    problem = fp.REFERENCE_SEQUENCE_PROBLEM
    star = fp.sequence_optimum(problem)
    reward_gradient = fp.sequence_update(problem, star.logits, "k1", "loss")  # k1 loss adds 0 in expectation
    np.testing.assert_allclose(
        reward_gradient, problem.beta * true_gradients(star, problem.reference)["KL(q||p)"], atol=1e-12
    )


@pytest.mark.parametrize(
    "estimator,placement,lands_on_optimum",
    [("k1", "reward-to-go", True), ("k3", "full", True), ("k1", "reward", False), ("k3", "loss", False)],
)
def test_sequence_training_end_points(estimator, placement, lands_on_optimum):
    point = fp.sequence_fixed_point(fp.REFERENCE_SEQUENCE_PROBLEM, estimator, placement)
    assert point["status"] == "interior" and point["converged"]
    assert point["equals_optimum"] is lands_on_optimum
    if lands_on_optimum:
        assert point["max_conditional_difference"] < 1e-6
    else:
        assert point["distance_to_optimum"] > 1e-6


def test_sequence_problem_checks_its_input():
    with pytest.raises(ValueError, match="reward has 3 entries but there are V\\^T = 8 sequences"):
        fp.SequenceProblem(Autoregressive.random(2, 3), [0.0, 1.0, 2.0], 1.0)
    with pytest.raises(ValueError, match="beta must be a finite number > 0"):
        fp.SequenceProblem(Autoregressive.random(2, 3), np.zeros(8), 0.0)


# --- framework settings: clamps ------------------------------------------------------------------


def test_an_output_clamp_that_bites_at_q_star_removes_the_restoring_force():
    # k3 in full mode follows grad KL(q||p): unclamped it lands on q*. At beta = 0.25 q* needs k3 = 10.02 > 10 on
    # token 0, where NeMo-RL's output clamp freezes the value: its weight stops growing and token 0 dies out.
    problem = fp.REFERENCE_PROBLEM.with_beta(0.25)
    star = closed_form_optimum(problem)
    r0 = problem.p[0] / star[0]
    assert r0 - 1 - np.log(r0) > 10
    free = fp.fixed_point(problem, "k3", "full", input_clamp=20.0)  # input clamp idle: |log r| < 20
    assert free["equals_optimum"] and "clamps inactive" in free["method"]
    clamped = fp.fixed_point(problem, "k3", "full", input_clamp=20.0, output_clamp=10.0)
    assert clamped["status"] == "boundary" and clamped["probs"][0] == 0 and clamped["probs"][1:].min() > 0.1
    assert clamped["distance_to_optimum"] > 1e-3
    assert len(clamped["eigenvalues"]) == 1 and clamped["stable"] == (clamped["eigenvalues"][0] < 0)


def test_converges_to_table_and_cli_setting(capsys):
    from klsym.rl.frameworks import get_setting

    grpo, ppo = get_setting("trl-grpo"), get_setting("trl-ppo")
    assert (grpo.get_estimator().name, grpo.mode, ppo.get_estimator().name, ppo.mode) == ("k3", "loss", "k1", "reward")
    table = fp.converges_to_table([grpo, ppo]).set_index("setting")
    assert table.loc[ppo.key, "converges to"] == "q* = p e^{R/beta}/Z"
    assert table.loc[grpo.key, "converges to"].startswith("interior")
    assert (
        main(
            [
                "fixedpoint",
                "--p-logits",
                "0,0,0",
                "--reward",
                "0,0.5,1",
                "--beta",
                "0.5",
                "--setting",
                "trl-grpo",
                "--format",
                "json",
            ]
        )
        == 0
    )
    out = json.loads(capsys.readouterr().out)
    assert (
        out["setting"] == grpo.key and list(out["estimators"]) == ["k3"] and list(out["estimators"]["k3"]) == ["loss"]
    )
    q = np.array(out["estimators"]["k3"]["loss"]["probs"])
    R, p = np.array([0.0, 0.5, 1.0]), np.full(3, 1 / 3)
    np.testing.assert_allclose(q * (R - q @ R - 0.5), -0.5 * p, atol=1e-12)


def test_simulated_collapse_keeps_losing_mass_off_the_limit():
    short, long = (
        fp.simulation_check(fp.REFERENCE_PROBLEM, "k1", "loss", steps=steps, seeds=(0, 1, 2), ascent_steps=steps)
        for steps in (300, 3000)
    )
    assert np.isnan(long["max_abs_z"])  # no z for a limit reached only as steps -> infinity
    assert long["off_limit"]["ascent"] < short["off_limit"]["ascent"] / 5  # ~1/steps for zero restoring force
    assert long["off_limit"]["stochastic"] < short["off_limit"]["stochastic"]
