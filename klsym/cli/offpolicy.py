"""``--behaviour`` options of ``exact``, ``gradient`` and ``mc``, and ``klsym offpolicy``: KL terms on tokens
drawn from a behaviour policy b, under every weighting (:mod:`klsym.rl.offpolicy`).

    python -m klsym gradient --q 0,1 --p 1,1 --behaviour 0.3,1 --weighting none,token-is --format json
    python -m klsym exact --q-logits q.txt --p-logits p.txt --behaviour-logits b.txt
    python -m klsym mc --q 0,1 --p 1,1 --behaviour 0.3,1 --n 1e6
    python -m klsym offpolicy --q 0,1 --p 1,1 --behaviour 0.3,1      # exact vs MC, |z| per row
"""

from __future__ import annotations

import numpy as np

from klsym.cli import UserError, parse_pair
from klsym.jsonio import dumps, format_table


def add_behaviour_arguments(parser) -> None:
    """``--behaviour MU,SIGMA`` / ``--behaviour-logits FILE``, ``--weighting``, ``--truncation``, ``--clip``."""
    from klsym.rl.weightings import DEFAULT_CLIP, DEFAULT_TRUNCATION, WEIGHTINGS

    parser.add_argument(
        "--behaviour",
        metavar="MU,SIGMA",
        help="behaviour policy b = N(MU, SIGMA^2) that drew the samples (gradient still for q)",
    )
    parser.add_argument("--behaviour-logits", metavar="FILE", help="categorical behaviour policy: logits")
    parser.add_argument(
        "--weighting",
        default=",".join(WEIGHTINGS),
        help=f"comma-separated weightings from {', '.join(WEIGHTINGS)} (with --behaviour)",
    )
    parser.add_argument("--truncation", type=float, default=DEFAULT_TRUNCATION, help="c of truncated-is: min(q/b, c)")
    parser.add_argument("--clip", type=float, default=DEFAULT_CLIP, help="epsilon of ppo-clip")


def behaviour_from_args(args, q):
    """The behaviour policy, or None when neither option is given; one clear error otherwise."""
    from klsym.exact.families import Categorical, Gaussian

    if args.behaviour is None and args.behaviour_logits is None:
        return None
    if args.behaviour is not None and args.behaviour_logits is not None:
        raise UserError("give either --behaviour or --behaviour-logits, not both")
    if getattr(args, "positions", 1) != 1:
        raise UserError(
            "--behaviour covers single positions: --positions must be 1 (use `klsym sequence` for sequences)"
        )
    if args.behaviour is not None:
        if not isinstance(q, Gaussian):
            raise UserError("--behaviour MU,SIGMA needs a Gaussian pair (--q/--p); use --behaviour-logits")
        return Gaussian(*parse_pair(args.behaviour))
    if not isinstance(q, Categorical):
        raise UserError("--behaviour-logits needs a categorical pair (--q-logits/--p-logits)")
    return Categorical.from_file(args.behaviour_logits)


def weightings_from_args(args) -> tuple[str, ...]:
    from klsym.rl.weightings import WEIGHTINGS

    chosen = tuple(w.strip() for w in args.weighting.split(",") if w.strip())
    unknown = [w for w in chosen if w not in WEIGHTINGS]
    if unknown or not chosen:
        raise UserError(
            f"unknown weighting {unknown[0] if unknown else args.weighting!r}; choose from {', '.join(WEIGHTINGS)}"
        )
    return chosen


def _short(vector) -> str:
    vector = np.asarray(vector, dtype=float)
    return "[" + ", ".join(f"{v:.6g}" for v in vector[:3]) + (", ...]" if vector.size > 3 else "]")


def _header(summary: dict) -> None:
    print(
        f"family {summary['family']}  drift KL(b||q) = {summary['drift KL(b||q)']:.6g}   "
        f"KL(q||p) = {summary['kl']['KL(q||p)']:.6g}"
    )


def run_gradient(args, q, p, b, estimators=None) -> int:
    """``klsym gradient --behaviour``: exact expected gradients under b for every weighting."""
    from klsym.cli.exact import estimators_from_args
    from klsym.rl.offpolicy import offpolicy_summary

    estimators = estimators_from_args(args) if estimators is None else estimators
    summary = offpolicy_summary(q, p, b, estimators, weightings_from_args(args), args.truncation, args.clip)
    if args.format == "json":
        print(dumps(summary))
        return 0
    _header(summary)
    columns = [
        "estimator",
        "mode",
        "weighting",
        "gradient",
        "on-policy",
        "rel. bias vs on-policy",
        "rel. error vs grad KL(q||p)",
        "variance finite",
    ]
    rows = [
        {
            "estimator": r["estimator"],
            "mode": r["mode"],
            "weighting": r["weighting"],
            "gradient": _short(r["gradient"]),
            "on-policy": _short(r["on-policy gradient"]),
            "rel. bias vs on-policy": r["relative gradient bias vs on-policy"],
            "rel. error vs grad KL(q||p)": r["relative error vs grad KL(q||p)"],
            "variance finite": r["variance finite"],
        }
        for r in summary["rows"]
    ]
    print(format_table(rows, columns))
    return 0


def run_exact(args, q, p, b, estimators) -> int:
    """``klsym exact --behaviour``: the weighted value E_b[weight * k] and its bias vs KL(q||p)."""
    from klsym.rl.offpolicy import drift, value_rows

    weightings = tuple(w for w in weightings_from_args(args) if w in ("none", "token-is", "truncated-is"))
    rows = value_rows(q, p, b, estimators, weightings or ("none",), args.truncation)
    if args.format == "json":
        print(dumps({"family": q.name, "drift KL(b||q)": drift(q, b), "rows": rows}))
        return 0
    print(f"family {q.name}  drift KL(b||q) = {drift(q, b):.6g}")
    print(format_table(rows))
    return 0


def run_mc(args, q, p, b, estimators) -> int:
    """``klsym mc --behaviour``: Monte Carlo from b against the exact layer, |z| per row."""
    from klsym.rl.offpolicy import MODES, mc_check_table

    modes = tuple(m.strip() for m in (args.gradient or ",".join(MODES)).split(",") if m.strip())
    table = mc_check_table(
        q, p, b, estimators, modes, weightings_from_args(args), args.n, args.seed, args.truncation, args.clip
    )
    rows = table.to_dict("records")
    print(dumps(rows) if args.format == "json" else format_table(rows))
    return 0


def add_sequence_behaviour_arguments(parser) -> None:
    """``--behaviour-model B.npy --weighting W`` for ``klsym sequence``."""
    from klsym.rl.weightings import SEQUENCE_WEIGHTINGS

    parser.add_argument(
        "--behaviour-model",
        metavar="B.npy",
        help="behaviour policy b that drew the sequences: (P, V) logits of every prefix",
    )
    parser.add_argument(
        "--weighting",
        default=",".join(SEQUENCE_WEIGHTINGS),
        help=f"with --behaviour-model: comma-separated from {', '.join(SEQUENCE_WEIGHTINGS)}",
    )


def run_sequence(args, q, p) -> int:
    """``klsym sequence --behaviour-model``: exact (enumeration under b) per estimator x placement x weighting,
    follows labels, variance per sequence, MC from b with ``--mc N``, and the recommended unbiased option."""
    from klsym.cli.exact import estimators_from_args
    from klsym.exact.autoregressive import Autoregressive
    from klsym.rl.offpolicy import SEQUENCE_PLACEMENTS, SEQUENCE_WEIGHTINGS, recommend, sequence_offpolicy_table

    b = Autoregressive.from_file(args.behaviour_model)
    weightings = tuple(w.strip() for w in args.weighting.split(",") if w.strip())
    unknown = [w for w in weightings if w not in SEQUENCE_WEIGHTINGS]
    if unknown or not weightings:
        raise UserError(
            f"unknown weighting {unknown[0] if unknown else args.weighting!r}; "
            f"choose from {', '.join(SEQUENCE_WEIGHTINGS)}"
        )
    asked = [name.strip() for name in args.placements.split(",") if name.strip()]
    placements = tuple(name for name in asked if name in SEQUENCE_PLACEMENTS)
    if not placements:
        raise UserError(f"off-policy weightings cover the placements {', '.join(SEQUENCE_PLACEMENTS)}")
    table = sequence_offpolicy_table(q, p, b, estimators_from_args(args), placements, weightings, args.mc, args.seed)
    best = recommend(table)
    if args.format == "json":
        print(dumps({"rows": table.to_dict("records"), "recommended": best}))
        return 0
    print(format_table(table.to_dict("records")))
    if best:
        print(
            f"recommended (unbiased for grad KL(q||p), least variance): {best['estimator']} {best['placement']} "
            f"{best['weighting']} (variance per sequence {best['variance (per sequence)']:.6g})"
        )
    return 0


def register(subparsers) -> None:
    from klsym.cli.exact import add_pair_arguments

    parser = subparsers.add_parser(
        "offpolicy",
        help="KL terms on tokens from a behaviour policy b: exact vs Monte Carlo per weighting",
        description="Samples x ~ b, gradient for q: every estimator, mode and weighting (none, token-is, "
        "token-is-differentiable, truncated-is, ppo-clip), exact (sums / quadrature) vs Monte Carlo.",
    )
    add_pair_arguments(parser)
    add_behaviour_arguments(parser)
    parser.add_argument("--n", type=int, default=200_000, help="Monte Carlo samples from b")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--gradient", metavar="MODES", default=None, help="modes (default loss,reward,full)")
    parser.set_defaults(func=run)


def run(args) -> int:
    from klsym.cli.exact import estimators_from_args, pair_from_args

    q, p = pair_from_args(args)
    b = behaviour_from_args(args, q)
    if b is None:
        raise UserError("give --behaviour MU,SIGMA or --behaviour-logits FILE")
    return run_mc(args, q, p, b, estimators_from_args(args))


__all__ = [
    "add_behaviour_arguments",
    "behaviour_from_args",
    "weightings_from_args",
    "run_gradient",
    "run_exact",
    "run_mc",
    "add_sequence_behaviour_arguments",
    "run_sequence",
]
