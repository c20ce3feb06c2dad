"""Derivations cached on disk across processes: the Gaussian closed-form terms (generated code) and the
numeric bodies of estimators (srepr text); a changed formula or a changed deriving module derives afresh."""

import subprocess
import sys

import mpmath
import numpy as np
import pytest
import sympy as sp

from klsym.derive import estimators as est
from klsym.derive import gaussian_closed_form as gcf
from klsym.derive.symbols import r

TERM_ARGS = (mpmath.mpf(0.3), mpmath.mpf(1.2), mpmath.mpf(-0.4), mpmath.mpf(0.9), mpmath.mpf(2))


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KLSYM_CACHE_DIR", str(tmp_path))
    gcf._term_function.cache_clear()
    yield tmp_path
    gcf._term_function.cache_clear()


def _count_calls(monkeypatch, module, name):
    calls = []
    original = getattr(module, name)

    def counted(*args):
        calls.append(args)
        return original(*args)

    monkeypatch.setattr(module, name, counted)
    return calls


def _forbid(monkeypatch, module, name):
    def fail(*args):
        raise AssertionError(f"{name} ran although its result was cached")

    monkeypatch.setattr(module, name, fail)


def test_gaussian_term_is_derived_once_then_read_from_disk(cache, monkeypatch):
    calls = _count_calls(monkeypatch, gcf, "_term_source")
    fresh = gcf._term_function(sp.Integer(1), 2)(*TERM_ARGS)
    assert len(calls) == 1 and len(list(cache.glob("gaussian-term-*.json"))) == 1
    gcf._term_function.cache_clear()  # as in a new process
    _forbid(monkeypatch, gcf, "_term_source")
    cached = gcf._term_function(sp.Integer(1), 2)(*TERM_ARGS)
    assert [mpmath.almosteq(a, b, rel_eps=mpmath.mpf(10) ** -14) for a, b in zip(fresh, cached)] == [True] * 5
    assert fresh == cached  # the same generated code: the same numbers


def test_a_changed_formula_is_derived_afresh(cache, monkeypatch):
    k3 = est.get_estimator("k3")
    gcf.warm(gcf.decompose(k3.expr))
    before = set(cache.glob("gaussian-term-*.json"))
    calls = _count_calls(monkeypatch, gcf, "_term_source")
    gcf.warm(gcf.decompose(k3.expr))
    assert calls == []
    changed = est.from_formula("r - 1 - log(r) + log(r)**3 / 6")  # a new term r^0 t^3
    gcf.warm(gcf.decompose(changed.expr))
    assert [(a, n) for a, n in calls] == [(0, 3)]
    assert len(set(cache.glob("gaussian-term-*.json")) - before) == 1


def test_a_changed_deriving_module_is_derived_afresh(cache, monkeypatch, tmp_path_factory):
    gcf._term_function(sp.Integer(0), 1)
    edited = tmp_path_factory.mktemp("src") / "gaussian_closed_form.py"
    edited.write_text(open(gcf.__file__).read() + "\n# an edit\n")
    gcf._term_function.cache_clear()
    monkeypatch.setattr(gcf, "__file__", str(edited))
    calls = _count_calls(monkeypatch, gcf, "_term_source")
    gcf._term_function(sp.Integer(0), 1)
    assert len(calls) == 1 and len(list(cache.glob("gaussian-term-*.json"))) == 2


def test_numeric_body_is_cached_and_equal(cache, monkeypatch):
    expr = sp.log((r - 1) ** 2 / 3 + 1)  # not a built-in: nothing cached in-process
    fresh = est.make_numeric(expr).expression
    assert len(list(cache.glob("numeric-*.json"))) == 1
    _forbid(monkeypatch, est, "_taylor")
    assert est.make_numeric(expr).expression == fresh
    with pytest.raises(AssertionError, match="cached"):  # another formula: derived again
        est.make_numeric(expr + r)


def test_cli_imports_only_the_subcommand_it_runs():
    code = (
        "import sys; from klsym.cli import build_parser; build_parser('derive'); "
        "print(sorted(m for m in sys.modules if m.startswith('klsym.cli.')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['klsym.cli.derive']"


@pytest.mark.parametrize("command", ["exact", "gradient", "mc"])
def test_behaviour_options_do_not_import_the_offpolicy_machinery(command):
    """``--behaviour`` option names and defaults come from klsym.rl.weightings; klsym.rl.offpolicy (scipy.optimize,
    pandas) is imported only when a behaviour policy is given."""
    code = (
        f"import sys; from klsym.cli import build_parser; build_parser({command!r}).parse_args([{command!r}]); "
        "print('klsym.rl.offpolicy' in sys.modules, 'pandas' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_weightings_are_the_ones_offpolicy_uses():
    from klsym.rl import offpolicy, weightings

    for name in weightings.__all__:
        assert getattr(offpolicy, name) is getattr(weightings, name)


@pytest.mark.parametrize("name", sorted(est.BUILTINS))
def test_numeric_forms_warm_from_generated_code(cache, monkeypatch, name):
    """A warm make_numeric compiles the cached generated code: no series, no sympify, no lambdify; same numbers
    as compiling the SymPy body; a changed formula or a changed module is generated afresh."""
    estimator = est.get_estimator(name)
    e_t = est.in_logratio(estimator.expr)
    values = np.array([-700.0, -30.0, -1.0, -1e-4, 0.0, 1e-12, 0.5, 30.0, 41.0, 700.0])
    fresh = est.make_numeric(e_t, estimator.stable_expr, variable_is_t=True)
    assert len(list(cache.glob("logratio-code-*.json"))) == 1
    compiled_body = est.compile_logratio_function(fresh.expression)
    _forbid(monkeypatch, est, "_numeric_body")
    _forbid(monkeypatch, sp, "lambdify")
    warm = est.make_numeric(e_t, estimator.stable_expr, variable_is_t=True)
    assert np.array_equal(warm(values), compiled_body(values), equal_nan=True)
    assert np.array_equal(warm(values), estimator.numeric(values), equal_nan=True)
    with pytest.raises(AssertionError, match="cached"):
        est.make_numeric(e_t + 1, estimator.stable_expr, variable_is_t=True)
    edited = cache / "estimators.py"
    edited.write_text(open(est.__file__).read() + "\n# an edit\n")
    monkeypatch.setattr(est, "__file__", str(edited))
    with pytest.raises(AssertionError, match="cached"):
        est.make_numeric(e_t, estimator.stable_expr, variable_is_t=True)


def test_condition_text_cached_and_equal(cache, monkeypatch):
    powers = [sp.Integer(0), sp.Integer(1), sp.Integer(2)]
    text = gcf.moment_condition_text(powers)
    assert text == sp.sstr(sp.And(gcf.moment_condition(2), gcf.moment_condition(0)))
    _forbid(monkeypatch, gcf, "moment_condition")
    assert gcf.moment_condition_text(powers) == text
    with pytest.raises(AssertionError, match="cached"):
        gcf.moment_condition_text([sp.Integer(-1), sp.Integer(3)])


def test_exact_does_not_import_pandas():
    code = (
        "import sys; from klsym.cli import main; main(['exact', '--q', '0,1', '--p', '1,1']); "
        "print('pandas' in sys.modules, file=sys.stderr)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stderr
    assert out.split() == ["False"]


# --- derive cold: the faster steps give the same expressions as the slow ones --------------------


@pytest.mark.parametrize(
    "integrand",
    [
        "u**(-2)",
        "-log(u)/u**2",
        "log(u)**2/(2*u**2)",
        "(u - log(u) - 1)/u**2",
        "log(u)/u",
        "log(u)**3/u",
        "(u*log(u) - u + 1)/u**2",
        "u**2*log(u)",
        "3*u**2 - log(u)/u**3",
    ],
)
def test_integral_from_one_equals_sympys_definite_integral(integrand):
    from klsym.derive import symbolic
    from klsym.derive.symbols import u

    f = sp.sympify(integrand, locals={"u": u})
    fast = symbolic._integral_from_one(f)
    assert not fast.has(sp.Integral)
    assert sp.simplify(fast - sp.integrate(f, (u, 1, r))) == 0


@pytest.mark.parametrize("n", range(7))
def test_normal_moment_is_the_integral(n):
    from klsym.derive import symbolic
    from klsym.derive.symbols import delta, x

    mean, var = -(delta**2) / 2, delta**2
    integral = sp.expand(
        sp.Integral(
            (mean + sp.sqrt(var) * x) ** n * sp.exp(-(x**2) / 2) / sp.sqrt(2 * sp.pi), (x, -sp.oo, sp.oo)
        ).doit()
    )
    assert symbolic.normal_moment_of_t(n, mean, var) == integral  # the same expression, not only equal


def test_clearly_nonzero_with_a_parameter_is_sound():
    from klsym.derive import symbolic
    from klsym.derive.symbols import alpha

    assert symbolic._clearly_nonzero(r**alpha / r**2 - 2 / r**2)  # alpha = 2 only
    assert not symbolic._clearly_nonzero(r**alpha * r - r ** (alpha + 1))  # identically 0
    assert symbolic.is_zero(sp.log(r**alpha) - alpha * sp.log(r))
    n = sp.Symbol("n", integer=True)
    assert not symbolic._clearly_nonzero(r**n - 1)  # integer parameters: left to the exact test


def test_derive_json_is_unchanged_by_the_faster_steps(tmp_path, monkeypatch):
    """The built-ins' analysis with the fast steps equals the one with SymPy's integrator and series."""
    from klsym.derive import symbolic

    estimators = [est.get_estimator(name) for name in ("k1", "k3+", "rev_k3")]
    fast = [symbolic.analyze_symbolic(e) for e in estimators]
    symbolic._generator_of_coefficient.cache_clear()
    monkeypatch.setattr(symbolic, "_integral_from_one", lambda f: sp.integrate(f, (symbolic.u, 1, r)))
    monkeypatch.setattr(
        symbolic,
        "normal_moment_of_t",
        lambda n, m, v: sp.expand(
            sp.Integral(
                (m + sp.sqrt(v) * symbolic.x) ** n * sp.exp(-(symbolic.x**2) / 2) / sp.sqrt(2 * sp.pi),
                (symbolic.x, -sp.oo, sp.oo),
            ).doit()
        ),
    )
    slow = [symbolic.analyze_symbolic(e) for e in estimators]
    symbolic._generator_of_coefficient.cache_clear()
    assert [symbolic._jsonable(a) for a in fast] == [symbolic._jsonable(b) for b in slow]
