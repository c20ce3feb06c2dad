"""Numbers at the edges (issue 11): near-equal policies against 50-digit mpmath references,
zero-probability tokens, extreme parameters, every allowed formula, contracts.

References are computed here independently of the code under test: Gaussian expectations by
100-node Gauss-Hermite quadrature in mpmath at 50 digits (the integrands are entire in x for
these near-equal pairs), categorical ones by exact sums in mpmath at 50 digits.
"""

import json
import math
from functools import cache

import mpmath
import numpy as np
import pytest
import sympy as sp

from klsym.cli import main
from klsym.derive.estimators import BUILTINS, in_logratio
from klsym.derive.symbols import t
from klsym.exact.expectations import MODES, estimator_gradient, estimator_stats
from klsym.exact.families import Categorical, Gaussian

DIGITS = 50
SHIFTS = [10.0**-k for k in range(3, 9)]  # 1e-3 .. 1e-8
RTOL = 1e-10
CATEGORICAL_Q = [0.3, -1.2, 0.5, 2.0, -0.7]
CATEGORICAL_DIRECTION = [1.0, 0.0, -1.0, 0.5, 0.0]


@cache
def _hermite():
    with mpmath.workdps(DIGITS):
        nodes, weights = mpmath.gauss_quadrature(100, "hermite")
        return nodes, [w / mpmath.sqrt(mpmath.pi) for w in weights]


@cache
def _functions_of_t(name):
    """k(e^t) and d k_sur / dt in mpmath; at t = -inf (p(x) = 0) their limits (0 log 0 = 0)."""
    estimator = BUILTINS[name]

    def function(expr):
        evaluate = sp.lambdify(t, expr, "mpmath")
        at_minus_inf = mpmath.mpf(float(sp.limit(expr, t, -sp.oo)))
        return lambda v: at_minus_inf if v == -mpmath.inf else evaluate(v)

    return function(in_logratio(estimator.expr)), function(sp.diff(in_logratio(estimator.surrogate), t))


def _reference(name, points, log_ratios, scores):
    """mean, std and the three gradient modes from weighted points (mpmath, DIGITS digits)."""
    value, slope = _functions_of_t(name)
    k = [value(v) for v in log_ratios]
    loss_weight = [-slope(v) for v in log_ratios]
    mean = mpmath.fsum(w * kv for w, kv in zip(points, k))
    std = mpmath.sqrt(mpmath.fsum(w * (kv - mean) ** 2 for w, kv in zip(points, k)))
    out = {"mean": mean, "std": std}
    for mode, weight in (("loss", loss_weight), ("reward", k)):
        out[mode] = [
            mpmath.fsum(w * c * s[i] for w, c, s in zip(points, weight, scores)) for i in range(len(scores[0]))
        ]
    out["full"] = [a + b for a, b in zip(out["loss"], out["reward"])]
    return out


def gaussian_reference(name, q, p):
    with mpmath.workdps(DIGITS):
        nodes, weights = _hermite()
        mu, sigma = map(mpmath.mpf, q)
        mu_p, sigma_p = map(mpmath.mpf, p)
        xs = [mu + mpmath.sqrt(2) * sigma * y for y in nodes]
        log_ratios = [
            mpmath.log(sigma / sigma_p) + ((x - mu) / sigma) ** 2 / 2 - ((x - mu_p) / sigma_p) ** 2 / 2 for x in xs
        ]
        scores = [((x - mu) / sigma**2, (((x - mu) / sigma) ** 2 - 1) / sigma) for x in xs]
        return _reference(name, weights, log_ratios, scores)


def categorical_reference(name, q_logits, p_logits):
    with mpmath.workdps(DIGITS):

        def log_softmax(logits):
            logits = [mpmath.mpf(v) for v in logits]
            top = max(logits)
            norm = top + mpmath.log(mpmath.fsum(mpmath.exp(v - top) for v in logits))
            return [v - norm for v in logits]

        lq, lp = log_softmax(q_logits), log_softmax(p_logits)
        probs = [mpmath.exp(v) for v in lq]
        size = len(probs)
        scores = [[(1 if i == j else 0) - probs[j] for j in range(size)] for i in range(size)]
        return _reference(name, probs, [b - a for a, b in zip(lq, lp)], scores)


def _error(value, reference, scale) -> float:
    """|value - reference| relative to |reference|; a component far below the vector's scale is compared to it."""
    reference = mpmath.mpf(reference)
    if scale < mpmath.mpf(10) ** (10 - DIGITS):  # the reference is zero to its precision: so must the value be
        return abs(float(value)) / 1e-20
    return float(abs(mpmath.mpf(float(value)) - reference) / max(abs(reference), mpmath.mpf(1e-6) * scale))


def _worst_errors(name, q, p, reference) -> dict:
    stats = estimator_stats(name, q, p)
    errors = {key: _error(stats[key], reference[key], abs(reference[key])) for key in ("mean", "std")}
    for mode in MODES:
        grad = estimator_gradient(name, q, p, mode)
        scale = max(abs(v) for v in reference[mode])
        errors[mode] = max(_error(g, ref, scale) for g, ref in zip(grad, reference[mode]))
    return errors


GAUSSIAN_SHIFTS = [("mean", d) for d in SHIFTS] + [("scale", d) for d in SHIFTS]


@pytest.mark.parametrize("name", list(BUILTINS))
@pytest.mark.parametrize("kind, shift", GAUSSIAN_SHIFTS)
def test_gaussian_near_equal_matches_mpmath(kind, shift, name):
    q = (0.0, 1.0)
    p = (shift, 1.0) if kind == "mean" else (0.0, 1.0 + shift)
    errors = _worst_errors(name, Gaussian(*q), Gaussian(*p), gaussian_reference(name, q, p))
    assert max(errors.values()) < RTOL, errors


@pytest.mark.parametrize("name", list(BUILTINS))
@pytest.mark.parametrize("shift", SHIFTS)
def test_categorical_near_equal_matches_mpmath(shift, name):
    p_logits = [a + shift * b for a, b in zip(CATEGORICAL_Q, CATEGORICAL_DIRECTION)]
    errors = _worst_errors(
        name, Categorical(CATEGORICAL_Q), Categorical(p_logits), categorical_reference(name, CATEGORICAL_Q, p_logits)
    )
    assert max(errors.values()) < RTOL, errors


# --- regression cases of issue 11, through the command line ----------------------------------------


def _cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in err and "Warning" not in err, err
    return code, out, err


def _json(capsys, *argv):
    code, out, err = _cli(capsys, *argv, "--format", "json")
    assert code == 0, err
    return json.loads(out)


def _gaussian_kl(a, b):
    """KL(N(a) || N(b)) in mpmath at 50 digits from float parameters."""
    with mpmath.workdps(DIGITS):
        (m1, s1), (m2, s2) = [tuple(map(mpmath.mpf, pair)) for pair in (a, b)]
        return mpmath.log(s2 / s1) + (s1**2 + (m1 - m2) ** 2) / (2 * s2**2) - mpmath.mpf(1) / 2


def test_kl_of_nearly_equal_scales(capsys):
    kl = _json(capsys, "exact", "--q", "0,1", "--p", "0,1.000001", "--estimators", "k1")["kl"]
    assert _error(kl["KL(q||p)"], _gaussian_kl((0, 1), (0, 1.000001)), 1) < RTOL
    assert _error(kl["KL(p||q)"], _gaussian_kl((0, 1.000001), (0, 1)), 1) < RTOL


def test_crosscheck_near_equal_has_a_meaningful_se(capsys):
    check = _json(
        capsys,
        "mc",
        "--q",
        "0,1",
        "--p",
        "1e-4,1",
        "--n",
        "20000",
        "--estimators",
        "k3,rev_k3",
        "--crosscheck",
        "--quiet",
    )["crosscheck"]
    for entry in check["estimators"].values():
        assert entry["mean"]["se"] > 0 and math.isfinite(entry["mean"]["z"])
    assert check["passed"]


def _write(path, text):
    path.write_text(text)
    return path


def test_zero_probability_tokens_exact_and_mc_agree(tmp_path, capsys):
    q = _write(tmp_path / "q.txt", "0 0 0\n")
    p = _write(tmp_path / "p.txt", "0 -inf 0\n")
    exact = _json(capsys, "exact", "--q-logits", q, "--p-logits", p, "--estimators", "k1,rev_k1,rev_k3")
    reference = categorical_reference("rev_k1", [0.0, 0.0, 0.0], [0.0, -math.inf, 0.0])
    assert _error(exact["estimators"]["rev_k1"]["mean"], reference["mean"], 1) < RTOL  # 0 log 0 = 0
    assert exact["estimators"]["k1"]["mean"] == "inf" and exact["kl"]["KL(q||p)"] == "inf"
    mc = _json(
        capsys,
        "mc",
        "--q-logits",
        q,
        "--p-logits",
        p,
        "--n",
        "30000",
        "--estimators",
        "k1,rev_k1,rev_k3",
        "--crosscheck",
        "--quiet",
    )
    k1 = mc["estimators"]["k1"]
    assert k1["mean"] == "inf" and 0 < k1["n_nonfinite"] < 30000  # the samples that hit p(x) = 0, counted
    for name in ("rev_k1", "rev_k3"):
        assert math.isfinite(mc["estimators"][name]["mean"])
        assert abs(mc["crosscheck"]["estimators"][name]["mean"]["z"]) < 5


@pytest.mark.parametrize(
    "q, p", [("0,1e-300", "0,1"), ("0,1e300", "0,1"), ("1e200,1", "0,1"), ("0,1", "0,1e-300"), ("0,1", "30,1")]
)
def test_extreme_gaussian_parameters_give_numbers_not_tracebacks(q, p, capsys):
    out = _json(capsys, "exact", "--q", q, "--p", p, "--estimators", "k1,k3,rev_k1")
    pair = [tuple(map(float, text.split(","))) for text in (q, p)]
    with mpmath.workdps(DIGITS):
        for label, (a, b) in (("KL(q||p)", pair), ("KL(p||q)", pair[::-1])):
            true = _gaussian_kl(a, b)
            if true < mpmath.mpf("1e300"):
                assert _error(out["kl"][label], true, 1) < RTOL, label
            else:  # beyond float64: "inf" (never NaN)
                assert out["kl"][label] == "inf"
    for stats in out["estimators"].values():
        assert stats["mean"] != "nan" and stats["std"] != "nan"
    _json(capsys, "gradient", "--q", q, "--p", p, "--estimators", "k1,k3")


def test_spread_of_k1_at_a_huge_mean_shift(capsys):
    k1 = _json(capsys, "exact", "--q", "1e200,1", "--p", "0,1", "--estimators", "k1")["estimators"]["k1"]
    assert k1["std"] == pytest.approx(1e200, rel=1e-12)  # k1 = -t is linear in x with slope 1e200
    # E[k1^2] = (mean shift^2 / 2)^2 + shift^2 = 0.25e800 + 1e400
    assert k1["log_second_moment"] == pytest.approx(800 * math.log(10) + math.log(0.25), rel=1e-12)


def test_second_moment_beyond_float_range_is_given_in_log_space(capsys):
    out = _json(capsys, "exact", "--q", "0,1", "--p", "30,1", "--estimators", "k3,rev_k3")["estimators"]
    # E_q[r^2] = exp(900) dominates E[k3^2]; the other terms are below exp(13)
    assert out["k3"]["second_moment"] == "inf" and out["k3"]["log_second_moment"] == pytest.approx(900, rel=1e-14)
    assert out["rev_k3"]["mean"] == pytest.approx(450, rel=1e-14)  # KL(p||q) = 30^2 / 2
    assert math.isfinite(out["k3"]["std"])


def test_extreme_categorical_logits(tmp_path, capsys):
    q_logits, p_logits = [0.0, 800.0, 2.0], [0.3, 0.0, -0.5]
    q = _write(tmp_path / "q.txt", " ".join(map(str, q_logits)))
    p = _write(tmp_path / "p.txt", " ".join(map(str, p_logits)))
    out = _json(capsys, "exact", "--q-logits", q, "--p-logits", p, "--estimators", "k1,k3,rev_k1")["estimators"]
    for name in ("k1", "k3", "rev_k1"):
        reference = categorical_reference(name, q_logits, p_logits)
        assert _error(out[name]["mean"], reference["mean"], 1) < RTOL, name


@pytest.mark.parametrize(
    "argv, message",
    [
        (["mc", "--q", "0,1", "--p", "1,1", "--n", "inf"], "positive integer"),
        (["mc", "--q", "0,1", "--p", "1,1", "--n", "1e15", "--estimators", "k1"], "--force"),
        (["exact", "--q", "0,1", "--p", "1,1", "--expr", "sqrt(r - 1)"], "sqrt(r - 1) is not real for r < 1"),
        (["gradient", "--q", "0,1", "--p", "1,1", "--expr", "log(log(r))"], "log(log(r)) is not real for r < 1"),
        (["mc", "--q", "0,1", "--p", "1,1", "--n", "100", "--expr", "log(-r)"], "log(-r) is not real"),
        (["derive", "--expr", "\uff52 - 1"], "U+FF52"),
    ],
)
def test_one_clear_error(argv, message, capsys):
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse errors
        code = exit_.code
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]  # argparse prints its usage first; the error is one line
    assert code == 2 and message in last and "error:" in last and "Traceback" not in err, err


def test_derive_stays_within_its_time_budget(monkeypatch, tmp_path, capsys):
    import time

    monkeypatch.setenv("KLSYM_TIME_BUDGET", "3")
    monkeypatch.setenv("KLSYM_CACHE_DIR", str(tmp_path))
    started = time.monotonic()
    rows = _json(capsys, "derive", "--expr", "exp(exp(exp(exp(r))))")
    assert time.monotonic() - started < 3 + 5  # the budget, plus steps outside SymPy
    assert rows[0]["undecided"] and all(reason.startswith("undecided: ") for reason in rows[0]["undecided"])


def test_exact_time_budget_is_one_clear_error(capsys):
    code, _, err = _cli(
        capsys,
        "exact",
        "--q",
        "0,1",
        "--p",
        "0.5,1",
        "--estimators",
        "k1",
        "--expr",
        "exp(exp(exp(exp(r))))",
        "--time-budget",
        "2",
    )
    assert code == 2 and "time budget of 2 s ran out" in err and "exp(exp(exp(exp(r))))" in err


def test_piecewise_formula_end_to_end(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("KLSYM_CACHE_DIR", str(tmp_path))
    (row,) = _json(capsys, "derive", "--expr", "Abs(r - 1)")
    assert row["nonnegative"] is True and row["value"]["expectation"] == "2*total variation"
    out = _json(capsys, "exact", "--q", "0,1", "--p", "0.5,1", "--expr", "Abs(r - 1)", "--estimators", "k1")
    stats = out["estimators"]["Abs(r - 1)"]
    true_tv = math.erf(0.25 / math.sqrt(2))  # TV(N(0,1), N(0.5,1)) = 2 Phi(1/4) - 1; E|r - 1| = 2 TV
    assert stats["mean"] == pytest.approx(2 * true_tv, rel=1e-10)
    grad = _json(capsys, "gradient", "--q", "0,1", "--p", "0.5,1", "--expr", "Abs(r - 1)", "--estimators", "k1")
    assert set(grad["estimators"]["Abs(r - 1)"]["full"]) == {"mu", "sigma"}
    mc = _json(
        capsys,
        "mc",
        "--q",
        "0,1",
        "--p",
        "0.5,1",
        "--n",
        "20000",
        "--expr",
        "Abs(r - 1)",
        "--estimators",
        "k1",
        "--crosscheck",
        "--quiet",
    )
    assert abs(mc["crosscheck"]["estimators"]["Abs(r - 1)"]["mean"]["z"]) < 5


@pytest.mark.parametrize("formula", ["exp(exp(r))", "exp(100*r)", "r**r", "(r-1)**100", "Abs(log(r))"])
def test_allowed_formulas_give_a_result_or_one_error(formula, capsys):
    code, out, err = _cli(
        capsys,
        "exact",
        "--q",
        "0,1",
        "--p",
        "0.5,1",
        "--estimators",
        "k1",
        "--expr",
        formula,
        "--time-budget",
        "20",
        "--format",
        "json",
    )
    assert (code == 0 and json.loads(out)["estimators"][formula]["mean"] != "nan") or (
        code == 2 and len(err.strip().splitlines()) == 1
    ), (code, err)


def test_crosscheck_tolerates_rounding_and_flags_variance_by_condition(capsys):
    check = _json(
        capsys, "mc", "--q", "0,1", "--p", "30,1", "--n", "20000", "--estimators", "k3,k4", "--crosscheck", "--quiet"
    )["crosscheck"]
    assert abs(check["estimators"]["k4"]["mean"]["z"]) < 5  # k4 = log 2 to the last bit; se below rounding
    assert check["estimators"]["k3"]["infinite_variance"] is False  # E[k3^2] ~ e^900 is finite


def test_one_sample_has_no_spread_and_quantiles_stay_in_range(capsys):
    one = _json(capsys, "mc", "--q", "0,1", "--p", "1,1", "--n", "1", "--estimators", "k1,k3", "--quiet")
    assert one["estimators"]["k1"]["std"] == "nan" and one["estimators"]["k1"]["se"] == "nan"
    few = _json(capsys, "mc", "--q", "0,1", "--p", "1,1", "--n", "7", "--estimators", "k1,k2,k3,k4", "--quiet")
    for entry in few["estimators"].values():
        assert all(entry["min"] <= v <= entry["max"] for v in entry["quantiles"].values())


def test_two_dimensional_logits_file_is_refused(tmp_path, capsys):
    np.save(tmp_path / "q.npy", np.zeros((2, 3)))
    _write(tmp_path / "p.txt", "0 0 0")
    code, _, err = _cli(capsys, "exact", "--q-logits", tmp_path / "q.npy", "--p-logits", tmp_path / "p.txt")
    assert code == 2 and "shape (2, 3)" in err


def test_derive_expectation_column_is_true(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("KLSYM_CACHE_DIR", str(tmp_path))
    rows = {row["name"]: row for row in _json(capsys, "derive", "rev_k2", "k3")}
    assert rows["rev_k2"]["value"]["expectation"] == "1"  # E_q[r] = 1, not "zero"
    assert rows["k3"]["value"]["expectation"] == "KL(q||p)"
    _, table, _ = _cli(capsys, "derive", "rev_k2")
    header, _, line = table.splitlines()[:3]
    assert line.split()[header.split().index("E_q[k]")] == "1"


def test_gradients_are_labelled_alike_in_gradient_and_mc(capsys):
    grad = _json(capsys, "gradient", "--q", "0,1", "--p", "1,1", "--estimators", "k3")
    mc = _json(
        capsys, "mc", "--q", "0,1", "--p", "1,1", "--n", "2000", "--estimators", "k3", "--gradient", "loss", "--quiet"
    )
    assert set(grad["estimators"]["k3"]["loss"]) == set(mc["gradients"]["k3"]["loss"]["mean"]) == {"mu", "sigma"}


def _klsym_process(*argv):
    """The command in its own interpreter, with every warning shown: what a user's terminal gets."""
    import subprocess
    import sys

    return subprocess.Popen(
        [sys.executable, "-W", "default", "-m", "klsym", *map(str, argv)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_no_runtime_warning_reaches_the_user(tmp_path):
    q = _write(tmp_path / "q.txt", "0 0 0\n")
    p = _write(tmp_path / "p.txt", "0 -inf 0\n")
    proc = _klsym_process(
        "mc",
        "--q-logits",
        q,
        "--p-logits",
        p,
        "--n",
        "5000",
        "--gradient",
        "loss,reward,full",
        "--crosscheck",
        "--quiet",
    )
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0 and "Warning" not in err and "Traceback" not in err, err
    assert "rev_k1" in out


def test_ctrl_c_stops_with_what_was_merged():
    import signal
    import time

    proc = _klsym_process(
        "mc",
        "--q",
        "0,1",
        "--p",
        "1,1",
        "--n",
        "1e11",
        "--force",
        "--quiet",
        "--estimators",
        "k1",
        "--crosscheck",
        "--format",
        "json",
    )
    time.sleep(4)  # start-up (~1 s with numba's kernels, which a run of 1e11 loads), then a few blocks
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert "Traceback" not in err, err
    if proc.returncode == 130 and out:
        result = json.loads(out)
        assert 0 < result["n"] < 1e11 and result["interrupted"]["requested"] == int(1e11)
        assert abs(result["estimators"]["k1"]["mean"] - 0.5) < 5 * result["estimators"]["k1"]["se"]
    else:  # interrupted before the first block was merged (a slow machine): a clean message, no result
        assert proc.returncode == 130 and "interrupted" in err, (proc.returncode, err)


def test_large_vocabulary_float_path_near_equal():
    """Beyond MPMATH_SUPPORT tokens the sums run in float64; the log-ratios must still be cancellation-free."""
    from klsym.exact.expectations import MPMATH_SUPPORT

    rng = np.random.default_rng(11)
    q_logits = rng.normal(size=MPMATH_SUPPORT + 904)
    p_logits = q_logits + 1e-8 * rng.normal(size=q_logits.size)
    with mpmath.workdps(DIGITS):

        def log_softmax(logits):
            values = [mpmath.mpf(float(v)) for v in logits]
            top = max(values)
            norm = top + mpmath.log(mpmath.fsum(mpmath.exp(v - top) for v in values))
            return [v - norm for v in values]

        lq, lp = log_softmax(q_logits), log_softmax(p_logits)
        true = mpmath.fsum(mpmath.exp(a) * (mpmath.exp(b - a) - 1 - (b - a)) for a, b in zip(lq, lp))
    mean = estimator_stats("k3", Categorical(q_logits), Categorical(p_logits))["mean"]
    assert _error(mean, true, abs(true)) < RTOL


@pytest.mark.parametrize("formula", ["r**r", "Abs(log(r))", "(r-1)**100", "exp(exp(r))", "exp(100*r)"])
def test_derive_of_slow_formulas_returns_within_budget(formula, monkeypatch, tmp_path, capsys):
    import time

    monkeypatch.setenv("KLSYM_TIME_BUDGET", "3")
    monkeypatch.setenv("KLSYM_CACHE_DIR", str(tmp_path))
    started = time.monotonic()
    (row,) = _json(capsys, "derive", "--expr", formula)
    assert time.monotonic() - started < 3 + 5
    assert row["f1"] is None or row["f1"] != "nan"
    assert all(reason.startswith("undecided: ") for reason in row["undecided"])


@pytest.mark.parametrize(
    "pair, estimators, direction",
    [
        (("--q-logits", "q.txt", "--p-logits", "p.txt"), ("k1", "k3"), "KL(q||p)"),
        (("--q", "0,1e-300", "--p", "0,1"), ("rev_k1", "rev_k3"), "KL(p||q)"),
    ],
)
def test_bias_inf_minus_inf_is_labelled_undefined(pair, estimators, direction, tmp_path, capsys):
    _write(tmp_path / "q.txt", "0 0 0\n")
    _write(tmp_path / "p.txt", "0 -inf 0\n")
    argv = [
        "exact",
        *(str(tmp_path / a) if a.endswith(".txt") else a for a in pair),
        "--estimators",
        ",".join(estimators) + ",k4",
    ]
    out = _json(capsys, *argv)
    assert out["kl"][direction] == "inf"
    for name in estimators:
        stats = out["estimators"][name]
        assert stats["mean"] == "inf" and stats["bias"][direction] is None
        assert stats["bias_undefined"] == {direction: "inf - inf"}
    assert out["estimators"]["k4"]["bias"][direction] == "-inf"  # finite mean - inf stays -inf
    assert "bias_undefined" not in out["estimators"]["k4"]
    code, table, _ = _cli(capsys, *argv)
    assert code == 0 and "undefined (inf - inf)" in table and "nan" not in table


def test_formula_without_a_usable_taylor_branch_still_evaluates(tmp_path, capsys):
    """exp(exp(r)): its series at t = 0 has coefficients like exp(E) that Horner's Poly refuses, so there
    is no Taylor branch and the closed form is used everywhere (issue 11: no "cannot be compiled" error)."""
    q_logits, p_logits = [0.0, 0.0, 0.0], [0.0, 1.0, -1.0]
    q = _write(tmp_path / "q.txt", " ".join(map(str, q_logits)))
    p = _write(tmp_path / "p.txt", " ".join(map(str, p_logits)))
    with mpmath.workdps(DIGITS):
        q_probs = [mpmath.exp(v) / mpmath.fsum(map(mpmath.exp, q_logits)) for v in q_logits]
        p_probs = [mpmath.exp(v) / mpmath.fsum(map(mpmath.exp, p_logits)) for v in p_logits]
        true = mpmath.fsum(a * mpmath.exp(mpmath.exp(b / a)) for a, b in zip(q_probs, p_probs))
    argv = ["--q-logits", q, "--p-logits", p, "--estimators", "k1", "--expr", "exp(exp(r))"]
    mean = _json(capsys, "exact", *argv)["estimators"]["exp(exp(r))"]["mean"]
    assert _error(mean, true, abs(true)) < RTOL
    mc = _json(capsys, "mc", *argv, "--n", "20000", "--crosscheck", "--quiet")
    assert abs(mc["crosscheck"]["estimators"]["exp(exp(r))"]["mean"]["z"]) < 5
    e_at_1 = _json(capsys, "exact", "--q", "0,1", "--p", "0,1", "--estimators", "k1", "--expr", "exp(exp(r))")
    assert e_at_1["estimators"]["exp(exp(r))"]["mean"] == pytest.approx(math.exp(math.e), rel=1e-12)  # r = 1


def test_derive_time_budget_flag_bounds_the_whole_command(monkeypatch, tmp_path, capsys):
    import time

    monkeypatch.delenv("KLSYM_TIME_BUDGET", raising=False)
    monkeypatch.setenv("KLSYM_CACHE_DIR", str(tmp_path))
    started = time.monotonic()
    rows = _json(capsys, "derive", "--expr", "exp(exp(exp(exp(r))))", "--expr", "r**r", "--time-budget", "3")
    assert time.monotonic() - started < 3 + 5  # one budget for both formulas, not one each
    assert [row["name"] for row in rows] == ["exp(exp(exp(exp(r))))", "r**r"]
    assert rows[0]["undecided"] and all(reason.startswith("undecided: ") for row in rows for reason in row["undecided"])
    code, _, err = _cli(capsys, "derive", "k1", "--time-budget", "soon")
    assert code == 2 and err.strip() == "klsym: error: time budget must be a number of seconds, got 'soon'"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["derive", "--family", "bogus"], "argument --family: invalid choice: 'bogus' (choose from 'gaussian')"),
        (["derive", "--format", "xml"], "argument --format: invalid choice: 'xml'"),
        (["exact", "--q", "0,1", "--p", "1,1", "--format", "yaml"], "argument --format: invalid choice: 'yaml'"),
        (["gradient", "--q", "0,1", "--p", "1,1", "--positions", "x"], "argument --positions: invalid int value: 'x'"),
        (["bogus"], "argument COMMAND: invalid choice: 'bogus'"),
    ],
)
def test_usage_errors_are_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert err.count("\n") == 1 and err.startswith("klsym: error: ") and message in err, err
