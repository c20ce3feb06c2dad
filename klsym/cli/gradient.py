"""``klsym gradient``: true KL gradients and expected estimator gradients in loss, reward, full modes.

    python -m klsym gradient --q 0,1 --p 1,1.1 --estimators k1,k2,k3 --format json

For a categorical pair (``--q-logits/--p-logits``) gradients are per-logit arrays in JSON; the table
shows their Euclidean norms and first entries.
"""

from __future__ import annotations

import numpy as np

from klsym.cli.exact import add_pair_arguments, pair_from_args, print_pair_header, summarise
from klsym.cli.offpolicy import add_behaviour_arguments, behaviour_from_args, run_gradient
from klsym.exact.expectations import MODES, gradient_summary
from klsym.jsonio import dumps, format_table

_FIRST = 3  # entries of a per-logit gradient shown in the table


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "gradient",
        help="expected estimator gradients (loss, reward, full) vs true KL gradients",
        description="Gradients wrt the sampler q's parameters (mu, sigma or logits), samples held fixed.",
    )
    add_pair_arguments(parser)
    add_behaviour_arguments(parser)
    parser.set_defaults(func=run)


def run(args) -> int:
    q, p = pair_from_args(args)
    behaviour = behaviour_from_args(args, q)
    if behaviour is not None:
        return run_gradient(args, q, p, behaviour)
    summary = summarise(args, gradient_summary, q, p, "computing the expected gradients of")
    if args.format == "json":
        print(dumps(summary))
        return 0
    print_pair_header(summary)
    rows = [dict(estimator="true", mode=label, **_cells(grad)) for label, grad in summary["true"].items()]
    for name, entry in summary["estimators"].items():
        rows += [dict(estimator=name, mode=mode, **_cells(entry[mode])) for mode in MODES]
    print(format_table(rows))
    return 0


def _cells(gradient) -> dict:
    if isinstance(gradient, dict) and "logits" not in gradient:
        return gradient
    vector = np.asarray(gradient["logits"] if isinstance(gradient, dict) else gradient, dtype=float)
    cells = {"norm": float(np.linalg.norm(vector))}
    cells.update({f"[{i}]": float(v) for i, v in enumerate(vector[:_FIRST])})
    return cells
