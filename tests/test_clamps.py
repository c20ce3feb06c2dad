"""Clamped estimators: regions, derivatives, exact bias against brute force and Monte Carlo."""

import math

import numpy as np
import pytest
from scipy.special import log_softmax, softmax

from klsym.exact.clamps import (
    clamp_bias,
    clamped_numeric,
    clamped_numeric_dt,
    gaussian_mean_shift_bias,
    saturation_region,
)
from klsym.exact.families import Categorical, Gaussian


def _k3(t):
    return np.expm1(t) - t


def _verl_k3(t):  # verl's clamps written out: input +-20, output +-10
    return np.clip(_k3(np.clip(t, -20, 20)), -10, 10)


def test_regions():
    assert saturation_region("k3") == []
    assert saturation_region("k1", output_clamp=10) == [(-math.inf, -10.0), (10.0, math.inf)]
    with pytest.raises(ValueError, match="output clamp must be a positive number"):
        saturation_region("k3", output_clamp=0)


def test_clamped_derivative_is_the_finite_difference():
    t = np.linspace(-25, 25, 5001)
    t = t[np.all([np.abs(t - e) > 1e-4 for e in (-20, 20, -10.999983298, 2.610868638)], axis=0)]
    h = 1e-6
    numeric = (_verl_k3(t + h) - _verl_k3(t - h)) / (2 * h)
    np.testing.assert_allclose(clamped_numeric_dt("k3", 20, 10)(t), numeric, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(clamped_numeric("k3", 20, 10)(t), _verl_k3(t))


def test_straight_through_derivative_ignores_clamps():
    t = np.array([-15.0, 0.5, 5.0])
    np.testing.assert_allclose(clamped_numeric_dt("k3+", 20, 10)(t), t)  # d/dt t^2/2


@pytest.mark.parametrize("delta", [0.7, 2.0])
def test_gaussian_value_bias_against_dense_grid(delta):
    out = clamp_bias("k3", Gaussian(0, 1), Gaussian(delta, 1), 20, 10)
    x = np.linspace(-40, 40, 1_600_001)
    t = delta * x - delta**2 / 2
    density = np.exp(-x * x / 2) / math.sqrt(2 * math.pi)
    brute = np.trapezoid(density * (_verl_k3(t) - _k3(t)), x)
    assert out["value"]["bias"] == pytest.approx(brute, rel=1e-6)
    assert out["value"]["unclamped"] == pytest.approx(delta**2 / 2, rel=1e-12)  # KL of unit Gaussians


def test_gaussian_gradients_monte_carlo():
    # q = N(0,1), p = N(2,1): the clamps bite often. Per-sample gradients of the clamped estimator
    # (score s = (x, x^2 - 1) at mu=0, sigma=1) averaged over x ~ q match the exact numbers (|z| < 5).
    delta = 2.0
    out = clamp_bias("k3", Gaussian(0, 1), Gaussian(delta, 1), 20, 10)
    rng = np.random.default_rng(2026)
    x = rng.standard_normal(400_000)
    t = delta * x - delta**2 / 2
    score = np.stack([x, x * x - 1], axis=1)
    value = _verl_k3(t)
    live = (np.abs(t) <= 20) & (_k3(np.clip(t, -20, 20)) <= 10)
    loss = -(np.where(live, np.expm1(t), 0.0))[:, None] * score
    reward = value[:, None] * score
    samples = {"value": value[:, None], "loss": loss, "reward": reward, "full": loss + reward}
    exact = {"value": np.atleast_1d(out["value"]["clamped"])}
    exact.update({m: out["gradient"][m]["clamped"] for m in ("loss", "reward", "full")})
    for name, per_sample in samples.items():
        z = (per_sample.mean(0) - exact[name]) / (per_sample.std(0, ddof=1) / math.sqrt(len(x)))
        assert np.all(np.abs(z) < 5), (name, z)
    assert out["value"]["bias"] < 0 and out["gradient"]["loss"]["relative"] > 0.1


def test_categorical_full_gradient_is_the_derivative_of_the_clamped_mean():
    rng = np.random.default_rng(4)
    logits_q, logits_p = 3 * rng.standard_normal(40), 3 * rng.standard_normal(40)
    out = clamp_bias("k3", Categorical(logits_q), Categorical(logits_p), 20, 10)

    def clamped_mean(logits):
        log_q = log_softmax(logits)
        return float(np.sum(softmax(logits) * _verl_k3(log_softmax(logits_p) - log_q)))

    assert out["value"]["clamped"] == pytest.approx(clamped_mean(logits_q), rel=1e-12)
    h = 1e-6
    numeric = np.array(
        [(clamped_mean(logits_q + h * e) - clamped_mean(logits_q - h * e)) / (2 * h) for e in np.eye(40)]
    )
    np.testing.assert_allclose(out["gradient"]["full"]["clamped"], numeric, rtol=1e-5, atol=1e-8)
    assert out["value"]["bias"] < 0  # some tokens have k3 > 10


def test_straight_through_loss_gradient_is_unchanged():
    out = clamp_bias("k3+", Gaussian(0, 1), Gaussian(3, 1), 20, 10, quantities=["loss", "value"])
    np.testing.assert_array_equal(out["gradient"]["loss"]["bias"], 0.0)
    assert out["value"]["bias"] < 0


def test_detached_weight_removes_the_reward_part_beyond_the_input_clamp():
    # Token 0 has t = -30 (< -20): with NeMo-RL's detached weight its whole contribution vanishes.
    log_q = np.log(np.array([0.5, 0.25, 0.25]))
    log_p = log_q + np.array([-30.0, 0.0, 0.0])
    q, p = Categorical(log_q), Categorical(log_p)  # p is renormalised: t differs from -30 by a constant
    plain = clamp_bias("k3", q, p, 20, 10, quantities=["full"])["gradient"]["full"]["clamped"]
    detached = clamp_bias("k3", q, p, 20, 10, quantities=["full"], detach_weight_outside_input_clamp=True)["gradient"][
        "full"
    ]["clamped"]
    t = Categorical(log_p).log_probs - Categorical(log_q).log_probs
    weights = np.where(np.abs(t) > 20, 0.0, _verl_k3(t))  # loss part is 0 everywhere: all |k3| > 10 or ...
    loss_part = -np.where((np.abs(t) <= 20) & (_k3(t) <= 10), np.expm1(t), 0.0)
    probs = np.exp(Categorical(log_q).log_probs)
    w = weights + loss_part
    np.testing.assert_allclose(detached, probs * (w - np.sum(probs * w)), atol=1e-15)
    assert not np.allclose(plain, detached)


def test_sweep_is_monotone_and_tiny_for_close_distributions():
    rows = gaussian_mean_shift_bias("k3", [0.2, 0.6, 1.5], 20, 10, quantities=["value"])
    relative = [row["value"] for row in rows]
    assert relative[0] < 1e-20 and relative[0] < relative[1] < relative[2]
