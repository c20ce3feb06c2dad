"""``python -m klsym framework NAME [--setting S] | --list``: one framework's KL setting,
translated into r = p/q with its value divergence, gradient divergence, clamp region, sequence-level placement
(and what it follows) and where training with it converges (klsym.rl.frameworks.crosswalk)."""

from __future__ import annotations

from klsym.cli import UserError, add_format_argument
from klsym.jsonio import dumps, format_table

_TABLE_ROWS = [
    "framework",
    "setting",
    "estimator",
    "expr",
    "surrogate",
    "formula_framework",
    "expression",
    "enters",
    "formula_r",
    "mode",
    "placement",
    "offpolicy_weighting",
    "offpolicy",
    "checked",
    "value_divergence",
    "gradient_divergence",
    "gradient_generator",
    "aggregation",
    "importance_weight_kind",
    "sequence_placement",
    "sequence_scale",
    "sequence_follows",
    "sequence_reference",
    "converges_to",
    "converges_to_reference",
    "input_clamp",
    "output_clamp",
    "clamp_region",
    "clamp_effect",
    "importance_weight",
    "reduction",
    "coefficient",
    "default_flags",
    "enabled_by_default",
    "citation",
    "notes",
]
_LIST_COLUMNS = [
    "framework",
    "setting",
    "default",
    "estimator",
    "mode",
    "aggregation",
    "sequence_placement",
    "input_clamp",
    "output_clamp",
    "coefficient",
    "verified",
]


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "framework",
        help="an RL framework's KL setting: estimator, divergences, clamp region",
        description="Translate an RL framework's KL setting (data/frameworks.json) into r = p/q: "
        "the estimator, where it enters (mode), the divergence its value estimates, "
        "the divergence its expected gradient follows, where clamps freeze it, the sequence-level "
        "placement its loss aggregation gives and what that follows, and where training with it "
        "converges (at documented reference problems).",
    )
    parser.add_argument(
        "name", nargs="?", help="framework name (see --list); a prefix such as 'trl' lists the settings of every match"
    )
    parser.add_argument("--setting", help="setting within the framework (default: its default)")
    parser.add_argument("--list", action="store_true", help="list frameworks and settings")
    add_format_argument(parser)
    parser.set_defaults(func=run)


def matching_frameworks(prefix: str, names: list[str]) -> list[str]:
    """Framework names that ``prefix`` names: itself if it is one, else those starting with it.

    >>> matching_frameworks("trl", ["verl", "trl-grpo", "trl-ppo"])
    ['trl-grpo', 'trl-ppo']
    >>> matching_frameworks("VERL", ["verl", "trl-grpo"])
    ['verl']
    """
    key = prefix.strip().lower()
    if key in names:
        return [key]
    return [name for name in names if key and name.startswith(key)]


def _print_listing(settings, output_format: str) -> None:
    from klsym.rl.frameworks import crosswalk

    rows = [crosswalk(s, derive=False) | {"verified": s.verified} for s in settings]
    rows = [{c: row[c] for c in _LIST_COLUMNS} for row in rows]
    print(dumps(rows) if output_format == "json" else format_table(rows, _LIST_COLUMNS))


def run(args) -> int:
    from klsym.rl.frameworks import UnknownFrameworkError, crosswalk, framework_names, get_setting, load_settings

    if args.list:
        _print_listing(load_settings(), args.format)
        return 0
    if not args.name:
        raise UserError("give a framework NAME or --list")
    matches = matching_frameworks(args.name, framework_names())
    if len(matches) > 1 or (matches and matches[0] != args.name.strip().lower()):
        # a prefix (``trl``: trl-grpo, trl-ppo, trl-rloo): every setting of every match
        if args.setting is not None:
            raise UserError(
                f"{args.name!r} names several frameworks ({', '.join(matches)}); --setting needs exactly one"
            )
        _print_listing([s for s in load_settings() if s.framework in matches], args.format)
        return 0
    try:
        row = crosswalk(get_setting(args.name, args.setting))
    except UnknownFrameworkError as err:
        raise UserError(str(err)) from None
    if args.format == "json":
        print(dumps(row))
    else:
        print(format_table([{"field": key, "value": row[key]} for key in _TABLE_ROWS], ["field", "value"]))
    return 0
