"""``klsym derive``: the symbolic analysis of estimators (all built-ins by default).

With ``--family gaussian``: closed forms of the mean, variance and expected gradients for
q = N(mu_q, sigma_q^2), p = N(mu_p, sigma_p^2) (:mod:`klsym.derive.closed_forms`).
"""

from __future__ import annotations

from klsym.cli import add_time_budget_argument, within_budget
from klsym.derive.registry import BUILTIN_INFO, canonical_name
from klsym.jsonio import dumps, format_table
from klsym.paths import PACKAGE_DIR

FAMILIES = ("gaussian",)
#: The modules a built-in's derivation row depends on: its cached row is keyed by their sources (and the name,
#: klsym's and SymPy's versions), so a warm ``derive`` of built-ins reads rows without importing SymPy.
DERIVING_SOURCES = tuple(
    str(PACKAGE_DIR / "derive" / name)
    for name in (
        "symbolic.py",
        "divergences.py",
        "estimators.py",
        "registry.py",
        "symbols.py",
        "gaussian_closed_form.py",
        "budget.py",
    )
)


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
    parser.add_argument("names", nargs="*", metavar="NAME", help=f"estimators ({', '.join(BUILTIN_INFO)})")
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
    names = [canonical_name(n) for n in args.names] if args.names or args.expr else list(BUILTIN_INFO)
    if args.family is not None or args.expr:
        from klsym.derive.estimators import BUILTINS, from_formula

        estimators = [BUILTINS[n] for n in names] + [from_formula(f) for f in args.expr]
        if args.family is not None:
            return _run_family(args, estimators)
        from klsym.derive.symbolic import analyze

        rows = within_budget(args, lambda: [analyze(e) for e in estimators], lambda: "deriving")
    else:
        rows = within_budget(args, lambda: [builtin_row(n) for n in names], lambda: "deriving")
    if args.format == "json":
        print(dumps(rows))
    elif args.format in ("latex", "markdown"):
        from klsym.derive.symbolic import render_latex, render_markdown

        print((render_latex if args.format == "latex" else render_markdown)(rows), end="")
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


def builtin_row(name: str) -> dict:
    """The derivation row of a built-in (:func:`klsym.derive.symbolic.analyze`), read from the cache by its name
    (no SymPy); derived on a miss. A row with undecided steps (time budget) is returned, not stored."""
    from klsym.derive.diskcache import cache_key, cached_json_if

    def derive() -> dict:
        from klsym.derive.estimators import BUILTINS
        from klsym.derive.symbolic import analyze

        return analyze(BUILTINS[name])

    return cached_json_if(
        "derive-row", cache_key(["derive", name], DERIVING_SOURCES), derive, lambda row: not row["undecided"]
    )
