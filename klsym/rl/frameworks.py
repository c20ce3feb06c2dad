r"""RL frameworks' KL settings as data: each one the per-token expression the framework computes.

The table ``data/frameworks.json`` holds one row per framework setting: the framework's own spelling of the
term, the same term transcribed as an expression in ``logq`` (the policy, differentiable), ``logp`` (the
reference) and ``logb`` (the behaviour policy that drew the token), whether it enters as a loss or as a
reward, defaults, and the repository, file and commit it was re-read at (:mod:`klsym.rl.expressions`).

Everything else is derived from the expression: the estimator and gradient mode
(:func:`klsym.rl.expressions.identify`), the clamps and their region, the importance weights, the
off-policy weighting. :func:`crosswalk` joins a row with the derivations of
:func:`klsym.derive.symbolic.analyze`: the divergence the value estimates and the one the expected gradient
follows.

>>> get_setting("verl").estimator, get_setting("verl").mode
('k3', 'loss')
>>> get_setting("nemo-rl", "loss").input_clamp, get_setting("nemo-rl", "loss").mode
(20.0, 'full')
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from functools import cache, cached_property, lru_cache
from pathlib import Path

import numpy as np
import sympy as sp

from klsym.derive.estimators import Estimator
from klsym.exact.clamps import format_region
from klsym.paths import DATA_DIR
from klsym.rl import expressions as ex

FRAMEWORKS_FILE = DATA_DIR / "frameworks.json"
MODES = ("reward", "loss", "full")
#: How a per-token term is aggregated, by where it enters (the keys of
#: :data:`klsym.rl.sequences.FRAMEWORK_PLACEMENTS`): a loss is averaged over the batch's tokens, over each
#: sequence's tokens, or summed; a reward is kept per token (returns), summed or averaged into one sequence reward.
AGGREGATIONS = {"loss": ("token-mean", "sequence-mean", "sum"), "reward": ("per-token", "sequence", "sequence-mean")}


class UnknownFrameworkError(ValueError):
    """A framework or setting name that is not in ``data/frameworks.json``."""


@dataclass(frozen=True)
class FrameworkSetting:
    r"""One KL setting of one framework (a row of ``data/frameworks.json``).

    ``expression`` is the per-token term as the framework computes it; ``enters`` says whether it is a loss
    or a (stop-gradient) reward. The properties ``estimator``, ``mode``, ``input_clamp``, ``output_clamp``,
    ``straight_through``, ``importance_weight`` and ``formula_r`` are derived from it.
    """

    framework: str
    setting: str
    default: bool
    enabled_by_default: bool | None
    framework_estimator: str
    formula_framework: str
    expression: str
    enters: str
    placement: str
    offpolicy: str
    reduction: str
    aggregation: str
    coefficient_name: str
    coefficient: float
    default_flags: str
    repo: str
    file: str
    function: str
    commit: str
    verified_at_commit: str
    checked: str
    notes: str

    @property
    def key(self) -> str:
        return f"{self.framework}/{self.setting}"

    @property
    def verified(self) -> str:
        """``"code"``: every row's expression was re-read in the framework's code at its commit."""
        return "code"

    @property
    def citation(self) -> str:
        """``repo@commit:file (function)``, plus the commit it was re-read at."""
        return (
            f"{self.repo}@{self.commit}:{self.file} ({self.function}); re-read in code at {self.verified_at_commit[:7]}"
        )

    @cached_property
    def expr(self) -> sp.Expr:
        """The parsed expression (:func:`klsym.rl.expressions.parse_expression`)."""
        return ex.parse_expression(self.expression)

    @cached_property
    def _identified(self) -> dict:
        return ex.identify(self.expr, self.enters)

    def get_estimator(self) -> Estimator:
        """The klsym estimator the expression is on-policy without clamps (built-in where one matches)."""
        return self._identified["estimator"]

    @property
    def estimator(self) -> str:
        return self.get_estimator().name

    @property
    def mode(self) -> str:
        """``loss``, ``reward`` or ``full`` (derived; ``other`` where no mode matches)."""
        return self._identified["mode"] or "other"

    @property
    def straight_through(self) -> bool:
        return self.get_estimator().straight_through

    @cached_property
    def _clamps(self) -> dict:
        return ex.clamps(self.expr)

    @property
    def input_clamp(self) -> float | None:
        return self._clamps["input_clamp"]

    @property
    def output_clamp(self) -> float | None:
        return self._clamps["output_clamp"]

    @property
    def importance_weight(self) -> str | None:
        r"""The weights :math:`e^{\log q - \cdot}` of the expression, and whether they are differentiable."""
        found = ex.weights(self.expr)
        if not found:
            return None
        text = "; ".join(f"{w['weight']} ({'differentiable' if w['differentiable'] else 'detached'})" for w in found)
        if any(isinstance(node, ex.inside) for node in ex.clamp_nodes(self.expr)):
            text += "; detached where the input clamp bites"
        return text

    @property
    def formula_r(self) -> str:
        """The on-policy value in r = p/q (clamps included)."""
        value = ex.on_policy(self.expr, self.enters)["value"]
        return sp.sstr(value.subs(sp.Symbol("t", real=True), sp.log(sp.Symbol("r", positive=True))))

    @property
    def offpolicy_weighting(self) -> str:
        return ex.offpolicy_weighting(self.expr, self.enters)


def _validate(row: dict, path: Path) -> FrameworkSetting:
    names = [f.name for f in fields(FrameworkSetting)]
    missing = [n for n in names if n not in row]
    extra = [n for n in row if n not in names]
    where = f"{path.name}: {row.get('framework')}/{row.get('setting')}"
    if missing or extra:
        raise ValueError(f"{where}: missing columns {missing}, unknown columns {extra}")
    if row["enters"] not in ex.ENTERS:
        raise ValueError(f"{where}: enters {row['enters']!r} is not one of {', '.join(ex.ENTERS)}")
    if row["aggregation"] not in AGGREGATIONS[row["enters"]]:
        raise ValueError(
            f"{where}: aggregation {row['aggregation']!r} of a {row['enters']} term is not one of "
            f"{', '.join(AGGREGATIONS[row['enters']])}"
        )
    try:
        ex.parse_expression(row["expression"])
    except ex.ExpressionError as err:
        raise ValueError(f"{where}: {err}") from None
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
        raise UnknownFrameworkError(f"unknown framework {framework!r}; known: {', '.join(framework_names())}")
    if setting is None:
        return next(s for s in rows if s.default)
    for s in rows:
        if s.setting == setting:
            return s
    raise UnknownFrameworkError(
        f"unknown setting {setting!r} for {name}; settings: {', '.join(s.setting for s in rows)}"
    )


def clamp_effect(setting: FrameworkSetting) -> str:
    """What the clamps do to one token's gradient in the clamp region, probed from the expression."""
    return ex.clamp_effect(setting.expr, setting.enters)


def crosswalk(setting: FrameworkSetting, derive: bool = True, answers: bool | None = None) -> dict:
    r"""One setting translated: estimator, placement, divergences, clamp region, citation.

    ``value_divergence`` is the divergence :math:`\mathbb{E}_q[k]` equals (on-policy, without
    clamps), ``gradient_divergence`` the one whose gradient the mode's expected gradient is
    (``None`` where it is no divergence; then ``gradient_generator`` shows the implied g(r)).
    ``derive=False`` skips SymPy and the reference problems (fast listing); ``answers`` (default: ``derive``)
    says whether the reference-problem answers ``sequence_follows`` and ``converges_to`` are computed.

    Sequence level (issue 12): ``aggregation`` (data), ``importance_weight_kind`` (``per-token`` or ``none``, from
    the expression), ``sequence_placement`` (:func:`sequence_placement`: derived from where the expression enters,
    its weight and the aggregation), ``sequence_scale``, ``sequence_note`` and, with ``derive``,
    ``sequence_follows``: the gradient the placement's exact expected gradient equals on
    :data:`SEQUENCE_REFERENCE` (``KL(q||p)``, ``KL(p||q)``, ``partial KL(q||p)``, ``partial KL(p||q)``, ``zero``;
    None: none of them), with ``sequence_reference`` saying which pair. Training end point (issue 14), with
    ``derive``: ``converges_to`` (:func:`converges_to`) and ``converges_to_reference``, the one-token problem
    :data:`klsym.rl.fixedpoint.REFERENCE_PROBLEM` (a single token: the placement does not enter there).

    >>> row = crosswalk(get_setting("verl"), derive=False)
    >>> row["estimator"], row["clamp_region"]
    ('k3', 't < -10.99998 or t > 2.610869')
    """
    estimator = setting.get_estimator()
    region = ex.clamp_region(setting.expr)
    row = {
        "framework": setting.framework,
        "setting": setting.setting,
        "default": setting.default,
        "enabled_by_default": setting.enabled_by_default,
        "estimator": estimator.name,
        "expr": str(estimator.expr),
        "surrogate": None if estimator.surrogate_expr is None else str(estimator.surrogate_expr),
        "formula_framework": setting.formula_framework,
        "expression": setting.expression,
        "enters": setting.enters,
        "formula_r": setting.formula_r,
        "mode": setting.mode,
        "placement": setting.placement,
        "input_clamp": setting.input_clamp,
        "output_clamp": setting.output_clamp,
        "clamp_region": format_region(region),
        "clamp_region_intervals": [list(interval) for interval in region],
        "clamp_effect": clamp_effect(setting),
        "importance_weight": setting.importance_weight,
        "offpolicy_weighting": setting.offpolicy_weighting,
        "offpolicy": setting.offpolicy,
        "reduction": setting.reduction,
        "coefficient": f"{setting.coefficient_name}={setting.coefficient:g}",
        "default_flags": setting.default_flags,
        "citation": setting.citation,
        "verified": setting.verified,
        "checked": setting.checked,
        "notes": setting.notes,
    }
    where = sequence_placement(setting)
    row.update(
        {
            "aggregation": setting.aggregation,
            "importance_weight_kind": where["weight"],
            "sequence_placement": where["placement"],
            "sequence_scale": where["scale"],
            "sequence_note": where["note"],
        }
    )
    if derive:
        row.update(_derived(estimator, setting.mode))
    if derive if answers is None else answers:
        row["sequence_follows"] = sequence_answer(setting)["follows"]
        row["sequence_reference"] = describe_sequence_reference()
        row["converges_to"] = converges_to(setting)
        row["converges_to_reference"] = describe_fixed_point_reference()
    return row


# --- sequence level and training end point: the answers of issues 12 and 14 ------------------------

#: The documented sequence-level reference problem of ``sequence_follows``: a fixed-length (T = 3) policy over
#: V = 3 tokens, p with i.i.d. N(0, 1) logits (seed 0) and q = p with N(0, 0.5^2) noise on every logit
#: (:func:`klsym.rl.sequences.pair` ``("random", 3, 3, 0.5, seed=0)``). No framework clamp bites on it.
SEQUENCE_REFERENCE = {"kind": "random", "vocab_size": 3, "horizon": 3, "distance": 0.5, "seed": 0}
# a loss term's mode read per token: each token's coefficient multiplies that token's own score
_LOSS_PLACEMENTS = {"loss": "loss", "full": "loss+reward", "reward": "reward"}


def importance_weight_kind(setting: FrameworkSetting) -> str:
    r"""``per-token`` where the expression carries a differentiable weight :math:`e^{\log q - \cdot}`, else ``none``.

    An expression is one token's term, so any weight it holds is that token's; a whole-sequence weight (TRL's
    ``importance_sampling_level='sequence'``) is not a per-token expression and no default uses one.
    """
    return "per-token" if any(w["differentiable"] for w in ex.weights(setting.expr)) else "none"


def sequence_placement(setting: FrameworkSetting) -> dict:
    r"""The sequence-level placement (:mod:`klsym.rl.sequences`) a setting implements, derived from its expression.

    A term that enters the **loss** puts each token's gradient coefficient on that token's own score, so the
    placement is the expression's mode read per token: ``loss`` (no differentiable weight); ``loss+reward`` (mode
    ``full`` through a differentiable per-token weight such as :math:`e^{\log q - \mathrm{sg}\log q}`: the weight
    adds each token's own score term, not the reward-to-go, so it is not the sequence-level ``full``). A term that
    enters the **reward** becomes returns: aggregation ``per-token`` gives ``reward-to-go`` (undiscounted returns;
    a critic or baseline changes the variance, not the expectation), ``sequence`` and ``sequence-mean`` give
    ``sequence-reward``. The aggregation sets ``scale``, a positive constant at fixed length T that the KL
    coefficient absorbs (:data:`klsym.rl.sequences.FRAMEWORK_PLACEMENTS`; with variable lengths a per-sequence
    mean weights each sequence by 1/L, no constant).

    >>> [sequence_placement(get_setting(name))["placement"] for name in ("verl", "trl-ppo", "trl-rloo", "nemo-rl")]
    ['loss', 'reward-to-go', 'sequence-reward', 'loss+reward']
    """
    from klsym.rl.sequences import FRAMEWORK_PLACEMENTS  # the numeric sequence layer only when asked

    weight = importance_weight_kind(setting)
    if setting.enters == "reward":
        placement, scale, note = FRAMEWORK_PLACEMENTS[("reward", setting.aggregation)]
    else:
        _, scale, note = FRAMEWORK_PLACEMENTS[("loss", setting.aggregation)]
        placement = _LOSS_PLACEMENTS.get(setting.mode)
        if placement == "loss+reward":
            note = FRAMEWORK_PLACEMENTS[("full", weight)][2]
    return {"placement": placement, "scale": scale, "weight": weight, "note": note}


@lru_cache(maxsize=1)
def sequence_reference():
    """The (q, p) pair of :data:`SEQUENCE_REFERENCE` and its four reference gradients (computed once)."""
    from klsym.rl.sequences import pair, reference_gradients

    q, p = pair(**SEQUENCE_REFERENCE)
    return q, p, reference_gradients(q, p)


@cache
def _sequence_follows(estimator: Estimator, placement: str) -> str | None:
    from klsym.rl.sequences import follows, placement_gradient

    q, p, references = sequence_reference()
    return follows(placement_gradient(estimator, q, p, placement), references)


def sequence_answer(setting: FrameworkSetting) -> dict:
    r"""Issue 12's answer for one setting: :func:`sequence_placement` and what its exact expected gradient
    follows on :data:`SEQUENCE_REFERENCE` (``follows``: one of :data:`klsym.rl.sequences.FOLLOWS_ORDER`,
    ``zero``, or None when it is none of them).

    >>> sequence_answer(get_setting("verl"))["follows"], sequence_answer(get_setting("trl-ppo"))["follows"]
    ('partial KL(p||q)', 'KL(q||p)')
    """
    where = sequence_placement(setting)
    follows = None if where["placement"] is None else _sequence_follows(setting.get_estimator(), where["placement"])
    return where | {"follows": follows}


def describe_sequence_reference() -> str:
    """:data:`SEQUENCE_REFERENCE` in words (the crosswalk's ``sequence_reference``)."""
    ref = SEQUENCE_REFERENCE  # klsym.rl.sequences.pair draws q's noise with seed + 1
    return (
        f"sequences of T = {ref['horizon']} over V = {ref['vocab_size']} tokens: p with N(0, 1) logits per "
        f"prefix (seed {ref['seed']}), q = p + N(0, {ref['distance']}^2) logit noise (seed {ref['seed'] + 1}); "
        "klsym.rl.frameworks.SEQUENCE_REFERENCE"
    )


def describe_fixed_point_reference() -> str:
    """:data:`klsym.rl.fixedpoint.REFERENCE_PROBLEM` in words (the crosswalk's ``converges_to_reference``)."""
    from klsym.rl.fixedpoint import REFERENCE_PROBLEM as ref

    def numbers(values):
        return "(" + ", ".join(f"{v:g}" for v in values) + ")"

    return (
        f"one token, V = {ref.size}: p = {numbers(ref.p)}, reward R = {numbers(ref.reward)}, "
        f"beta = {ref.beta:g}; q* = p e^(R/beta)/Z; klsym.rl.fixedpoint.REFERENCE_PROBLEM"
    )


def expression_term(setting: FrameworkSetting):
    r"""The setting's KL term for :mod:`klsym.rl.fixedpoint`, evaluated through its expression: a
    :class:`klsym.rl.fixedpoint.KLTerm` whose per-sample score coefficient is the expression's on-policy
    coefficient :math:`\partial L / \partial \log q` (clamps and weights as the framework computes them).
    """
    return _expression_term_class()(
        setting.get_estimator(), setting.mode, setting.input_clamp, setting.output_clamp, setting.expr, setting.enters
    )


@lru_cache(maxsize=1)
def _expression_term_class():
    from klsym.rl.fixedpoint import KLTerm  # the fixed-point layer only when asked

    @dataclass(frozen=True)
    class ExpressionTerm(KLTerm):
        """A KLTerm whose score coefficient is a framework expression's (fields: the parsed ``expression``, ``enters``).

        :func:`klsym.rl.fixedpoint.kl_gradient` takes every term's per-sample :meth:`weight`: here the expression's
        own coefficient, so clamps act where and how the framework applies them (NeMo-RL's clamp(w k3) zeroes both
        gradient parts where it bites; clamp(k) in a mode would keep the capped score part).
        """

        expression: sp.Expr = sp.S.Zero
        enters: str = "loss"

        @cached_property
        def _coefficient(self):
            return ex.numeric(ex.coefficient(self.expression, self.enters))

        def weight(self, log_ratios):
            zeros = np.zeros(np.shape(log_ratios))  # on-policy: logq = logb, logp - logq = t
            return self._coefficient(zeros, log_ratios, zeros)

    return ExpressionTerm


@cache
def _converges_to(term) -> str:
    from klsym.rl.fixedpoint import REFERENCE_PROBLEM, converges_to

    return converges_to(term, term.mode, REFERENCE_PROBLEM)


def converges_to(setting: FrameworkSetting) -> str:
    r"""Issue 14's answer for one setting: where exact expected-gradient training with it ends up on
    :data:`klsym.rl.fixedpoint.REFERENCE_PROBLEM` (V = 3, p = (0.5, 0.3, 0.2), reward R = (0, 0.5, 1), β = 0.5;
    the intended optimum :math:`q^* = p\,e^{R/\beta}/Z`), the term taken from the expression
    (:func:`expression_term`); settings with the same term are computed once.
    """
    if setting.mode not in MODES:
        return "not computed: the expression matches no gradient mode"
    return _converges_to(expression_term(setting))


def _derived(estimator: Estimator, mode: str) -> dict:
    from klsym.derive import symbolic  # SymPy derivations take seconds: only when asked

    try:
        analysis = symbolic.analyze(estimator)
    except Exception as err:  # a formula SymPy cannot analyse is reported, not raised
        reason = f"not derived ({type(err).__name__}: {str(err).splitlines()[0][:120]})"
        return {"value_divergence": reason, "gradient_divergence": reason, "gradient_generator": None}
    if mode not in analysis["gradient"]:
        return {
            "value_divergence": analysis["value"]["divergence"],
            "gradient_divergence": None,
            "gradient_generator": None,
        }
    gradient = analysis["gradient"][mode]
    return {
        "value_divergence": analysis["value"]["divergence"],
        "gradient_divergence": gradient["divergence"],
        "gradient_generator": gradient["generator"],
    }


def crosswalk_table(defaults_only: bool = False, derive: bool = True, answers: bool | None = None) -> list[dict]:
    """:func:`crosswalk` for every setting (or each framework's default)."""
    return [crosswalk(s, derive, answers) for s in load_settings() if s.default or not defaults_only]


#: Columns of :func:`answers_table`.
ANSWER_COLUMNS = (
    "setting",
    "estimator",
    "enters",
    "mode",
    "aggregation",
    "importance_weight_kind",
    "sequence_placement",
    "sequence_scale",
    "sequence_follows",
    "converges_to",
)


def answers_table(defaults_only: bool = True):
    r"""Issues 12 and 14 per setting, a DataFrame: the sequence-level placement and what it follows on
    :data:`SEQUENCE_REFERENCE`, and where training ends up on :data:`klsym.rl.fixedpoint.REFERENCE_PROBLEM`
    (columns :data:`ANSWER_COLUMNS`; ``sequence_follows`` "-" where it follows none of the four references).
    """
    import pandas as pd

    rows = [
        crosswalk(s, derive=False, answers=True) | {"setting": s.key}
        for s in load_settings()
        if s.default or not defaults_only
    ]
    return pd.DataFrame([{c: row[c] for c in ANSWER_COLUMNS} for row in rows]).fillna({"sequence_follows": "-"})


def gradient_check_table(q, p, n: int = 200_000, seed: int = 0, settings=None):
    r"""On-policy (b = q) expected gradient of each setting's expression: exact vs Monte Carlo, with |z|.

    Exact: :func:`klsym.rl.offpolicy.exact_expression` (categorical sums, Gaussian quadrature); MC: x ~ q.
    ``settings`` defaults to each framework's default setting.
    """
    import pandas as pd

    from klsym.exact.expectations import KL_PQ, KL_QP, true_gradients
    from klsym.rl.offpolicy import exact_expression, monte_carlo

    truth = true_gradients(q, p)
    rows = []
    for setting in settings if settings is not None else [s for s in load_settings() if s.default]:
        exact = exact_expression(setting.expr, setting.enters, q, p, q)
        mc = monte_carlo(setting.expr, setting.enters, q, p, q, n, seed)
        z = (mc["gradient"] - exact["gradient"]) / np.where(mc["gradient_se"] > 0, mc["gradient_se"], np.inf)
        rows.append(
            {
                "setting": setting.key,
                "mode": setting.mode,
                "exact gradient": np.round(exact["gradient"], 6),
                "MC gradient": np.round(mc["gradient"], 6),
                "max |z|": float(np.max(np.abs(z))),
                f"grad {KL_QP}": np.round(truth[KL_QP], 6),
                f"grad {KL_PQ}": np.round(truth[KL_PQ], 6),
            }
        )
    return pd.DataFrame(rows)


def offpolicy_crosswalk(q, p, behaviours: dict, settings=None):
    r"""Every setting's off-policy answer: the weighting its expression implements, and the exact bias of its
    expected gradient when the tokens come from each behaviour ``{label: b}`` instead of q.

    A ``reward`` row enters the advantage, which the policy loss multiplies by the ratio q/b: it is evaluated as
    ``sg(exp(logq - logb)) * reward`` (PPO's ratio where the clip is inactive). Columns: relative bias against the same
    expression on-policy (b = q; NaN where that gradient is zero, as for k1 in the loss: the absolute column
    says it then) and relative error against :math:`\nabla KL(q\|p)`.
    """
    import pandas as pd

    from klsym.rl.offpolicy import drift, exact_expression, relative_bias, true_gradient

    truth = true_gradient(q, p)
    rows = []
    for setting in settings if settings is not None else load_settings():
        expr = setting.expr if setting.enters == "loss" else ex.sg(sp.exp(ex.logq - ex.logb)) * setting.expr
        on = exact_expression(expr, setting.enters, q, p, q)["gradient"]
        for label, b in behaviours.items():
            off = exact_expression(expr, setting.enters, q, p, b)["gradient"]
            rows.append(
                {
                    "setting": setting.key,
                    "enters": setting.enters,
                    "mode": setting.mode,
                    "weighting": setting.offpolicy_weighting,
                    "behaviour": label,
                    "drift KL(b||q)": drift(q, b),
                    "bias vs on-policy": float(np.linalg.norm(off - on)),
                    "relative bias vs on-policy": relative_bias(off, on),
                    "relative error vs grad KL(q||p)": float(np.linalg.norm(off - truth) / np.linalg.norm(truth)),
                }
            )
    return pd.DataFrame(rows)


__all__ = [
    "gradient_check_table",
    "offpolicy_crosswalk",
    "FRAMEWORKS_FILE",
    "MODES",
    "AGGREGATIONS",
    "FrameworkSetting",
    "UnknownFrameworkError",
    "load_settings",
    "framework_names",
    "get_setting",
    "clamp_effect",
    "crosswalk",
    "crosswalk_table",
    "SEQUENCE_REFERENCE",
    "importance_weight_kind",
    "sequence_placement",
    "sequence_reference",
    "sequence_answer",
    "describe_sequence_reference",
    "describe_fixed_point_reference",
    "expression_term",
    "converges_to",
    "ANSWER_COLUMNS",
    "answers_table",
]
