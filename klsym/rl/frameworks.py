r"""RL frameworks' KL settings as data, translated into klsym's notation and derivations.

The table ``data/frameworks.json`` holds one row per framework setting (estimator, where it
enters, clamps, straight-through, weights, reduction, defaults, and the repository, file and
commit it was read from). Frameworks mostly write ``logr = logp - ref``, which is :math:`-t`;
each row also gives the formula in :math:`r = p/q = \pi_\text{ref}/\pi`.

:func:`crosswalk` joins a row with the derivations of :func:`klsym.derive.symbolic.analyze`: the
divergence whose value the estimator targets, the divergence whose gradient the chosen mode
follows, and the region of :math:`t = \log r` where the clamps freeze the value
(:func:`klsym.exact.clamps.saturation_region`).

>>> get_setting("verl").estimator, get_setting("verl").mode
('k3', 'loss')
>>> get_setting("nemo-rl", "loss").input_clamp
20.0
"""
from __future__ import annotations

import json
from dataclasses import dataclass, fields
from functools import lru_cache
from pathlib import Path

from klsym.exact.clamps import format_region, saturation_region
from klsym.derive.estimators import ALIASES, BUILTINS, Estimator, from_formula, get_estimator
from klsym.paths import DATA_DIR

FRAMEWORKS_FILE = DATA_DIR / "frameworks.json"
MODES = ("reward", "loss", "full")


class UnknownFrameworkError(ValueError):
    """A framework or setting name that is not in ``data/frameworks.json``."""


@dataclass(frozen=True)
class FrameworkSetting:
    r"""One KL setting of one framework (a row of ``data/frameworks.json``).

    ``mode`` is ``"reward"`` (k as a stop-gradient reward), ``"loss"`` (pathwise gradient of k)
    or ``"full"`` (loss + reward: a differentiable weight equal to 1 on-policy). Clamps: t is
    clamped to ``[-input_clamp, input_clamp]``, k to ``[-output_clamp, output_clamp]``.
    """

    framework: str
    setting: str
    default: bool
    enabled_by_default: bool | None
    estimator: str
    framework_estimator: str
    formula_framework: str
    formula_r: str
    mode: str
    placement: str
    input_clamp: float | None
    output_clamp: float | None
    straight_through: bool
    importance_weight: str | None
    reduction: str
    coefficient_name: str
    coefficient: float
    default_flags: str
    repo: str
    file: str
    function: str
    commit: str
    verified: str
    verified_commit: str | None
    notes: str

    @property
    def key(self) -> str:
        return f"{self.framework}/{self.setting}"

    @property
    def citation(self) -> str:
        """``repo@commit:file (function)``, plus how it was checked."""
        checked = (f"read in code at {self.verified_commit[:7]}" if self.verified_commit
                   else "read in code" if self.verified == "code" else "from the reference file")
        return f"{self.repo}@{self.commit}:{self.file} ({self.function}); {checked}"

    def get_estimator(self) -> Estimator:
        """The klsym estimator: a built-in name or a formula in r."""
        if self.estimator in BUILTINS or self.estimator in ALIASES:
            return get_estimator(self.estimator)
        return from_formula(self.estimator, name=self.estimator)


def _validate(row: dict, path: Path) -> FrameworkSetting:
    names = [f.name for f in fields(FrameworkSetting)]
    missing = [n for n in names if n not in row]
    extra = [n for n in row if n not in names]
    where = f"{path.name}: {row.get('framework')}/{row.get('setting')}"
    if missing or extra:
        raise ValueError(f"{where}: missing columns {missing}, unknown columns {extra}")
    if row["mode"] not in MODES:
        raise ValueError(f"{where}: mode {row['mode']!r} is not one of {', '.join(MODES)}")
    for clamp in ("input_clamp", "output_clamp"):
        if row[clamp] is not None:
            row[clamp] = float(row[clamp])
    return FrameworkSetting(**row)


@lru_cache(maxsize=4)
def load_settings(path: Path | str = FRAMEWORKS_FILE) -> tuple[FrameworkSetting, ...]:
    """All rows of the frameworks table, validated (each framework has exactly one default).

    >>> len({s.framework for s in load_settings()}) >= 9
    True
    """
    path = Path(path)
    rows = json.loads(path.read_text())["rows"]
    settings = tuple(_validate(dict(row), path) for row in rows)
    keys = [s.key for s in settings]
    duplicated = sorted({k for k in keys if keys.count(k) > 1})
    if duplicated:
        raise ValueError(f"{path.name}: duplicated settings {duplicated}")
    for name in dict.fromkeys(s.framework for s in settings):
        defaults = [s.setting for s in settings if s.framework == name and s.default]
        if len(defaults) != 1:
            raise ValueError(f"{path.name}: framework {name!r} needs exactly one default, has {defaults}")
    return settings


def framework_names() -> list[str]:
    """Framework names in table order.

    >>> framework_names()[:2]
    ['verl', 'openrlhf']
    """
    return list(dict.fromkeys(s.framework for s in load_settings()))


def get_setting(framework: str, setting: str | None = None) -> FrameworkSetting:
    """Look up a framework's setting (its default when ``setting`` is None); case-insensitive.

    >>> get_setting("OpenRLHF").setting
    'reward'
    >>> get_setting("torchrl")
    Traceback (most recent call last):
    ...
    klsym.rl.frameworks.UnknownFrameworkError: unknown framework 'torchrl'; known: verl, openrlhf, trl-grpo, trl-ppo, trl-rloo, nemo-rl, nemo-aligner, slime, roll, open-instruct, areal
    """
    name = framework.strip().lower()
    rows = [s for s in load_settings() if s.framework == name]
    if not rows:
        raise UnknownFrameworkError(
            f"unknown framework {framework!r}; known: {', '.join(framework_names())}")
    if setting is None:
        return next(s for s in rows if s.default)
    for s in rows:
        if s.setting == setting:
            return s
    raise UnknownFrameworkError(
        f"unknown setting {setting!r} for {name}; settings: {', '.join(s.setting for s in rows)}")


def clamp_effect(setting: FrameworkSetting) -> str:
    """What the clamps do to the gradient in this setting's mode (one sentence)."""
    if setting.input_clamp is None and setting.output_clamp is None:
        return "no clamp"
    if setting.straight_through:
        return "value frozen in the region; the gradient is k2's (unclamped) everywhere"
    if setting.mode == "loss":
        return "value frozen and gradient zero in the region"
    if setting.mode == "reward":
        return "reward saturates at the clamp in the region (score-function gradient with a capped reward)"
    weight = setting.importance_weight or ""
    if "detached where the input clamp bites" in weight:
        return ("pathwise part zero in the region; the reward part keeps the capped value, "
                "except where the input clamp bites (weight detached: both parts zero)")
    return "pathwise part zero in the region; the reward part keeps the capped value"


def crosswalk(setting: FrameworkSetting, derive: bool = True) -> dict:
    r"""One setting translated: estimator, placement, divergences, clamp region, citation.

    ``value_divergence`` is the divergence :math:`\mathbb{E}_q[k]` equals (on-policy, without
    clamps), ``gradient_divergence`` the one whose gradient the mode's expected gradient is
    (``None`` where it is no divergence; then ``gradient_generator`` shows the implied g(r)).
    ``derive=False`` skips SymPy (fast listing).

    >>> row = crosswalk(get_setting("verl"), derive=False)
    >>> row["estimator"], row["clamp_region"]
    ('k3', 't < -10.99998 or t > 2.610869')
    """
    estimator = setting.get_estimator()
    region = saturation_region(estimator, setting.input_clamp, setting.output_clamp)
    row = {
        "framework": setting.framework,
        "setting": setting.setting,
        "default": setting.default,
        "enabled_by_default": setting.enabled_by_default,
        "estimator": estimator.name,
        "expr": str(estimator.expr),
        "surrogate": None if estimator.surrogate_expr is None else str(estimator.surrogate_expr),
        "formula_framework": setting.formula_framework,
        "formula_r": setting.formula_r,
        "mode": setting.mode,
        "placement": setting.placement,
        "input_clamp": setting.input_clamp,
        "output_clamp": setting.output_clamp,
        "clamp_region": format_region(region),
        "clamp_region_intervals": [list(interval) for interval in region],
        "clamp_effect": clamp_effect(setting),
        "importance_weight": setting.importance_weight,
        "reduction": setting.reduction,
        "coefficient": f"{setting.coefficient_name}={setting.coefficient:g}",
        "default_flags": setting.default_flags,
        "citation": setting.citation,
        "verified": setting.verified,
        "notes": setting.notes,
    }
    if derive:
        row.update(_derived(estimator, setting.mode))
    return row


def _derived(estimator: Estimator, mode: str) -> dict:
    from klsym.derive import symbolic  # SymPy derivations take seconds: only when asked

    try:
        analysis = symbolic.analyze(estimator)
    except Exception as err:  # a formula SymPy cannot analyse is reported, not raised
        reason = f"not derived ({type(err).__name__}: {str(err).splitlines()[0][:120]})"
        return {"value_divergence": reason, "gradient_divergence": reason, "gradient_generator": None}
    gradient = analysis["gradient"][mode]
    return {
        "value_divergence": analysis["value"]["divergence"],
        "gradient_divergence": gradient["divergence"],
        "gradient_generator": gradient["generator"],
    }


def crosswalk_table(defaults_only: bool = False, derive: bool = True) -> list[dict]:
    """:func:`crosswalk` for every setting (or each framework's default)."""
    return [crosswalk(s, derive) for s in load_settings() if s.default or not defaults_only]


__all__ = [
    "FRAMEWORKS_FILE", "MODES", "FrameworkSetting", "UnknownFrameworkError", "load_settings",
    "framework_names", "get_setting", "clamp_effect", "crosswalk", "crosswalk_table",
]
