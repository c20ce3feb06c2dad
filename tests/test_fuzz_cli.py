"""Fuzz (issue 11): formulas, parameters from 1e-300 to 1e300 with nan/inf, and command lines for every
command. Whatever comes in: no traceback, no hang, and no non-finite number where the true value is
finite. Examples are bounded and derandomised (the same cases on every CI run, about a minute in all).
"""

import json
import math

import mpmath
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from klsym.cli import main
from klsym.derive.formula import FormulaError, parse_formula
from klsym.exact.expectations import estimator_stats, kl_divergences
from klsym.exact.families import Categorical, Gaussian

FUZZ = settings(
    deadline=None,
    derandomize=True,
    database=None,
    max_examples=100,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.function_scoped_fixture],
)

# --- formulas ------------------------------------------------------------------------------------

_LEAVES = st.sampled_from(["r", "t", "1", "2", "0.5", "pi", "E", "100", "-1", "0"])


def _formulas():
    def extend(inner):
        unary = st.tuples(st.sampled_from(["log", "exp", "sqrt", "Abs", "-"]), inner).map(
            lambda pair: f"-({pair[1]})" if pair[0] == "-" else f"{pair[0]}({pair[1]})"
        )
        binary = st.tuples(inner, st.sampled_from(["+", "-", "*", "/", "**", "^"]), inner).map(
            lambda triple: f"({triple[0]}){triple[1]}({triple[2]})"
        )
        return unary | binary

    return st.recursive(_LEAVES, extend, max_leaves=6)


@FUZZ
@given(_formulas())
def test_generated_formulas_parse_or_fail_clearly(text):
    try:
        expr = parse_formula(text)
    except FormulaError as err:
        assert str(err) and "\n" not in str(err)
        return
    assert expr.free_symbols <= {parse_formula("r")}


@settings(FUZZ, max_examples=60)
@given(st.text(max_size=40))
def test_arbitrary_text_parses_or_fails_clearly(text):
    try:
        parse_formula(text)
    except FormulaError:
        pass


# --- parameters ----------------------------------------------------------------------------------

_MAGNITUDES = st.sampled_from([1e-300, 1e-200, 1e-8, 0.5, 1.0, 3.0, 1e8, 1e200, 1e300])
_SPECIAL = st.sampled_from([math.nan, math.inf, -math.inf, 0.0, -1.0])
_SIGMA = _MAGNITUDES | _SPECIAL
_MU = (
    st.tuples(st.sampled_from([-1.0, 1.0]), _MAGNITUDES).map(lambda pair: pair[0] * pair[1])
    | _SPECIAL
    | st.floats(-40, 40)
)


def _true_kl(a, b):
    with mpmath.workdps(60):
        (m1, s1), (m2, s2) = [tuple(map(mpmath.mpf, pair)) for pair in (a, b)]
        return mpmath.log(s2 / s1) + (s1**2 + (m1 - m2) ** 2) / (2 * s2**2) - mpmath.mpf(1) / 2


@settings(FUZZ, max_examples=25)
@given(_MU, _SIGMA, _MU, _SIGMA)
def test_gaussian_parameters(mu_q, sigma_q, mu_p, sigma_p):
    try:
        q, p = Gaussian(mu_q, sigma_q), Gaussian(mu_p, sigma_p)
    except ValueError as err:  # nan, inf, sigma <= 0: refused, naming the parameter
        assert "mu" in str(err) or "sigma" in str(err)
        return
    kl = kl_divergences(q, p)
    for label, (a, b) in (("KL(q||p)", (q.params, p.params)), ("KL(p||q)", (p.params, q.params))):
        true = _true_kl(a, b)
        if true < 1e300:
            assert math.isfinite(kl[label]) and abs(kl[label] - float(true)) <= 1e-10 * float(true) + 1e-300, label
        else:
            assert kl[label] == math.inf
    stats = estimator_stats("k3", q, p)
    assert not math.isnan(stats["mean"]) and not math.isnan(stats["std"])
    if math.isfinite(kl["KL(q||p)"]):
        assert stats["mean"] == pytest.approx(kl["KL(q||p)"], rel=1e-10)  # E_q[k3] = KL(q||p)


_LOGIT = st.sampled_from(
    [0.0, 1.0, -1.0, 800.0, -800.0, 1e300, -1e300, 1e-300, math.nan, math.inf, -math.inf]
) | st.floats(-30, 30)


def _true_categorical_kl(q_logits, p_logits):
    with mpmath.workdps(60):

        def log_softmax(logits):
            finite = [mpmath.mpf(v) for v in logits if v != -math.inf]
            top = max(finite)
            norm = top + mpmath.log(mpmath.fsum(mpmath.exp(v - top) for v in finite))
            return [mpmath.mpf(v) - norm if v != -math.inf else -mpmath.inf for v in logits]

        lq, lp = log_softmax(q_logits), log_softmax(p_logits)
        if any(a != -mpmath.inf and b == -mpmath.inf for a, b in zip(lq, lp)):
            return mpmath.inf
        return mpmath.fsum(mpmath.exp(a) * (a - b) for a, b in zip(lq, lp) if a != -mpmath.inf)


@settings(FUZZ, max_examples=40)
@given(
    st.integers(1, 5).flatmap(
        lambda size: st.tuples(
            st.lists(_LOGIT, min_size=size, max_size=size), st.lists(_LOGIT, min_size=size, max_size=size)
        )
    )
)
def test_categorical_logits(pair):
    q_logits, p_logits = pair
    try:
        q, p = Categorical(q_logits), Categorical(p_logits)
    except ValueError as err:
        assert "logits" in str(err)
        return
    true = _true_categorical_kl(q_logits, p_logits)
    kl = kl_divergences(q, p)["KL(q||p)"]
    if mpmath.isfinite(true):
        assert math.isfinite(kl) and abs(kl - float(true)) <= 1e-10 * abs(float(true)) + 1e-14
    else:
        assert kl == math.inf
    for name in ("k3", "rev_k1"):
        stats = estimator_stats(name, q, p)
        assert not math.isnan(stats["mean"]), name
    assert estimator_stats("k1", q, p)["mean"] == pytest.approx(kl, rel=1e-10, abs=1e-14)


# --- command lines -------------------------------------------------------------------------------

_PAIRS = st.sampled_from(
    ["0,1", "1,1", "0,1e-300", "0,1e300", "1e200,1", "nan,1", "0,inf", "0,-1", "1,2,3", "a,b", "30,1", "1e-8,1"]
)
_ESTIMATORS = st.sampled_from(["k1", "k3", "k1,k4", "rev_k1,rev_k3", "k9", "", "k3+,low_var_kl"])
_FORMULAS = st.sampled_from(
    ["(r-1)**2/2", "Abs(r - 1)", "sqrt(r - 1)", "log(-r)", "r**", "exp(100*r)", "\uff52", "t**2", "1/(r-1)"]
)
_COUNTS = st.sampled_from(["1", "2", "1000", "0", "-5", "inf", "nan", "1e15", "2.5", "x"])


def _argv(command):
    common = st.tuples(st.just("--q"), _PAIRS, st.just("--p"), _PAIRS, st.just("--estimators"), _ESTIMATORS)
    extras = {
        "exact": st.lists(
            st.sampled_from(
                [
                    ("--expr", "(r-1)**2/2"),
                    ("--positions", "2"),
                    ("--positions", "0"),
                    ("--format", "json"),
                    ("--format", "xml"),
                ]
            ),
            max_size=2,
        ),
        "gradient": st.lists(st.sampled_from([("--expr", "Abs(r - 1)"), ("--format", "json")]), max_size=2),
        "mc": st.lists(
            st.tuples(st.just("--n"), _COUNTS)
            | st.sampled_from(
                [
                    ("--gradient", "loss"),
                    ("--gradient", "bogus"),
                    ("--crosscheck",),
                    ("--quantiles", "0.5,2"),
                    ("--dtype", "float32"),
                    ("--batch-size", "10"),
                ]
            ),
            max_size=3,
        ),
    }
    if command == "derive":
        return st.lists(st.sampled_from(["k1", "rev_k2", "k9"]), max_size=2).flatmap(
            lambda names: st.lists(_FORMULAS, max_size=1).map(
                lambda formulas: ["derive", *names, *[a for f in formulas for a in ("--expr", f)]]
            )
        )
    return st.tuples(common, extras[command]).map(
        lambda parts: (
            [command, *parts[0], *[a for extra in parts[1] for a in extra]]
            + (
                ["--n", "500", "--quiet"]
                if command == "mc" and "--n" not in [a for e in parts[1] for a in e]
                else (["--quiet"] if command == "mc" else [])
            )
        )
    )


@settings(FUZZ, max_examples=20)
@given(argv=st.sampled_from(["derive", "exact", "gradient", "mc"]).flatmap(_argv))
def test_command_lines(argv, monkeypatch_session_budget, capsys):
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse: usage error
        code = exit_.code
    out, err = capsys.readouterr()
    assert code in (0, 2), (argv, code, err)
    assert "Traceback" not in err, (argv, err)
    if code == 2:
        assert "error:" in err.strip().splitlines()[-1]
    elif "json" in argv:
        json.loads(out)  # strict JSON: non-finite numbers written as strings


@pytest.fixture(scope="module")
def monkeypatch_session_budget(tmp_path_factory):
    """Short time budgets and a private cache: a fuzzed derive cannot hang the suite."""
    mp = pytest.MonkeyPatch()
    mp.setenv("KLSYM_TIME_BUDGET", "3")
    mp.setenv("KLSYM_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
    yield
    mp.undo()


def test_json_output_is_strict_for_non_finite_values(capsys):
    assert main(["exact", "--q", "0,1", "--p", "0,1e-300", "--estimators", "k1", "--format", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["kl"]["KL(q||p)"] == "inf"
    assert np.isfinite(data["kl"]["KL(p||q)"])
