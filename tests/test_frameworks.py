"""The framework crosswalk: data integrity, clamp regions, derived divergences, CLI contract."""
import json
import math
import subprocess
import sys

import numpy as np
import pytest
from scipy.special import lambertw

from klsym.cli import main
from klsym.rl import expressions as ex
from klsym.rl.frameworks import (FRAMEWORKS_FILE, MODES, crosswalk, framework_names, get_setting,
                                 load_settings)
from klsym.paths import ROOT

SETTINGS = load_settings()
REQUIRED_FRAMEWORKS = {"verl", "openrlhf", "trl-grpo", "trl-ppo", "trl-rloo", "nemo-rl", "slime",
                       "roll", "open-instruct", "areal"}


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
    assert upper == pytest.approx(2.611, abs=1e-3)   # the reference file's rounded value
    # The clamped value is flat inside the region and moves outside it.
    eps = 1e-6
    for inside in (upper + 0.5, lower - 0.5, 30.0, -30.0):
        assert _clamped_k3(inside + eps, 20, c) == _clamped_k3(inside - eps, 20, c)
    for outside in (upper - 0.01, lower + 0.01, 0.5):
        assert _clamped_k3(outside + eps, 20, c) != _clamped_k3(outside - eps, 20, c)


@pytest.mark.parametrize("setting", [s for s in SETTINGS if s.input_clamp or s.output_clamp],
                         ids=lambda s: s.key)
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
    "verl": "KL(p||q)", "openrlhf": "KL(q||p)", "trl-grpo": "KL(p||q)", "trl-ppo": "KL(q||p)",
    "trl-rloo": "KL(q||p)", "nemo-rl": "KL(q||p)", "slime": "zero", "roll": "KL(q||p)",
    "open-instruct": "KL(p||q)", "areal": "KL(q||p)",
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


@pytest.mark.parametrize("argv, needle", [
    (["framework", "nosuch"], "known: verl, openrlhf"),
    (["framework", "verl", "--setting", "nosuch"], "settings: kl_loss"),
    (["framework"], "--list"),
])
def test_cli_errors_are_one_line(argv, needle):
    proc = subprocess.run([sys.executable, "-m", "klsym", *argv], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("klsym: error:")
    assert needle in proc.stderr


def test_data_file_has_one_default_per_framework():
    rows = json.loads(FRAMEWORKS_FILE.read_text())["rows"]
    for name in framework_names():
        assert sum(r["default"] for r in rows if r["framework"] == name) == 1
