"""``klsym derive``: the symbolic analysis of estimators (all built-ins by default)."""
from __future__ import annotations

from klsym.derive.estimators import BUILTINS, from_formula, get_estimator
from klsym.jsonio import dumps, format_table


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "derive", help="derive f(1), f'(1), f''(1), convexity, value and gradient divergences",
        description="Symbolic analysis of estimators k(r), r = p/q, x ~ q. No names: all built-ins.")
    parser.add_argument("names", nargs="*", metavar="NAME", help=f"estimators ({', '.join(BUILTINS)})")
    parser.add_argument("--expr", action="append", default=[], metavar="FORMULA",
                        help="a formula in r, e.g. 'log((r-1)**2 + 1)' (repeatable)")
    parser.add_argument("--format", choices=("json", "table", "latex"), default="table")
    parser.set_defaults(func=run)


def run(args) -> int:
    from klsym.derive.symbolic import analyze, render_latex  # SymPy-heavy: import only when used

    estimators = [get_estimator(n) for n in args.names] + [from_formula(f) for f in args.expr]
    if not estimators:
        estimators = list(BUILTINS.values())
    rows = [analyze(e) for e in estimators]
    if args.format == "json":
        print(dumps(rows))
    elif args.format == "latex":
        print(render_latex(rows), end="")
    else:
        print(format_table([{
            "name": row["name"], "k(r)": row["expr"], "f(1)": row["f1"], "f'(1)": row["df1"],
            "f''(1)": row["d2f1"], ">=0": row["nonnegative"], "convex": row["convex"],
            "E_q[k]": row["value"]["divergence"],
            **{m: row["gradient"][m]["divergence"] for m in ("loss", "reward", "full")},
        } for row in rows]))
    return 0
