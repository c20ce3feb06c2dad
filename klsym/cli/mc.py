"""``klsym mc``: streaming Monte Carlo of the estimators for a Gaussian or categorical pair.

Gaussian pair, 100 million samples in constant memory::

    python -m klsym mc --q 0,1 --p 1,1 --n 1e8 --seed 0 --estimators k1,k2,k3,k4 --format table

Categorical pair (logits files as for ``klsym exact``), with gradients and a cross-check::

    python -m klsym mc --q-logits q.txt --p-logits p.txt --n 1e6 --gradient loss,full --crosscheck

The JSON object is ``{"n", "seed", "seconds", "backend", "dtype", "estimators": {NAME: {"mean",
"std", "se", "min", "max", "frac_negative", ...}}}``, plus ``gradients`` / ``crosscheck`` when asked.
Results depend only on ``--seed`` and ``--n`` (and the backend), never on ``--chunk`` or ``--threads``.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
import warnings

import numpy as np

from klsym.cli import UserError
from klsym.cli.exact import add_pair_arguments, pair_from_args, plans_from_args
from klsym.cli.offpolicy import add_behaviour_arguments, behaviour_from_args, run_mc
from klsym.derive.budget import time_budget_seconds
from klsym.exact.expectations import label_gradient
from klsym.jsonio import dumps, format_table
from klsym.simulate.montecarlo import DEFAULT_BATCH, DEFAULT_CHUNK, DEFAULT_QUANTILES, DTYPES, crosscheck, gradient, run


def _count(text: str) -> int:
    """A positive integer, also written as ``1e9``."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (math.isfinite(value) and value >= 1 and value == int(value)):
        raise argparse.ArgumentTypeError(f"expected a positive integer (e.g. 1000000 or 1e6), got {text!r}")
    return int(value)


def _levels(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated quantile levels, got {text!r}") from None


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "mc",
        help="streaming Monte Carlo: estimator statistics (and gradients) from n samples of q",
        description="Draw n samples x ~ q in fixed RNG blocks and report, per estimator, the mean, std, "
        "standard error, min, max, fraction negative, approximate quantiles and the spread of "
        "batch means; optionally gradients (loss/reward/full) and z-scores against the exact layer.",
    )
    add_pair_arguments(
        parser,
        positions_help="must be 1: mc samples single positions (exact and gradient "
        "take T > 1; see also the sequence command)",
    )
    add_behaviour_arguments(parser)
    parser.add_argument("--n", type=_count, default=1_000_000, help="number of samples (e.g. 1e8)")
    parser.add_argument("--seed", type=int, default=0, help="seed; results depend only on (seed, n)")
    parser.add_argument(
        "--chunk",
        type=_count,
        default=None,
        help=f"samples per worker task, rounded to RNG blocks (speed/memory only; default up to {DEFAULT_CHUNK})",
    )
    parser.add_argument("--threads", type=_count, default=None, help="worker threads (default: all cores)")
    parser.add_argument(
        "--backend", choices=("numpy", "cupy"), default=None, help="array backend (default: $KLSYM_BACKEND or numpy)"
    )
    parser.add_argument(
        "--dtype",
        choices=tuple(DTYPES),
        default="float64",
        help="precision of samples, log-ratios and estimator values",
    )
    parser.add_argument(
        "--quantiles",
        type=_levels,
        default=DEFAULT_QUANTILES,
        help="comma-separated quantile levels (approximate, see klsym.simulate.montecarlo)",
    )
    parser.add_argument(
        "--batch-size",
        type=_count,
        default=DEFAULT_BATCH,
        help="batch size B for the spread of batch means (one RL step)",
    )
    parser.add_argument(
        "--gradient",
        metavar="MODES",
        default=None,
        help="also estimate gradients wrt q's parameters, modes from loss,reward,full",
    )
    parser.add_argument(
        "--crosscheck", action="store_true", help="add z-scores of the MC means (and gradients) against the exact layer"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument(
        "--force",
        action="store_true",
        help=f"run even when the estimated run time exceeds --time-budget (default {RUN_TIME_LIMIT / 3600:g} h for mc)",
    )
    parser.set_defaults(func=run_command)


#: Seconds beyond which ``mc`` refuses to start without ``--force`` (estimated from a pilot block).
RUN_TIME_LIMIT = 3600.0
#: Below this many samples no pilot is timed: the run is short whatever the pair.
PILOT_ABOVE = 10_000_000


def run_command(args) -> int:
    """The ``mc`` command: RuntimeWarnings stay inside, Ctrl-C prints what was merged so far."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # inf/nan are reported as values, with counts
        try:
            return _run_command(args)
        except KeyboardInterrupt:
            print("klsym: interrupted before the first block was merged; nothing to report", file=sys.stderr)
            return 130


def _estimate_seconds(q, p, estimators, args, options) -> float:
    """Run time of the whole command, from one timed RNG block (a pilot run)."""
    from klsym.simulate.driver import Stream

    block = Stream(q, p, estimators[:1], args.seed, args.backend, args.dtype).backend.block_size
    timings = []
    for _ in range(2):  # the first run compiles; the second is the one timed
        started = time.perf_counter()
        run(
            q,
            p,
            estimators,
            block,
            args.seed,
            quantiles=args.quantiles,
            batch_size=None,
            **{**options, "progress": False, "threads": 1},
        )
        timings.append(time.perf_counter() - started)
    per_sample = timings[-1] / block
    workers = max(1, args.threads or min(os.cpu_count() or 1, 8))
    passes = 1 + bool(args.gradient) + (1 + bool(args.gradient)) * bool(args.crosscheck)
    return per_sample * args.n * passes / workers


def _duration(seconds: float) -> str:
    for unit, size in (("h", 3600.0), ("min", 60.0)):
        if seconds >= size:
            return f"{seconds / size:,.3g} {unit}"
    return f"{seconds:.3g} s"


def _run_command(args) -> int:
    if args.positions != 1:
        raise UserError("mc samples single positions only: --positions must be 1")
    q, p = pair_from_args(args)
    estimators = plans_from_args(args)  # built-in names without SymPy; --expr formulas parsed by it
    behaviour = behaviour_from_args(args, q)
    if behaviour is not None:
        return run_mc(args, q, p, behaviour, [plan.estimator() for plan in estimators])
    options = {
        "chunk": args.chunk,
        "backend": args.backend,
        "dtype": args.dtype,
        "threads": args.threads,
        "progress": not args.quiet,
    }
    limit = RUN_TIME_LIMIT if args.time_budget is None else time_budget_seconds(args.time_budget)
    if args.n > PILOT_ABOVE and not args.force:
        estimate = _estimate_seconds(q, p, estimators, args, options)
        if estimate > limit:
            raise UserError(
                f"--n {args.n:.3g} would take about {_duration(estimate)} (estimated from one "
                f"block); the limit is {_duration(limit)} (--time-budget): use a smaller --n, "
                "or --force"
            )
    result = run(q, p, estimators, args.n, args.seed, quantiles=args.quantiles, batch_size=args.batch_size, **options)
    if args.gradient and "interrupted" not in result:
        result["gradients"] = gradient(q, p, estimators, args.n, args.seed, modes=args.gradient, **options)["gradients"]
    if args.crosscheck and "interrupted" not in result:
        result["crosscheck"] = crosscheck(q, p, estimators, args.n, args.seed, modes=args.gradient or (), **options)
    if "gradients" in result:  # one labelled shape across commands: {"mu", "sigma"} or {"logits"}
        result["gradients"] = {
            name: {
                mode: {key: label_gradient(q, value) for key, value in entry.items()} for mode, entry in modes.items()
            }
            for name, modes in result["gradients"].items()
        }
    if "interrupted" in result:
        print(f"klsym: interrupted: results from the first {result['n']} of {args.n} samples", file=sys.stderr)
    if args.format == "json":
        print(dumps(result))
        return _exit_code(result)
    print(
        f"n {result['n']}  seed {result['seed']}  backend {result['backend']}  dtype {result['dtype']}  "
        f"{result['seconds']:.3f} s"
    )
    rows = []
    for name, entry in result["estimators"].items():
        row = {"estimator": name, "target": entry["target"]}
        row.update({key: entry[key] for key in ("mean", "std", "se", "min", "max", "frac_negative")})
        row["n_nonfinite"] = entry["n_nonfinite"]
        row.update({f"q{level}": value for level, value in entry["quantiles"].items()})
        if entry["batch"]:
            row[f"std(mean of {entry['batch']['size']})"] = entry["batch"]["mean_std"]
        if "crosscheck" in result:
            row["z(mean)"] = result["crosscheck"]["estimators"][name]["mean"]["z"]
        rows.append(row)
    print(format_table(rows))
    for name, modes in result.get("gradients", {}).items():
        for mode, grad in modes.items():
            mean = grad["mean"]
            if "logits" in mean:
                values = np.asarray(mean["logits"])
                shown = "logits [" + ", ".join(f"{v:.6g}" for v in values[:4]) + (", ...]" if values.size > 4 else "]")
            else:
                shown = ", ".join(f"{key} {value:.6g}" for key, value in mean.items())
            print(f"gradient {name} {mode}: {shown}")
    if "crosscheck" in result:
        check = result["crosscheck"]
        print(f"crosscheck: max |z| = {check['max_abs_z']:.3g} ({'passed' if check['passed'] else 'FAILED'})")
    return _exit_code(result)


def _exit_code(result) -> int:
    return 130 if "interrupted" in result else 0  # 128 + SIGINT, as a shell reports Ctrl-C
