"""``klsym exact``: exact KL, estimator moments, P(k < 0) and bias for a pair (q, p).

Gaussian pair::

    python -m klsym exact --q 0,1 --p 1,1 --estimators k1,k2,k3 --format json

Categorical pair (logits from ``.npy`` or whitespace text files)::

    python -m klsym exact --q-logits q.txt --p-logits p.txt

``--published`` prints every row of the seed tables in ``data/`` next to its exact value instead.
"""

from __future__ import annotations

import numpy as np

from klsym.cli import UserError, add_format_argument, add_time_budget_argument, parse_pair, within_budget
from klsym.derive.registry import BUILTIN_INFO, split_names
from klsym.exact.expectations import KL_PQ, KL_QP, exact_summary
from klsym.exact.families import Categorical, Gaussian, check_same_family
from klsym.jsonio import dumps, format_table


def add_pair_arguments(
    parser, positions_help: str = "number of i.i.d. positions (sequence ratio = product of T ratios)"
) -> None:
    """Options shared by ``exact`` and ``gradient``: the pair, estimators, positions, format."""
    parser.add_argument("--q", metavar="MU,SIGMA", help="sampler q = N(MU, SIGMA^2) (the policy)")
    parser.add_argument("--p", metavar="MU,SIGMA", help="reference p = N(MU, SIGMA^2)")
    parser.add_argument("--q-logits", metavar="FILE", help="categorical sampler: logits (.npy or text)")
    parser.add_argument("--p-logits", metavar="FILE", help="categorical reference: logits (.npy or text)")
    parser.add_argument(
        "--estimators", default=",".join(BUILTIN_INFO), help="comma-separated estimator names (default: all built-ins)"
    )
    parser.add_argument(
        "--expr",
        action="append",
        default=[],
        metavar="FORMULA",
        help="a custom estimator as a formula in r, e.g. '(r-1)**2/2' (repeatable)",
    )
    parser.add_argument("--positions", type=int, default=1, metavar="T", help=positions_help)
    add_time_budget_argument(parser)
    add_format_argument(parser)


def pair_from_args(args):
    """Build (q, p) from ``--q/--p`` or ``--q-logits/--p-logits``, with one clear error otherwise."""
    gaussian = args.q is not None or args.p is not None
    categorical = args.q_logits is not None or args.p_logits is not None
    if gaussian == categorical:
        raise UserError("give either --q and --p (Gaussian) or --q-logits and --p-logits (categorical)")
    if gaussian:
        if args.q is None or args.p is None:
            raise UserError("both --q and --p are required")
        q, p = Gaussian(*parse_pair(args.q)), Gaussian(*parse_pair(args.p))
    else:
        if args.q_logits is None or args.p_logits is None:
            raise UserError("both --q-logits and --p-logits are required")
        q, p = Categorical.from_file(args.q_logits), Categorical.from_file(args.p_logits)
    check_same_family(q, p)
    return q, p


def estimators_from_args(args):
    from klsym.derive.estimators import from_formula, get_estimators

    estimators = get_estimators(args.estimators) if args.estimators else []
    estimators += [from_formula(text) for text in args.expr]
    if not estimators:
        raise UserError("no estimators selected")
    return estimators


def plans_from_args(args):
    """The estimators of :func:`estimators_from_args` as the exact layer's plans (:mod:`klsym.exact.plans`):
    built-in names resolve without SymPy; only ``--expr`` formulas are parsed by it."""
    from klsym.exact.plans import plan_of

    plans = [plan_of(name) for name in split_names(args.estimators or "")]
    if args.expr:
        from klsym.derive.estimators import from_formula

        plans += [plan_of(from_formula(text)) for text in args.expr]
    if not plans:
        raise UserError("no estimators selected")
    return plans


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "exact",
        help="exact KL and estimator moments for a Gaussian or categorical pair",
        description="Exact KL(q||p), KL(p||q) and, per estimator, mean, std, E[k^2], P(k<0), bias; "
        "method closed_form, quadrature or exact_sum.",
    )
    add_pair_arguments(parser)
    from klsym.cli.offpolicy import add_behaviour_arguments

    add_behaviour_arguments(parser)
    parser.add_argument(
        "--published", action="store_true", help="print every published seed-table row next to its exact value"
    )
    parser.set_defaults(func=run)


def run(args) -> int:
    if args.published:
        from klsym.report.published import reproduction_rows

        rows = reproduction_rows()
        print(dumps(rows) if args.format == "json" else format_table(rows))
        return 0
    q, p = pair_from_args(args)
    from klsym.cli.offpolicy import behaviour_from_args, run_exact

    behaviour = behaviour_from_args(args, q)
    if behaviour is not None:
        return run_exact(args, q, p, behaviour, estimators_from_args(args))
    summary = summarise(args, exact_summary, q, p, "computing the exact moments of")
    if args.format == "json":
        print(dumps(summary))
        return 0
    print_pair_header(summary)
    print(f"{KL_QP} = {summary['kl'][KL_QP]:.10g}   {KL_PQ} = {summary['kl'][KL_PQ]:.10g}")
    rows = []
    for name, stats in summary["estimators"].items():
        rows.append(
            {
                "estimator": name,
                "target": stats["target"],
                "mean": stats["mean"],
                "std": stats["std"],
                "second_moment": stats["second_moment"],
                "prob_negative": stats["prob_negative"],
                **{f"bias {label}": bias_cell(stats, label) for label in (KL_QP, KL_PQ)},
                "method": stats["method"],
            }
        )
    print(format_table(rows))
    return 0


def bias_cell(stats: dict, label: str):
    """The table cell of a bias: its value, or ``undefined (inf - inf)`` where it has none."""
    reason = stats.get("bias_undefined", {}).get(label)
    return stats["bias"][label] if reason is None else f"undefined ({reason})"


def summarise(args, summary_of, q, p, doing: str) -> dict:
    """``summary_of(q, p, estimators, positions)`` one estimator at a time within the time budget."""
    estimators = plans_from_args(args)
    current = [estimators[0].name]

    def compute():
        summary = None
        for estimator in estimators:
            current[0] = estimator.name
            check_evaluable(estimator)
            part = summary_of(q, p, [estimator], args.positions)
            if summary is None:
                summary = part
            else:
                summary["estimators"].update(part["estimators"])
        return summary

    return within_budget(args, compute, lambda: f"{doing} {current[0]!r}")


def check_evaluable(estimator) -> None:
    """Compile the estimator's numeric forms now, so a formula SymPy cannot compile is one clear error."""
    try:
        _ = estimator.numeric, estimator.numeric_dt
    except Exception as err:
        if not isinstance(err, _compile_errors()):
            raise
        raise UserError(
            f"estimator {estimator.name!r} cannot be compiled for numeric evaluation ({type(err).__name__}: {err})"
        ) from None


def _compile_errors() -> tuple:
    import sympy as sp  # loaded already: only a formula SymPy compiled fails here

    return (
        ValueError,
        TypeError,
        ArithmeticError,
        NotImplementedError,
        AttributeError,
        RecursionError,
        sp.SympifyError,
        sp.PolynomialError,
    )


def print_pair_header(summary: dict) -> None:
    """The first line of the table output of ``exact`` and ``gradient``: which pair was used."""
    print(
        f"family {summary['family']}  q {_short(summary['q'])}  p {_short(summary['p'])}  "
        f"positions {summary['positions']}"
    )


def _short(params) -> str:
    params = np.asarray(params, dtype=float)
    if params.size <= 4:  # shortest repr: 1.000001 must not print as 1
        return "(" + ", ".join(repr(float(v)) for v in params) + ")"
    return f"logits[{params.size}]"
