"""``klsym derive``: the symbolic analysis of estimators (all built-ins by default).

With ``--family gaussian``: closed forms of the mean, variance and expected gradients for
q = N(mu_q, sigma_q^2), p = N(mu_p, sigma_p^2) (:mod:`klsym.derive.closed_forms`).
"""

from __future__ import annotations

from klsym.cli import add_time_budget_argument, within_budget
from klsym.derive.estimators import BUILTINS, from_formula, get_estimator
from klsym.jsonio import dumps, format_table

FAMILIES = ("gaussian",)


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "derive",
        help="derive f(1), f'(1), f''(1), convexity, value and gradient divergences; "
        "--family gaussian: closed-form mean, variance, gradients",
        description="Symbolic analysis of estimators k(r), r = p/q, x ~ q. No names: all built-ins. "
        "--family gaussian: closed forms of E_q[k], Var_q[k] and the expected gradients "
        "w.r.t. mu_q, sigma_q in each mode (loss, reward, full) for q = N(mu_q, sigma_q^2), "
        "p = N(mu_p, sigma_p^2), with the conditions under which each exists.",
    )
    parser.add_argument("names", nargs="*", metavar="NAME", help=f"estimators ({', '.join(BUILTINS)})")
    parser.add_argument(
        "--expr",
        action="append",
        default=[],
        metavar="FORMULA",
        help="a formula in r, e.g. 'log((r-1)**2 + 1)' (repeatable)",
    )
    parser.add_argument(
        "--family",
        choices=FAMILIES,
        default=None,
        help="closed forms for this family of q and p instead of the derivation table",
    )
    parser.add_argument(
        "--format",
        choices=("json", "table", "markdown", "latex"),
        default="table",
        help="output format (markdown: same as table with --family)",
    )
    add_time_budget_argument(parser)  # one budget for the whole command; steps cut short are "undecided"
    parser.set_defaults(func=run)


def run(args) -> int:
    estimators = [get_estimator(n) for n in args.names] + [from_formula(f) for f in args.expr]
    if not estimators:
        estimators = list(BUILTINS.values())
    if args.family is not None:
        return _run_family(args, estimators)
    from klsym.derive.symbolic import analyze, render_latex, render_markdown  # SymPy-heavy: import when used

    rows = within_budget(args, lambda: [analyze(e) for e in estimators], lambda: "deriving")
    if args.format == "json":
        print(dumps(rows))
    elif args.format == "latex":
        print(render_latex(rows), end="")
    elif args.format == "markdown":
        print(render_markdown(rows), end="")
    else:
        print(
            format_table(
                [
                    {
                        "name": row["name"],
                        "k(r)": row["expr"],
                        "f(1)": row["f1"],
                        "f'(1)": row["df1"],
                        "f''(1)": row["d2f1"],
                        ">=0": row["nonnegative"],
                        "convex": row["convex"],
                        "E_q[k]": row["value"].get("expectation", row["value"]["divergence"]),
                        **{m: row["gradient"][m]["divergence"] for m in ("loss", "reward", "full")},
                    }
                    for row in rows
                ]
            )
        )
    return 0


def _run_family(args, estimators) -> int:
    from klsym.derive import closed_forms

    output_format = args.format
    rows = within_budget(
        args,
        lambda: closed_forms.closed_form_rows(estimators),
        lambda: f"deriving the closed forms for the {args.family} family",
    )
    if output_format == "json":
        keys = (
            "name",
            "mean",
            "variance",
            "gradient",
            "conditions",
            "expr",
            "closed_form",
            "surrogate",
            "mean_equals",
            "latex",
        )
        print(dumps([{key: row[key] for key in keys} for row in rows]))
    elif output_format == "latex":
        print(closed_forms.render_latex(rows), end="")
    else:
        print(closed_forms.render_markdown(rows), end="")
    return 0
