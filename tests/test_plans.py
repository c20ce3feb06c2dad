"""The exact layer's plans (klsym.exact.plans): derived by SymPy once, read from disk afterwards with the same
numbers; a changed formula or deriving module is derived afresh; a warm `exact`/`gradient`/`mc` imports no SymPy;
the Monte Carlo engine runs the plans' functions, the SymPy-compiled ones bit for bit."""

import json
import subprocess
import sys
import types
from pathlib import Path

import mpmath
import numpy as np
import pytest
import sympy as sp

from klsym.derive import estimators as est
from klsym.derive import gaussian_closed_form as gcf
from klsym.derive.registry import ALIASES, BUILTIN_INFO
from klsym.exact import plans
from klsym.exact.expectations import _bisect_sign_changes, estimator_stats
from klsym.exact.families import Categorical, Gaussian, log_softmax, ndtr
from klsym.jsonio import dumps
from klsym.simulate.backend import Backend, get_backend
from klsym.simulate.driver import KERNELS_ENV
from klsym.simulate.montecarlo import GRADIENT_MODES, gradient, run

VALUES = np.array([-700.0, -30.0, -1.0, -1e-4, 0.0, 1e-12, 0.5, 30.0, 41.0, 700.0])


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KLSYM_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(plans, "_PLANS", {})  # as in a new process
    return tmp_path


def _count_derivations(monkeypatch):
    calls = []
    for part, derive in list(plans._DERIVE.items()):

        def counted(estimator, part=part, derive=derive):
            calls.append((part, estimator.name))
            return derive(estimator)

        monkeypatch.setitem(plans._DERIVE, part, counted)
    return calls


def _forbid_sympy_steps(monkeypatch):
    for part in plans._DERIVE:
        monkeypatch.setitem(plans._DERIVE, part, lambda estimator: pytest.fail("a part was derived again"))


def _read_everything(plan):
    return (
        plan.numeric(VALUES),
        plan.numeric_dt(VALUES),
        {
            need: None if terms is None else [(t.coefficient(), t.a, t.n) for terms in [terms] for t in terms]
            for need, terms in plan.terms.items()
        },
        plan.conditions,
        plan.limit("value"),
        plan.limit("slope"),
        list(plan.mp_function("value")(np.array([mpmath.mpf("0.25"), -mpmath.inf], dtype=object))),
    )


@pytest.mark.parametrize("name", list(BUILTIN_INFO))
def test_builtin_plan_is_derived_once_then_read_with_the_same_numbers(cache, monkeypatch, name):
    calls = _count_derivations(monkeypatch)
    fresh = _read_everything(plans.plan_of(name))
    assert sorted(part for part, _ in calls) == sorted(plans._DERIVE)
    monkeypatch.setattr(plans, "_PLANS", {})
    _forbid_sympy_steps(monkeypatch)
    warm = _read_everything(plans.plan_of(name))
    assert np.array_equal(fresh[0], warm[0], equal_nan=True) and np.array_equal(fresh[1], warm[1], equal_nan=True)
    assert fresh[2:] == warm[2:]


@pytest.mark.parametrize("name", list(BUILTIN_INFO))
def test_builtin_plan_holds_what_sympy_derives(cache, name):
    """The plan's numbers are the Estimator's: its numeric forms, decompositions, conditions and limits."""
    estimator, plan = est.get_estimator(name), plans.plan_of(name)
    assert plan.name == name and plan.target == estimator.target
    assert np.array_equal(plan.numeric(VALUES), estimator.numeric(VALUES), equal_nan=True)
    assert np.array_equal(plan.numeric_dt(VALUES), estimator.numeric_dt(VALUES), equal_nan=True)
    decomposed = {
        "value": gcf.decompose(estimator.expr),
        "square": gcf.decompose(sp.expand(estimator.expr**2)),
        "surrogate": gcf.decompose(estimator.surrogate),
    }
    for need, terms in decomposed.items():
        got = plan.terms[need]
        assert (got is None) == (terms is None)
        if terms is not None:
            assert [(sp.Rational(t.c_float), sp.Rational(t.a.numerator, t.a.denominator), t.n) for t in got] == [
                (sp.Rational(c), sp.Rational(a), n) for c, a, n in terms
            ]
    if decomposed["value"] is not None:
        powers = [a for _, a, _ in decomposed["square"]]
        assert plan.conditions["second_moment"] == gcf.moment_condition_text(powers)
    t = sp.Symbol("t", real=True)
    value_in_t = est.in_logratio(estimator.expr)
    assert plan.limit("value") == float(sp.limit(value_in_t, t, -sp.oo))
    assert plan.limit("slope") == float(sp.limit(sp.diff(est.in_logratio(estimator.surrogate), t), t, -sp.oo))


def test_names_aliases_and_estimators_share_one_plan(cache):
    for alias, name in ALIASES.items():
        assert plans.plan_of(alias) is plans.plan_of(name) is plans.plan_of(est.get_estimator(name))
    assert list(BUILTIN_INFO) == list(est.BUILTINS)
    impostor = est.Estimator("k3", sp.log(est.r) ** 2, "KL(q||p)")  # a built-in's name, another formula
    assert plans.plan_of(impostor) is not plans.plan_of("k3")
    q, p = Gaussian(0.0, 1.0), Gaussian(1.0, 1.1)
    assert estimator_stats(impostor, q, p)["mean"] == estimator_stats("k2", q, p)["mean"] * 2


def test_one_formula_under_two_names_keeps_both_names(cache, monkeypatch):
    from klsym.exact.expectations import exact_summary

    calls = _count_derivations(monkeypatch)
    first, second = est.from_formula("r - 1 - log(r)"), est.control_variate(1)  # k3's formula twice
    summary = exact_summary(Gaussian(0.0, 1.0), Gaussian(0.5, 1.2), [first, second, "k3"])
    assert list(summary["estimators"]) == ["r - 1 - log(r)", "cv(1)", "k3"]
    assert (
        summary["estimators"]["cv(1)"]["target"] == "KL(q||p)"
        and summary["estimators"]["r - 1 - log(r)"]["target"] is None
    )
    assert len({entry["mean"] for entry in summary["estimators"].values()}) == 1
    shared = [part for part, name in calls if name in ("r - 1 - log(r)", "cv(1)")]
    assert shared and len(shared) == len(set(shared))  # each part derived once for the shared formula


def test_a_changed_formula_is_derived_afresh(cache, monkeypatch):
    calls = _count_derivations(monkeypatch)
    q, p = Gaussian(0.0, 1.0), Gaussian(0.5, 1.2)
    base = estimator_stats(est.from_formula("r - 1 - log(r)"), q, p)
    assert base["mean"] == estimator_stats("k3", q, p)["mean"]
    derived = len(calls)
    assert derived > 0
    estimator_stats(est.from_formula("r - 1 - log(r)"), q, p)  # the same formula: read from disk
    assert len(calls) == derived
    changed = estimator_stats(est.from_formula("r - 1 - log(r) + log(r)**3 / 6"), q, p)
    assert len(calls) > derived and changed["mean"] != base["mean"]


@pytest.mark.parametrize(
    "edited", ["derive/estimators.py", "derive/gaussian_closed_form.py", "derive/generated.py", "exact/plans.py"]
)
def test_a_changed_deriving_module_is_derived_afresh(cache, monkeypatch, tmp_path_factory, edited):
    _ = plans.plan_of("k3").terms
    sources = list(plans.DERIVING_SOURCES)
    index = [i for i, path in enumerate(sources) if path.endswith(edited)][0]
    copy = tmp_path_factory.mktemp("src") / "module.py"
    copy.write_text(open(sources[index]).read() + "\n# an edit\n")
    sources[index] = str(copy)
    monkeypatch.setattr(plans, "DERIVING_SOURCES", tuple(sources))
    monkeypatch.setattr(plans, "_PLANS", {})
    calls = _count_derivations(monkeypatch)
    _ = plans.plan_of("k3").terms
    assert calls == [("gaussian", "k3")]
    assert len(list(cache.glob("plan-gaussian-*.json"))) == 2


#: Packages a warm exact/gradient must not import: SymPy, SciPy (any of it), pandas, numba (~0.3-0.8 s each).
HEAVY = ("sympy", "scipy", "pandas", "numba")


def _run_cli(args, cache_dir, watched=HEAVY):
    """stdout of ``klsym ARGS`` run by klsym.cli.main in a new process, and which of ``watched`` it imported."""
    code = (
        "import sys; from klsym.cli import main; main(sys.argv[1:]); "
        f"print(sorted(m for m in {tuple(watched)!r} if m in sys.modules), file=sys.stderr)"
    )
    env = {"KLSYM_CACHE_DIR": str(cache_dir), "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, check=True, env=env)
    return done.stdout, json.loads(done.stderr.strip().replace("'", '"'))


@pytest.fixture(scope="module")
def plans_cache(tmp_path_factory):
    """One derivation cache for the warm-subprocess tests below: whichever runs first derives the built-ins' plans
    (seconds, in a subprocess), the others read them. That a first run derives is tested in-process above."""
    return tmp_path_factory.mktemp("plans-cache")


@pytest.mark.parametrize("command", ["exact", "gradient"])
def test_warm_exact_and_gradient_import_neither_sympy_nor_scipy_nor_pandas(plans_cache, tmp_path, command):
    """Every built-in on a Gaussian or a categorical pair, once the plans are on disk: none of :data:`HEAVY`
    (the whole process then takes ~0.3 s); the output is the first run's."""
    args = [command, "--q", "0,1", "--p", "1,1.1", "--format", "json"]
    first, _ = _run_cli(args, plans_cache)
    warm, warm_modules = _run_cli(args, plans_cache)
    assert warm_modules == [] and warm == first
    logits = tmp_path / "q.txt"
    logits.write_text("0.0 1.0 -0.5")
    categorical = [command, "--q-logits", str(logits), "--p-logits", str(logits), "--format", "json"]
    _run_cli(categorical, plans_cache)
    assert _run_cli(categorical, plans_cache)[1] == []


def _logits_files(directory):
    """A categorical pair whose p has a -inf logit on q's support (tokens with p(x) = 0: the limits at t = -inf)."""
    (directory / "q.txt").write_text("0.0 1.0 -0.5 2.0")
    (directory / "p.txt").write_text("0.5 -inf 1.0 0.0")
    return ["--q-logits", str(directory / "q.txt"), "--p-logits", str(directory / "p.txt")]


def _without_seconds(output: str) -> dict:
    result = json.loads(output)
    del result["seconds"]
    return result


@pytest.mark.parametrize(
    "family, options",
    [("gaussian", []), ("categorical", []), ("categorical", ["--dtype", "float32", "--chunk", "1"])],
)
def test_warm_mc_imports_neither_sympy_nor_scipy_nor_pandas(plans_cache, tmp_path, family, options):
    """``klsym mc`` on every built-in, values and all gradient modes: once the plans are on disk the warm run imports
    none of :data:`HEAVY` (nor tqdm: ``--quiet``) and prints the first run's numbers (all but the run time)."""
    pair = ["--q", "0,1", "--p", "0.1,1"] if family == "gaussian" else _logits_files(tmp_path)
    args = ["mc", *pair, "--n", "1e5", "--gradient", ",".join(GRADIENT_MODES), *options, "--quiet", "--format", "json"]
    first, _ = _run_cli(args, plans_cache, (*HEAVY, "tqdm"))
    warm, warm_modules = _run_cli(args, plans_cache, (*HEAVY, "tqdm"))
    assert warm_modules == [] and _without_seconds(warm) == _without_seconds(first)


def test_progress_bar_only_when_asked_and_it_counts_every_sample(monkeypatch):
    from klsym.simulate import driver

    bars = []
    make_bar = driver._progress_bar
    monkeypatch.setattr(driver, "_progress_bar", lambda total: bars.append(make_bar(total)) or bars[-1])
    q, p = Gaussian(0.0, 1.0), Gaussian(1.0, 1.0)
    run(q, p, "k1", n=150_001, progress=False)
    assert bars == []
    run(q, p, "k1", n=150_001, progress=True)
    assert [(bar.n, bar.total) for bar in bars] == [(150_001, 150_001)]


#: Log-ratios around the Taylor radius, k4's switch at t = 40, the extremes, the infinities and nan.
T_GRID = np.concatenate([VALUES, [2e-4, -5e-4, 1e-3, -1e-3, 40.0, 40.5, -np.inf, np.inf, np.nan]])


def _bits(values):
    return values.view(f"u{values.dtype.itemsize}")


@pytest.mark.parametrize("name", [*BUILTIN_INFO, "r - 1 - log(r) + log(r)**3 / 6"])
def test_numpy_backend_runs_the_plans_functions_the_sympy_compiled_ones_bit_for_bit(cache, monkeypatch, name):
    """The NumPy backend evaluates a plan's function read from disk; the backend compiled the Estimator's SymPy body
    itself before plans (as it still does for CuPy): the same bits and dtype, in float64 and float32."""
    estimator = est.get_estimator(name) if name in BUILTIN_INFO else est.from_formula(name)
    _ = plans.plan_of(estimator).numeric, plans.plan_of(estimator).numeric_dt  # derived, on disk
    monkeypatch.setattr(plans, "_PLANS", {})
    plan, backend = plans.plan_of(estimator), get_backend("numpy")
    assert backend.value_function(estimator) is plan.numeric and backend.derivative_function(plan) is plan.numeric_dt
    for ours, reference in ((plan.numeric, estimator.numeric), (plan.numeric_dt, estimator.numeric_dt)):
        compiled = est.compile_logratio_function(reference.expression, "numpy", xp=np)
        for dtype in (np.float64, np.float32):
            values = T_GRID.astype(dtype)
            got, expected = ours(values), compiled(values)
            assert got.dtype == expected.dtype == dtype and np.array_equal(_bits(got), _bits(expected))


def _sympy_compiled_numpy() -> Backend:
    """NumPy under another module's name: the engine compiles each Estimator's SymPy body for it (the NumPy path
    before plans, the CuPy path now)."""
    module = types.ModuleType("numpy_compiled_by_sympy")
    module.__getattr__ = lambda name: getattr(np, name)
    numpy_backend = get_backend("numpy")
    return Backend("numpy", module, "numpy", numpy_backend.block_size, numpy_backend.generator_factory)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("family", ["gaussian", "categorical"])
def test_mc_on_plans_gives_the_numbers_of_sympy_compiled_estimators(monkeypatch, family, dtype):
    """run and gradient on built-in names or plans (the plans' functions read from disk) give what they give on
    Estimator objects whose SymPy bodies the backend compiles: every statistic and gradient, bit for bit. (Both sides
    take the limits at t = -inf from the plans: SymPy's, see test_builtin_plan_holds_what_sympy_derives.)"""
    monkeypatch.setenv(KERNELS_ENV, "off")  # the same array code on both sides
    if family == "gaussian":
        q, p = Gaussian(0.2, 1.3), Gaussian(1.0, 1.1)
    else:
        q, p = Categorical([0.0, 1.0, -0.5, 2.0]), Categorical([0.5, -np.inf, 1.0, 0.0])
    options = {"n": 150_001, "seed": 3, "dtype": dtype, "chunk": 1 << 17}
    reference = {"backend": _sympy_compiled_numpy(), **options}
    estimators = list(est.BUILTINS.values())
    assert reference["backend"].value_function(estimators[0]) is not plans.plan_of("k1").numeric
    named = run(q, p, ",".join(BUILTIN_INFO), **options)
    compiled = run(q, p, estimators, **reference)
    planned = gradient(q, p, [plans.plan_of(name) for name in BUILTIN_INFO], modes=GRADIENT_MODES, **options)
    compiled_gradients = gradient(q, p, estimators, modes=GRADIENT_MODES, **reference)
    for ours, theirs in ((named, compiled), (planned, compiled_gradients)):
        del ours["seconds"], theirs["seconds"]
        assert dumps(ours) == dumps(theirs)
    if family == "categorical":  # where p(x) = 0: k1 = +inf, rev_k1 = 0 log 0 = 0 (the formula gives 0 * -inf = nan)
        assert named["estimators"]["k1"]["max"] == np.inf and named["estimators"]["rev_k1"]["n_nonfinite"] == 0


# --- P(k < 0) without brentq, normal CDF and log-softmax without SciPy ----------------------------------------


def _exact_prob_log_ratio_positive(q, p):
    """P_q(t > 0) in 50-digit mpmath: t(x) is quadratic in x, its roots in closed form."""
    with mpmath.workdps(50):
        mq, sq, mp_, sp_ = (mpmath.mpf(v) for v in (*q, *p))
        a = 1 / (2 * sq**2) - 1 / (2 * sp_**2)
        b = -mq / sq**2 + mp_ / sp_**2
        c = mq**2 / (2 * sq**2) - mp_**2 / (2 * sp_**2) + mpmath.log(sq / sp_)

        def cdf(x):
            return mpmath.ncdf(x, mq, sq)

        if a == 0:
            return 1 - cdf(-c / b) if b > 0 else cdf(-c / b)
        disc = b**2 - 4 * a * c
        if disc <= 0:
            return mpmath.mpf(1 if a > 0 else 0)
        lo, hi = sorted([(-b - mpmath.sqrt(disc)) / (2 * a), (-b + mpmath.sqrt(disc)) / (2 * a)])
        inside = cdf(hi) - cdf(lo)
        return 1 - inside if a > 0 else inside


@pytest.mark.parametrize(
    "q, p",
    [
        ((0, 1), (1, 1)),
        ((0, 1), (1, 1.1)),
        ((0, 1), (0, 1.5)),
        ((2, 0.5), (-1, 2)),
        ((0, 1), (5, 3)),
        ((0, 1), (0.1, 0.95)),
    ],
)
@pytest.mark.parametrize("name", ["k1", "k1+", "rev_k1"])
def test_prob_negative_is_exact_to_a_few_ulps(q, p, name):
    """k1 < 0 and r log r < 0 exactly where t > 0 (t < 0): the bisected roots and the erfc-based masses agree
    with 50-digit arithmetic to a few units in the last place (brentq's and SciPy's ndtr did too)."""
    exact = _exact_prob_log_ratio_positive(q, p)
    exact = exact if name != "rev_k1" else 1 - exact
    got = estimator_stats(name, Gaussian(*q), Gaussian(*p))["prob_negative"]
    assert abs(got - float(exact)) <= 8 * np.finfo(float).eps * float(exact)


def test_bisection_finds_every_flip_at_once():
    roots = _bisect_sign_changes(lambda z: np.sin(z) < 0, np.array([3.0, 6.0, -0.5]), np.array([3.5, 6.5, 0.5]))
    assert np.allclose(roots, [np.pi, 2 * np.pi, 0.0], rtol=0, atol=4e-16)


def test_ndtr_and_log_softmax_match_scipy():
    from scipy import special

    rng = np.random.default_rng(7)
    z = np.concatenate([rng.normal(0, 2, 5000), rng.uniform(-38, 38, 5000), [0.0, -0.0, np.inf, -np.inf, np.nan]])
    # libm's erfc vs cephes': a few ulps, and libm keeps the subnormal tail below z = -37.5 that cephes flushes to 0
    np.testing.assert_allclose(ndtr(z), special.ndtr(z), rtol=1e-13, atol=np.finfo(float).tiny)
    for logits in [rng.normal(0, 5, 50), np.array([0.0, 1.0, -np.inf]), np.array([1000.0, 1.0]), np.full(3, -1e300)]:
        assert np.array_equal(log_softmax(logits), special.log_softmax(logits))  # the same operations
    assert np.array_equal(Categorical([0.0, 2.0, -np.inf]).log_probs, special.log_softmax([0.0, 2.0, -np.inf]))


def test_warm_derive_of_builtins_reads_its_rows_without_sympy(tmp_path):
    """``klsym derive`` (all built-ins, and a named one): the warm run imports none of :data:`HEAVY` and prints
    the cold run's table and JSON."""
    for args in (["derive", "low_var_kl", "k4", "--format", "json"], ["derive"]):
        cold, cold_modules = _run_cli(args, tmp_path)
        warm, warm_modules = _run_cli(args, tmp_path)
        assert "sympy" in cold_modules  # the first run derives (k3 and k4; then the other built-ins)
        assert warm == cold and warm_modules == []


def test_derive_rows_are_derived_afresh_when_a_deriving_module_changes(tmp_path, monkeypatch):
    from klsym.cli import derive as derive_command
    from klsym.derive import symbolic

    monkeypatch.setenv("KLSYM_CACHE_DIR", str(tmp_path))
    calls = []
    analyze = symbolic.analyze
    monkeypatch.setattr(symbolic, "analyze", lambda e: calls.append(e.name) or analyze(e))
    first = derive_command.builtin_row("k3")
    assert derive_command.builtin_row("k3") == first and calls == ["k3"]  # the second read is the cache's
    edited = tmp_path / "symbolic.py"
    edited.write_text(Path(symbolic.__file__).read_text() + "\n# edited\n")
    sources = tuple(str(edited) if s.endswith("symbolic.py") else s for s in derive_command.DERIVING_SOURCES)
    monkeypatch.setattr(derive_command, "DERIVING_SOURCES", sources)
    assert derive_command.builtin_row("k3") == first and calls == ["k3", "k3"]
