"""``klsym sweep``: many pairs, estimators and gradients on Dask distributed, each point what ``klsym mc`` prints.

    python -m klsym sweep --spec SPEC.json --workers 4 --format csv --out sweep.csv
    python -m klsym sweep --spec SPEC.json --scheduler tcp://10.0.0.5:8786

SPEC: ``{"pairs": [{"q": [mu, sigma], "p": [mu, sigma]} or {"q_logits": FILE, "p_logits": FILE}, ...],
"estimators": [...], "n": N, "seed": S, "gradient": "loss,full"}`` (gradient optional). Point i uses seed
S + i. Output: tidy rows (JSON list or CSV), one per (point, estimator); see :mod:`klsym.simulate.sweep`.
Failed tasks are retried (``--retries``) and reported on stderr; the exit code is 1 if a point failed for good.
"""

from __future__ import annotations

import csv
import io
import json
import sys

from klsym.cli import UserError


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "sweep",
        help="Monte Carlo and exact statistics over a grid of pairs, on Dask distributed",
        description="Run the streaming Monte Carlo engine (and the exact layer) for every pair of a spec on a "
        "Dask cluster: RNG blocks as tasks, merged in block order, so point i equals "
        "`klsym mc --seed S+i` bit for bit.",
    )
    parser.add_argument("--spec", required=True, metavar="SPEC.json", help="the grid (see klsym.simulate.sweep)")
    where = parser.add_mutually_exclusive_group()
    where.add_argument(
        "--workers", type=int, default=None, metavar="N", help="worker processes of a local cluster (default 2)"
    )
    where.add_argument("--scheduler", metavar="ADDRESS", help="connect to a running Dask scheduler instead")
    parser.add_argument("--retries", type=int, default=2, help="resubmissions of a failed task (default 2)")
    parser.add_argument("--no-exact", action="store_true", help="skip the exact layer (Monte Carlo only)")
    parser.add_argument("--format", choices=("json", "csv"), default="json", help="output format")
    parser.add_argument("--out", metavar="FILE", help="write the rows here instead of stdout")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


def run(args) -> int:
    from klsym.jsonio import dumps, to_jsonable
    from klsym.simulate.sweep import load_spec, sweep

    if args.workers is not None and args.workers < 1:
        raise UserError(f"--workers must be at least 1, got {args.workers}")
    if args.retries < 0:
        raise UserError(f"--retries must be >= 0, got {args.retries}")
    spec = load_spec(args.spec)
    result = sweep(
        spec,
        workers=args.workers,
        scheduler=args.scheduler,
        retries=args.retries,
        progress=not args.quiet,
        exact=not args.no_exact,
    )
    text = dumps(result.rows) if args.format == "json" else _csv(to_jsonable(result.rows))
    if args.out:
        with open(args.out, "w") as handle:
            handle.write(text)
    else:
        print(text)
    for failure in result.failures:
        status = "gave up" if failure["final"] else "retried"
        print(
            f"klsym sweep: task {failure['task']} of point {failure['point']} ({failure['pair']}) failed on "
            f"attempt {failure['attempt']} ({status}): {failure['error']}",
            file=sys.stderr,
        )
    print(
        f"klsym sweep: {len(spec.points)} points, {result.tasks} tasks, {len(result.rows)} rows, "
        f"{result.seconds:.1f} s",
        file=sys.stderr,
    )
    return 0 if result.complete else 1


def _csv(rows: list[dict]) -> str:
    columns = list(dict.fromkeys(key for row in rows for key in row))
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns)
    writer.writeheader()
    for row in rows:  # vectors (gradients, parameters) as JSON text in one cell
        writer.writerow({k: json.dumps(v) if isinstance(v, list) else v for k, v in row.items()})
    return out.getvalue().rstrip("\n")
