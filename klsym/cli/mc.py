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

from klsym.cli import UserError
from klsym.jsonio import dumps, format_table
from klsym.simulate.montecarlo import DEFAULT_BATCH, DEFAULT_CHUNK, DEFAULT_QUANTILES, DTYPES, crosscheck, gradient, run
from klsym.cli.exact import add_pair_arguments, estimators_from_args, pair_from_args
from klsym.cli.offpolicy import add_behaviour_arguments, behaviour_from_args, run_mc


def _count(text: str) -> int:
    """A positive integer, also written as ``1e9``."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (value >= 1 and value == int(value)):
        raise argparse.ArgumentTypeError(f"expected a positive integer (e.g. 1000000 or 1e6), got {text!r}")
    return int(value)


def _levels(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated quantile levels, got {text!r}") from None


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "mc", help="streaming Monte Carlo: estimator statistics (and gradients) from n samples of q",
        description="Draw n samples x ~ q in fixed RNG blocks and report, per estimator, the mean, std, "
                    "standard error, min, max, fraction negative, approximate quantiles and the spread of "
                    "batch means; optionally gradients (loss/reward/full) and z-scores against the exact layer.")
    add_pair_arguments(parser)
    add_behaviour_arguments(parser)
    parser.add_argument("--n", type=_count, default=1_000_000, help="number of samples (e.g. 1e8)")
    parser.add_argument("--seed", type=int, default=0, help="seed; results depend only on (seed, n)")
    parser.add_argument("--chunk", type=_count, default=DEFAULT_CHUNK,
                        help="samples per worker task, rounded to RNG blocks (speed/memory only)")
    parser.add_argument("--threads", type=_count, default=None, help="worker threads (default: all cores)")
    parser.add_argument("--backend", choices=("numpy", "cupy"), default=None,
                        help="array backend (default: $KLSYM_BACKEND or numpy)")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="float64",
                        help="precision of samples, log-ratios and estimator values")
    parser.add_argument("--quantiles", type=_levels, default=DEFAULT_QUANTILES,
                        help="comma-separated quantile levels (approximate, see klsym.simulate.montecarlo)")
    parser.add_argument("--batch-size", type=_count, default=DEFAULT_BATCH,
                        help="batch size B for the spread of batch means (one RL step)")
    parser.add_argument("--gradient", metavar="MODES", default=None,
                        help="also estimate gradients wrt q's parameters, modes from loss,reward,full")
    parser.add_argument("--crosscheck", action="store_true",
                        help="add z-scores of the MC means (and gradients) against the exact layer")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(func=run_command)


def run_command(args) -> int:
    if args.positions != 1:
        raise UserError("mc samples single positions only: --positions must be 1")
    q, p = pair_from_args(args)
    estimators = estimators_from_args(args)
    behaviour = behaviour_from_args(args, q)
    if behaviour is not None:
        return run_mc(args, q, p, behaviour, estimators)
    options = {"chunk": args.chunk, "backend": args.backend, "dtype": args.dtype, "threads": args.threads,
               "progress": not args.quiet}
    result = run(q, p, estimators, args.n, args.seed, quantiles=args.quantiles, batch_size=args.batch_size,
                 **options)
    if args.gradient:
        result["gradients"] = gradient(q, p, estimators, args.n, args.seed, modes=args.gradient,
                                       **options)["gradients"]
    if args.crosscheck:
        result["crosscheck"] = crosscheck(q, p, estimators, args.n, args.seed,
                                          modes=args.gradient or (), **options)
    if args.format == "json":
        print(dumps(result))
        return 0
    print(f"n {result['n']}  seed {result['seed']}  backend {result['backend']}  dtype {result['dtype']}  "
          f"{result['seconds']:.3f} s")
    rows = []
    for name, entry in result["estimators"].items():
        row = {"estimator": name, "target": entry["target"]}
        row.update({key: entry[key] for key in ("mean", "std", "se", "min", "max", "frac_negative")})
        row.update({f"q{level}": value for level, value in entry["quantiles"].items()})
        if entry["batch"]:
            row[f"std(mean of {entry['batch']['size']})"] = entry["batch"]["mean_std"]
        if args.crosscheck:
            row["z(mean)"] = result["crosscheck"]["estimators"][name]["mean"]["z"]
        rows.append(row)
    print(format_table(rows))
    for name, modes in result.get("gradients", {}).items():
        for mode, grad in modes.items():
            mean = grad["mean"]
            shown = ", ".join(f"{v:.6g}" for v in mean[:4]) + (", ..." if mean.size > 4 else "")
            print(f"gradient {name} {mode}: [{shown}]")
    if args.crosscheck:
        check = result["crosscheck"]
        print(f"crosscheck: max |z| = {check['max_abs_z']:.3g} ({'passed' if check['passed'] else 'FAILED'})")
    return 0
