"""klsym.report.compare: the comparison tables the notebooks show, checked against independent computations."""

from __future__ import annotations

import math

import numpy as np
import pytest

from klsym.exact.expectations import KL_PQ, KL_QP, estimator_stats
from klsym.exact.families import Gaussian
from klsym.report.compare import (
    _published_columns,
    compare,
    compare_pairs,
    gaussian_path,
    relative,
    reproduce,
    trial_gradients,
    trial_summary,
)
from klsym.report.published import exact_value, half_unit, load_rows, monte_carlo_se
from klsym.report.variance_reduction import lambda_star, parabola_vertex
from klsym.simulate.montecarlo import crosscheck, run, z_score

Q = Gaussian(0.0, 1.0)


@pytest.mark.parametrize(
    "estimate, exact, se, expected",
    [
        (1.5, 1.0, 0.25, 2.0),
        (-1.0, 1.0, 0.5, -4.0),
        (2.0, 2.0, 0.0, 0.0),  # agreement with zero spread is z = 0, not nan
    ],
)
def test_z_score(estimate, exact, se, expected):
    assert float(z_score(estimate, exact, se)) == expected


def test_z_score_floors_se_at_float64_rounding():
    one_ulp = np.nextafter(1.0, 2.0)
    assert abs(float(z_score(one_ulp, 1.0, 0.0))) < 5  # rounding is not a failed check
    assert abs(float(z_score(2.0, 1.0, 0.0))) > 1e12  # a real difference with no spread still fails


@pytest.mark.parametrize("p_mu, estimator", [(0.5, "k1"), (0.5, "k3"), (1.0, "k1"), (1.0, "k3"), (0.3, "k1")])
def test_value_z_against_analytic_kl_and_the_engine(p_mu, estimator):
    """Equal sigmas: KL(q||p) = mu_p^2 / 2 in closed form; MC mean and se straight from montecarlo.run."""
    n, seed = 20_000, 7
    row = compare(estimator, Q, Gaussian(p_mu, 1.0), n=n, seed=seed).iloc[0]
    assert row["direction"] == KL_QP
    assert row["exact"] == pytest.approx(p_mu**2 / 2, rel=1e-12)
    assert row["true"] == pytest.approx(p_mu**2 / 2, rel=1e-12)
    engine = run(Q, Gaussian(p_mu, 1.0), estimator, n=n, seed=seed, quantiles=(), batch_size=None)["estimators"][
        estimator
    ]
    assert (row["mc"], row["se"]) == (engine["mean"], engine["se"])
    assert row["z"] == pytest.approx((engine["mean"] - p_mu**2 / 2) / engine["se"], rel=1e-9, abs=1e-12)
    assert abs(row["z"]) < 5


@pytest.mark.parametrize("p", [Gaussian(0.5, 1.0), Gaussian(1.0, 1.1)])
def test_exact_se_z_and_gradient_z_match_crosscheck(p):
    """z_se="exact" is the convention of montecarlo.crosscheck (exact sd/sqrt(n)); gradients use the sample se."""
    names, n, seed = ["k1", "k2", "k3"], 20_000, 3
    table = compare(names, Q, p, what=("exact", "mc"), n=n, seed=seed, modes=("loss", "full"), z_se="exact")
    check = crosscheck(Q, p, names, n=n, seed=seed, modes=("loss", "full"))
    values = table[table["quantity"] == "value"].set_index("estimator")
    for name in names:
        assert values.loc[name, "z"] == pytest.approx(check["estimators"][name]["mean"]["z"], rel=1e-12)
        for mode in ("loss", "full"):
            rows = table[(table["estimator"] == name) & (table["mode"] == mode)]
            np.testing.assert_allclose(rows["z"], check["estimators"][name]["gradients"][mode]["z"], rtol=1e-12)
            np.testing.assert_allclose(rows["exact"], check["estimators"][name]["gradients"][mode]["exact"], rtol=1e-12)


@pytest.mark.parametrize(
    "estimator, mode, follows, equals",
    [
        ("k1", "loss", "zero", "zero"),
        ("k1", "full", KL_QP, f"grad {KL_QP}"),
        ("k2", "loss", KL_QP, f"grad {KL_QP}"),
        ("k3", "loss", KL_PQ, f"grad {KL_PQ}"),
        ("k3", "full", KL_QP, f"grad {KL_QP}"),
        ("rev_k2", "loss", KL_PQ, f"grad {KL_PQ}"),
    ],
)
def test_gradient_rows_name_the_true_gradient(estimator, mode, follows, equals):
    rows = compare(estimator, Q, Gaussian(1.0, 1.1), what=("symbolic", "exact"), modes=(mode,))
    rows = rows[rows["quantity"] == "gradient"]
    assert list(rows["param"]) == ["mu", "sigma"]
    assert set(rows["direction"]) == {follows} and set(rows["equals"]) == {equals}
    assert rows["symbolic_agrees"].all()


def test_relative_bias_of_k2_is_mu_squared_over_four():
    """q = N(0, 1), p = N(mu, 1): E[k2] = (mu^2 + mu^4/4) / 2 and KL = mu^2/2, so the relative bias is mu^2/4."""
    table = relative(compare_pairs("k2", gaussian_path([0.5, 1.0, 2.0]), key="mu_p"))
    np.testing.assert_allclose(table["relative bias"], np.array([0.5, 1.0, 2.0]) ** 2 / 4, rtol=1e-12)


@pytest.mark.parametrize(
    "grid, direction, origin, expected",
    [
        ([0.5, 2.0], (1.0, 0.0), None, [(0.5, 1.0), (2.0, 1.0)]),
        ([1.0], (-0.8, -1.3), (1.3, 2.5), [(0.5, 1.2)]),
    ],
)
def test_gaussian_path(grid, direction, origin, expected):
    path = gaussian_path(grid, q=origin or (0.0, 1.0), direction=direction)
    np.testing.assert_allclose([(p.mu, p.sigma) for _, p in path.values()], expected, rtol=1e-15)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: compare("k1", Q, Q, what=("bootstrap",)), "unknown layer"),
        (lambda: compare("k1", Q, Q, what=("mc",)), "sample size n"),
        (lambda: compare("k1", Q, Q, what=("exact",), z_se="bootstrap"), "z_se"),
        (lambda: compare_pairs("k1", gaussian_path([0.1, 0.2]), seed=[1, 2, 3]), "3 seeds for 2 pairs"),
        (lambda: reproduce("yang2025_gradients.csv", n=10), "give trials"),
    ],
)
def test_bad_input_gets_one_clear_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()


@pytest.mark.parametrize(
    "printed, exact, matches",
    [
        ("0.25", 0.25, True),
        ("0.002", 0.0025, True),  # on the rounding boundary
        ("0.002", 0.00251, False),
        ("1.42", 1.4177, True),
        ("1.42", 1.4251, False),
        ("20", 19.6, True),
        ("20", 20.6, False),
    ],
)
def test_published_digits_check_can_fail(printed, exact, matches):
    columns = _published_columns({"published_value": printed}, exact, se=0.01)
    assert columns["published_matches_digits"] is matches
    beyond = max(abs(float(printed) - exact) - half_unit(printed), 0.0)
    assert abs(columns["z_beyond_rounding"]) == pytest.approx(beyond / 0.01)
    assert bool(columns["z_beyond_rounding"] == 0) is matches


def test_reproduce_zhang_against_independent_published_z():
    table = reproduce("zhang2025_k4.csv", n=2_000, seed=0)
    rows = load_rows(("zhang2025_k4.csv",))
    assert len(table) == len(rows)
    for row, (_, entry) in zip(rows, table.iterrows()):
        exact, se = exact_value(row), monte_carlo_se(row)
        assert entry["exact"] == exact
        expected = (float(row["published_value"]) - exact) / se if math.isfinite(se) else math.nan
        assert entry["z_published"] == pytest.approx(expected, nan_ok=True)
        assert entry["published_matches_digits"] == (
            abs(float(row["published_value"]) - exact) <= half_unit(row["published_value"]) * (1 + 1e-9)
        )
    assert not table["published_matches_digits"].all(), "Zhang's biases are rounded Monte Carlo numbers"


def test_trial_summary_against_numpy():
    n, trials = 400, 30
    per_trial = trial_gradients("k2,k3", Q, Gaussian(1.0, 1.1), n=n, trials=trials, seed=5)
    summary = trial_summary(per_trial, n).set_index(["estimator", "param"])
    for (name, param), part in per_trial.groupby(["estimator", "param"]):
        values = part["gradient"].to_numpy()
        se = values.std(ddof=1) / np.sqrt(trials)
        assert summary.loc[(name, param), "z"] == pytest.approx((values.mean() - part["exact"].iloc[0]) / se)
        assert summary.loc[(name, param), "MC per-sample std"] == pytest.approx(values.std(ddof=1) * np.sqrt(n))


@pytest.mark.parametrize("vertex", [-0.3, 0.7, 2.0])
def test_parabola_vertex(vertex):
    x = np.linspace(-1, 3, 9)
    assert parabola_vertex(x, 3 * (x - vertex) ** 2 + 1) == pytest.approx(vertex)


@pytest.mark.parametrize("mu_p", [0.2, 1.0, 2.0])
def test_lambda_star_equal_sigmas(mu_p):
    """KL(q||p) + KL(p||q) = mu_p^2 and E_q[r^2] = exp(mu_p^2) for q = N(0, 1), p = N(mu_p, 1)."""
    assert lambda_star(Q, Gaussian(mu_p, 1.0)) == pytest.approx(mu_p**2 / math.expm1(mu_p**2), rel=1e-10)
    assert estimator_stats("rev_k2", Q, Gaussian(mu_p, 1.0))["second_moment"] == pytest.approx(math.exp(mu_p**2))


def _setting(estimator, input_clamp=None, output_clamp=None):
    """A framework setting as the clamp tables read it (key, estimator, clamps)."""
    from types import SimpleNamespace

    from klsym.derive.estimators import get_estimator

    return SimpleNamespace(
        key=f"test {estimator}",
        estimator=estimator,
        input_clamp=input_clamp,
        output_clamp=output_clamp,
        get_estimator=lambda: get_estimator(estimator),
    )


@pytest.mark.parametrize("delta, output_clamp", [(2.0, 10.0), (1.0, 10.0), (2.0, 3.0)])
def test_clamp_value_check_against_numpy(delta, output_clamp):
    """k3 = e^t - 1 - t clipped to [-c, c], on t = delta x - delta^2/2 with x ~ N(0, 1)."""
    from klsym.report.framework_tables import clamp_value_check

    x = np.random.default_rng(11).standard_normal(200_000)
    t = delta * x - delta**2 / 2
    samples = np.clip(np.expm1(t) - t, -output_clamp, output_clamp)
    row = clamp_value_check(_setting("k3", None, output_clamp), Q, Gaussian(delta, 1.0), t).iloc[0]
    assert row["MC clamped"] == pytest.approx(samples.mean(), rel=1e-12)
    assert row["MC se"] == pytest.approx(samples.std(ddof=1) / np.sqrt(t.size), rel=1e-9)
    assert row["exact unclamped"] == pytest.approx(delta**2 / 2, rel=1e-9)
    assert abs(row["z (MC vs exact clamped)"]) < 5


def test_identical_logits_same_kernel_is_exactly_zero():
    from klsym.report.framework_tables import identical_logits_table

    logits = np.random.default_rng(2).standard_normal(500) * 3
    table = identical_logits_table(logits, dtypes=("bfloat16",), reference_kernels=("fused", "unfused"))
    same, other = table.iloc[0], table.iloc[1]
    assert same["P_q(t != 0)"] == 0 and same["E_q[k1]"] == 0 and same["E_q[k3]"] == 0
    assert other["P_q(t != 0)"] > 0, "two roundings differ from one on some token"


def test_precision_mc_check_draws_from_the_given_generator():
    from klsym.exact.precision import policy_pair
    from klsym.report.framework_tables import precision_mc_check

    logits_q, logits_p = policy_pair(2_000, np.random.default_rng(0), 0.1)
    first = precision_mc_check(logits_q, logits_p, np.random.default_rng(4), 50_000)
    again = precision_mc_check(logits_q, logits_p, np.random.default_rng(4), 50_000)
    assert first.equals(again)
    assert (first["z"].abs() < 5).all()


@pytest.mark.parametrize(
    "p, estimators, count, all_match",
    [
        (Gaussian(1.0, 1.0), "k1,k2,k3", 6, True),  # Schulman's second table
        (Gaussian(0.1, 1.0), "k2", 2, True),  # Schulman's first table, one estimator
        (Gaussian(1.0, 1.1), "k3", 6, False),  # Yang's loss-mode gradients of k3: rounded MC numbers
    ],
)
def test_compare_published_layer(p, estimators, count, all_match):
    table = compare(estimators, Q, p, what=("exact", "published"))
    published = table[table["quantity"] != "value"]
    assert len(published) == count
    rows = [
        row
        for row in load_rows()
        if row["estimator"] in estimators.split(",")
        and (float(row["p_mu"]), float(row["p_sigma"]), float(row["q_mu"])) == (p.mu, p.sigma, 0.0)
    ]
    assert len(rows) == count
    for row, (_, entry) in zip(rows, published.iterrows()):
        exact = exact_value(row)
        assert entry["exact"] == exact and entry["published"] == row["published_value"]
        assert entry["z_published"] == pytest.approx((float(row["published_value"]) - exact) / monte_carlo_se(row))
    assert bool(published["published_matches_digits"].all()) is all_match
