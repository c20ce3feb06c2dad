"""Off-policy single-token KL terms: brute-force sums written here, finite differences, MC from b (|z| < 5)."""

import json
import subprocess
import sys

import numpy as np
import pytest
from scipy.special import log_softmax

from klsym.derive.estimators import get_estimator
from klsym.exact.expectations import KL_QP, MODES, estimator_gradient, kl_divergences
from klsym.exact.families import Categorical, Gaussian
from klsym.paths import ROOT
from klsym.rl import expressions as ex
from klsym.rl.offpolicy import (
    WEIGHTINGS,
    exact_expression,
    monte_carlo,
    offpolicy_gradient,
    term_expression,
    value_rows,
)

ESTIMATORS = ("k1", "k2", "k3", "k3+", "rev_k1")
CASES = [(e, m, w) for e in ESTIMATORS for m in MODES for w in WEIGHTINGS if w != "ppo-clip" or m == "reward"]
TRUNCATION, CLIP = 1.3, 0.2


def _categorical_triple(seed=3, size=6, spread=0.8):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=size)
    return (
        Categorical(logits),
        Categorical(logits + rng.normal(scale=spread, size=size)),
        Categorical(logits + rng.normal(scale=0.6, size=size)),
    )


def _brute_force(estimator, mode, weighting, q, p, b):
    """E_b[c(x) (onehot(x) - q)] with c written out from k, k_sur' and w = q/b (no klsym.rl code)."""
    e = get_estimator(estimator)
    t = p.log_probs - q.log_probs
    w = np.exp(q.log_probs - b.log_probs)
    k, h_loss = e.numeric(t), -e.numeric_dt(t)
    if weighting == "ppo-clip":  # loss max(w k, clip(w) k): gradient w k where the unclipped branch wins
        c = np.where(w * k >= np.clip(w, 1 - CLIP, 1 + CLIP) * k, w * k, 0.0)
    else:
        factor = {
            "none": np.ones_like(w),
            "token-is": w,
            "token-is-differentiable": w,
            "truncated-is": np.minimum(w, TRUNCATION),
        }[weighting]
        loss = w * (k + h_loss) if weighting == "token-is-differentiable" else factor * h_loss
        c = {"loss": loss, "reward": factor * k, "full": loss + factor * k}[mode]
    grad = np.zeros(q.size)
    for x in range(q.size):
        onehot = np.eye(q.size)[x]
        grad += b.probs[x] * c[x] * (onehot - q.probs)
    return grad


@pytest.mark.parametrize("estimator, mode, weighting", CASES)
def test_exact_matches_brute_force_sum(estimator, mode, weighting):
    q, p, b = _categorical_triple()
    exact = offpolicy_gradient(estimator, mode, weighting, q, p, b, TRUNCATION, CLIP)["gradient"]
    assert np.allclose(exact, _brute_force(estimator, mode, weighting, q, p, b), rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("estimator, mode, weighting", CASES)
def test_exact_matches_finite_differences(estimator, mode, weighting):
    q, p, b = _categorical_triple(seed=5)
    expr, enters, _ = term_expression(estimator, mode, weighting, TRUNCATION, CLIP)
    loss = ex.numeric(ex.surrogate(expr, enters))

    def expected(theta):  # sum over tokens of b(x) L(log q_theta(x)), detached values at theta_0
        return float(np.sum(b.probs * loss(log_softmax(theta), p.log_probs, b.log_probs, q.log_probs)))

    step, fd = 1e-6, np.zeros(q.size)
    for j in range(q.size):
        e = np.eye(q.size)[j] * step
        fd[j] = (expected(q.logits + e) - expected(q.logits - e)) / (2 * step)
    exact = exact_expression(expr, enters, q, p, b)["gradient"]
    assert np.allclose(exact, fd, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_token_is_is_the_on_policy_gradient(estimator, mode):
    q, p, b = _categorical_triple(seed=7)
    on_policy = estimator_gradient(estimator, q, p, mode)  # klsym.exact: an independent code path
    assert np.allclose(
        offpolicy_gradient(estimator, mode, "token-is", q, p, b)["gradient"], on_policy, rtol=1e-10, atol=1e-14
    )
    assert not np.allclose(offpolicy_gradient(estimator, mode, "none", q, p, b)["gradient"], on_policy, rtol=1e-3)


@pytest.mark.parametrize("mode", ["loss", "reward", "full"])
def test_gaussian_token_is_matches_the_closed_form_on_policy_gradient(mode):
    q, p, b = Gaussian(0.0, 1.0), Gaussian(0.7, 1.2), Gaussian(0.4, 1.1)
    exact = offpolicy_gradient("k3", mode, "token-is", q, p, b)
    # the quadrature of E_b[w h s] over b against the on-policy closed form of klsym.exact
    assert np.allclose(exact["quadrature_gradient"], estimator_gradient("k3", q, p, mode), rtol=1e-8, atol=1e-12)


def test_values_token_is_unbiased_and_none_is_e_b():
    q, p, b = _categorical_triple(seed=11)
    kl = kl_divergences(q, p)[KL_QP]
    rows = {(r["estimator"], r["weighting"]): r for r in value_rows(q, p, b, "k1,k3", ("none", "token-is"))}
    for name in ("k1", "k3"):
        assert rows[(name, "token-is")]["mean"] == pytest.approx(kl, rel=1e-12)
        k = get_estimator(name).numeric(p.log_probs - q.log_probs)
        assert rows[(name, "none")]["mean"] == pytest.approx(float(np.sum(b.probs * k)), rel=1e-12)


FAMILIES = {
    "categorical": _categorical_triple(seed=2),
    "gaussian": (Gaussian(0.0, 1.0), Gaussian(0.5, 1.1), Gaussian(0.3, 1.05)),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("weighting", WEIGHTINGS)
def test_monte_carlo_from_b_agrees_with_exact(family, weighting):
    q, p, b = FAMILIES[family]
    modes = ("reward",) if weighting == "ppo-clip" else MODES
    for estimator in ("k1", "k3"):
        for mode in modes:
            expr, enters, value = term_expression(estimator, mode, weighting, TRUNCATION, CLIP)
            exact = exact_expression(expr, enters, q, p, b, value)
            mc = monte_carlo(expr, enters, q, p, b, n=100_000, seed=17, value_expr=value)
            assert exact["variance_finite"]
            se = mc["gradient_se"]
            live = se > 0
            assert np.all(np.abs(mc["gradient"] - exact["gradient"])[live] < 5 * se[live]), (estimator, mode)
            assert np.allclose(mc["gradient"][~live], exact["gradient"][~live], atol=1e-12)
            assert abs(mc["value"] - exact["value"]) < 5 * mc["value_se"]


def test_infinite_variance_is_flagged():
    # E_b[w^2] = int q^2/b is finite iff sigma_b^2 > sigma_q^2 / 2: b = N(0, 0.6) is too narrow
    q, p, narrow = Gaussian(0.0, 1.0), Gaussian(0.3, 1.0), Gaussian(0.0, 0.6)
    assert not offpolicy_gradient("k1", "reward", "token-is", q, p, narrow)["variance_finite"]
    assert offpolicy_gradient("k1", "reward", "none", q, p, narrow)["variance_finite"]
    assert offpolicy_gradient("k1", "reward", "truncated-is", q, p, narrow)["variance_finite"]
    assert offpolicy_gradient("k1", "reward", "token-is", q, p, Gaussian(0.0, 0.8))["variance_finite"]


def test_behaviour_without_mass_where_q_has_mass_is_one_clear_error():
    q, p = Categorical([0.0, 1.0, 0.5]), Categorical([0.2, 0.0, 0.0])
    with pytest.raises(ValueError, match="behaviour b has zero probability on tokens where q has mass"):
        offpolicy_gradient("k3", "loss", "token-is", q, p, Categorical([0.0, 1.0, -np.inf]))


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["gradient", "--q", "0,1", "--p", "1,1", "--behaviour", "inf,1"], "finite"),
        (["gradient", "--q", "0,1", "--p", "1,1", "--behaviour", "0,0"], "sigma must be positive"),
        (["gradient", "--q", "0,1", "--p", "1,1", "--behaviour", "0,1", "--weighting", "nope"], "unknown weighting"),
        (["exact", "--q", "0,1", "--p", "1,1", "--behaviour", "0,1", "--positions", "2"], "single positions"),
        (["gradient", "--q", "0,1", "--p", "1,1", "--behaviour", "0,1", "--truncation", "-1"], "truncation"),
        (["gradient", "--q-logits", "{q}", "--p-logits", "{q}", "--behaviour-logits", "{b}"], "zero probability"),
        (["gradient", "--q-logits", "{q}", "--p-logits", "{q}", "--behaviour-logits", "{nan}"], "NaN"),
    ],
)
def test_cli_errors_are_one_line(argv, needle, tmp_path):
    files = {"q": [0.0, 1.0, 0.5], "b": [0.0, 1.0, float("-inf")], "nan": [0.0, float("nan"), 1.0]}
    for name, values in files.items():
        (tmp_path / f"{name}.txt").write_text(" ".join(map(str, values)))
    argv = [a.format(**{n: tmp_path / f"{n}.txt" for n in files}) for a in argv]
    proc = subprocess.run([sys.executable, "-m", "klsym", *argv], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("klsym: error:")
    assert needle in proc.stderr


def test_cli_gradient_json_contract():
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "klsym",
            "gradient",
            "--q",
            "0,1",
            "--p",
            "1,1",
            "--behaviour",
            "0.3,1",
            "--estimators",
            "k1",
            "--weighting",
            "none,token-is",
            "--format",
            "json",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=True,
    )
    out = json.loads(proc.stdout)
    assert out["drift KL(b||q)"] == pytest.approx(0.045)
    rows = {(r["mode"], r["weighting"]): r for r in out["rows"]}
    assert len(rows) == 6
    assert np.allclose(rows[("full", "token-is")]["gradient"], out["true"][KL_QP])


# --- sequences ------------------------------------------------------------------------------------

from klsym.exact.autoregressive import Autoregressive  # noqa: E402
from klsym.rl.offpolicy import (  # noqa: E402
    SEQUENCE_PLACEMENTS,
    SEQUENCE_WEIGHTINGS,
    recommend,
    sequence_monte_carlo,
    sequence_offpolicy_gradients,
    sequence_offpolicy_table,
)
from klsym.rl.sequences import placement_gradients  # noqa: E402

SEQ_P = Autoregressive.random(2, 3, seed=4)
SEQ_Q = SEQ_P.perturbed(0.6, seed=5)
SEQ_B = SEQ_Q.perturbed(0.5, seed=6)


def _surrogate(name, placement, weighting, lq, lq0, lp, lb):
    """One sequence's surrogate loss written from the definitions (lq differentiable, the rest detached)."""
    e = get_estimator(name)
    k, k0 = e.numeric(lp - lq), e.numeric(lp - lq0)  # k0: the detached value sg(k)
    w = np.exp(lq0 - lb)
    T = len(lq)
    rho = np.cumprod(w)
    factor = {
        "none": np.ones(T),
        "token-is": w,
        "token-is-differentiable": w,
        "per-decision": rho,
        "sequence-is": np.full(T, np.prod(w)),
        "sequence-mean-is-differentiable": np.full(T, np.exp(np.mean(lq0 - lb))),
    }[weighting]
    if weighting == "token-is-differentiable":
        loss = np.sum(np.exp(lq - lb) * k)
    elif weighting == "sequence-mean-is-differentiable":
        loss = np.exp(np.mean(lq - lb)) * np.sum(k)
    else:
        loss = np.sum(factor * k)
    if weighting == "per-decision":  # k_s credited to the score of t by rho_{1:max(s, t)}
        credit = {
            "reward": lambda s, t: s == t,
            "reward-to-go": lambda s, t: s >= t,
            "sequence-reward": lambda s, t: True,
        }
        reward = {
            kind: sum(rho[max(s, t)] * k0[s] * lq[t] for t in range(T) for s in range(T) if rule(s, t))
            for kind, rule in credit.items()
        }
    else:
        reward = {
            "reward": np.sum(factor * k0 * lq),
            "reward-to-go": sum(factor[t] * lq[t] * np.sum(k0[t:]) for t in range(T)),
            "sequence-reward": sum(factor[t] * lq[t] * np.sum(k0) for t in range(T)),
        }
    return {
        "loss": loss,
        "reward": reward["reward"],
        "reward-to-go": reward["reward-to-go"],
        "sequence-reward": reward["sequence-reward"],
        "full": loss + reward["reward-to-go"],
        "loss+reward": loss + reward["reward"],
    }[placement]


def _sequence_expected_surrogate(name, placement, weighting, logits):
    from itertools import product

    q_theta = Autoregressive(logits)
    total = 0.0
    for y in product(range(SEQ_Q.vocab_size), repeat=SEQ_Q.horizon):
        rows = [SEQ_Q.row_of(y[:t]) for t in range(len(y))]
        pick = (rows, list(y))
        lq, lq0 = q_theta.log_probs[pick], SEQ_Q.log_probs[pick]
        lp, lb = SEQ_P.log_probs[pick], SEQ_B.log_probs[pick]
        total += np.exp(lb.sum()) * _surrogate(name, placement, weighting, lq, lq0, lp, lb)
    return total


@pytest.mark.parametrize("weighting", SEQUENCE_WEIGHTINGS)
@pytest.mark.parametrize("placement", SEQUENCE_PLACEMENTS)
def test_sequence_weightings_match_finite_differences_of_their_definitions(placement, weighting):
    exact = sequence_offpolicy_gradients("k3", SEQ_Q, SEQ_P, SEQ_B, [placement], [weighting])[(placement, weighting)]
    step, fd = 1e-6, np.zeros(SEQ_Q.size)
    for j in range(SEQ_Q.size):
        e = np.zeros(SEQ_Q.size)
        e[j] = step
        up = _sequence_expected_surrogate("k3", placement, weighting, SEQ_Q.logits + e.reshape(SEQ_Q.logits.shape))
        down = _sequence_expected_surrogate("k3", placement, weighting, SEQ_Q.logits - e.reshape(SEQ_Q.logits.shape))
        fd[j] = (up - down) / (2 * step)
    assert np.allclose(exact["gradient"], fd, rtol=1e-6, atol=1e-8)


def test_sequence_none_on_policy_is_the_sequence_module_placements():
    exact = sequence_offpolicy_gradients("k2", SEQ_Q, SEQ_P, SEQ_Q, weightings=["none"])
    reference = placement_gradients("k2", SEQ_Q, SEQ_P, SEQUENCE_PLACEMENTS)
    for placement in SEQUENCE_PLACEMENTS:
        assert np.allclose(exact[(placement, "none")]["gradient"], reference[placement], rtol=1e-12, atol=1e-15)


def test_which_sequence_options_are_unbiased():
    table = sequence_offpolicy_table(SEQ_Q, SEQ_P, SEQ_B, "k1,k3", ["full", "reward-to-go"])
    unbiased = set(map(tuple, table[table["unbiased"]][["estimator", "placement", "weighting"]].values))
    assert {
        ("k1", "full", "sequence-is"),
        ("k1", "full", "per-decision"),
        ("k1", "reward-to-go", "per-decision"),
        ("k3", "full", "per-decision"),
        ("k3", "full", "sequence-is"),
    } <= unbiased
    assert not any(w in ("none", "token-is", "token-is-differentiable") for _, _, w in unbiased)
    best = recommend(table)
    assert (
        best["unbiased"]
        and best["variance (per sequence)"] == table[table["unbiased"]]["variance (per sequence)"].min()
    )


@pytest.mark.parametrize("weighting", SEQUENCE_WEIGHTINGS)
def test_sequence_monte_carlo_from_b_agrees_with_exact(weighting):
    exact = sequence_offpolicy_gradients("k3", SEQ_Q, SEQ_P, SEQ_B, ["full", "sequence-reward"], [weighting])
    for placement in ("full", "sequence-reward"):
        mc = sequence_monte_carlo("k3", SEQ_Q, SEQ_P, SEQ_B, placement, weighting, n=40_000, seed=23)
        live = mc["se"] > 0
        z = np.abs(mc["gradient"] - exact[(placement, weighting)]["gradient"])[live] / mc["se"][live]
        assert z.max() < 5, (placement, z.max())


def test_sequence_behaviour_of_another_shape_is_one_clear_error():
    with pytest.raises(ValueError, match="behaviour b must have the same shape"):
        sequence_offpolicy_gradients("k1", SEQ_Q, SEQ_P, Autoregressive.random(3, 2, seed=0))


@pytest.mark.parametrize("weighting", ["none", "token-is", "token-is-differentiable"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("estimator", ["k1", "k2", "k3", "k3+", "rev_k1"])
def test_three_gaussian_closed_form_matches_quadrature(estimator, mode, weighting):
    q, p, b = Gaussian(0.0, 1.0), Gaussian(0.7, 1.2), Gaussian(0.4, 1.1)
    out = offpolicy_gradient(estimator, mode, weighting, q, p, b)
    assert out["method"] == "closed_form"
    assert np.allclose(out["gradient"], out["quadrature_gradient"], rtol=1e-10, atol=1e-13)


def test_three_gaussian_closed_form_states_its_condition():
    from klsym.rl.offpolicy import behaviour_condition_holds

    q, p = Gaussian(0.0, 1.0), Gaussian(0.0, 2.0)
    # E_b[r] for k3: a = 1, 1 - 1/4 < 1/sigma_b^2 holds for sigma_b = 1.1 and fails for sigma_b = 1.2
    assert behaviour_condition_holds(1, q, p, Gaussian(0.0, 1.1))
    assert not behaviour_condition_holds(1, q, p, Gaussian(0.0, 1.2))
    out = offpolicy_gradient("k3", "reward", "none", q, p, Gaussian(0.0, 1.2))
    assert out["method"] == "quadrature" and not np.all(np.isfinite(out["gradient"]))


def test_cli_sequence_behaviour_json(tmp_path):
    for name, policy in (("q", SEQ_Q), ("p", SEQ_P), ("b", SEQ_B)):
        policy.save(tmp_path / f"{name}.npy")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "klsym",
            "sequence",
            "--q-model",
            str(tmp_path / "q.npy"),
            "--p-model",
            str(tmp_path / "p.npy"),
            "--behaviour-model",
            str(tmp_path / "b.npy"),
            "--estimators",
            "k1",
            "--placements",
            "full,reward",
            "--weighting",
            "none,per-decision",
            "--format",
            "json",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=True,
    )
    out = json.loads(proc.stdout)
    labels = {(r["placement"], r["weighting"]): r["follows"] for r in out["rows"]}
    assert labels[("full", "per-decision")] == KL_QP and labels[("full", "none")] != KL_QP
    assert out["recommended"]["weighting"] == "per-decision" and out["recommended"]["placement"] == "full"
