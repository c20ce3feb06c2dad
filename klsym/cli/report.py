"""``python -m klsym report``: execute the notebooks and build the offline HTML report."""

from __future__ import annotations

import sys
from pathlib import Path


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "report",
        help="execute notebooks/NN-*.ipynb and build reports/index.html (offline HTML)",
        description="Execute every notebooks/NN-*.ipynb with papermill (only those whose inputs changed), "
        "convert them to HTML and write index.html with the derivation tables.",
    )
    parser.add_argument(
        "--small", action="store_true", help="use the CI parameters from notebooks/small_parameters.json"
    )
    parser.add_argument("--jobs", type=int, default=2, help="notebooks executed in parallel (default 2)")
    parser.add_argument(
        "--only", nargs="+", metavar="NAME", help="build only these notebooks (e.g. 02 or 02-value-estimators)"
    )
    parser.add_argument("--output", type=Path, default=None, help="report folder (default reports/)")
    parser.add_argument(
        "--notebooks",
        type=Path,
        default=None,
        metavar="DIR",
        help="folder of the NN-name.ipynb notebooks (default notebooks/)",
    )
    parser.set_defaults(func=run)


def run(args) -> int:
    from klsym.jsonio import format_table
    from klsym.paths import NOTEBOOKS_DIR, REPORTS_DIR
    from klsym.report.build import NotebookFailure, build_report

    output = args.output if args.output is not None else REPORTS_DIR
    try:
        result = build_report(
            output,
            small=args.small,
            jobs=args.jobs,
            only=args.only,
            notebooks_dir=args.notebooks if args.notebooks is not None else NOTEBOOKS_DIR,
        )
    except NotebookFailure as failure:
        print(f"klsym: error: {failure}", file=sys.stderr)
        print("klsym: the previous report was left untouched", file=sys.stderr)
        return 1
    rows = [
        {
            "notebook": page.name,
            "seconds": round(page.seconds, 1),
            "this build": "executed" if page.executed else "unchanged",
            "seed": page.seed,
        }
        for page in result.pages
    ]
    print(format_table(rows, ["notebook", "seconds", "this build", "seed"]))
    print(f"report: {result.output / 'index.html'}")
    return 0
