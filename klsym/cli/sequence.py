"""``klsym sequence``: exact sequence-level gradients of per-token KL terms, per estimator and placement.

Two tabular autoregressive policies (``.npy`` arrays of shape (P, V), see :mod:`klsym.exact.autoregressive`)::

    python -m klsym sequence --q-model q.npy --p-model p.npy --estimators k1,k2,k3 --format json

or a random pair: ``--random V,T,SEED`` makes p with N(0, 1) logits (``np.random.default_rng(SEED)``) and q = p
plus N(0, DISTANCE^2) noise on every logit (seed SEED + 1; ``--distance``, default 0.5). ``--eos TOKEN`` makes
lengths variable (a sequence stops at its first TOKEN). ``--mc N --seed S``
adds a Monte Carlo cross-check (``mc`` block: per-placement gradients, standard errors, max |z|).

JSON keys: ``kl`` {"KL(q||p)", "KL(p||q)"}; ``true_gradient`` and ``partial_gradient`` (same two keys, flat lists in
the row-major order of the logits); ``estimators`` -> name -> placement -> {``gradient``, ``follows``,
``relative_error``, ``cosine``} (against grad KL(q||p) of the sequences); also ``V``, ``T``, ``sequences``,
``parameters``, ``per_position`` and ``missing_future_term``. ``follows`` is a reference label, ``zero``,
``indistinguishable (...)`` (very close to q = p, where the references it equals cannot be told apart) or null.

``--behaviour-model B.npy`` (fixed horizon only) analyses sequences drawn from b under each ``--weighting``; the
whole-sequence-ratio placements have no weighting and are refused by name.
"""

from __future__ import annotations

import argparse
import math

import numpy as np

from klsym.cli import UserError, add_format_argument
from klsym.cli.exact import estimators_from_args
from klsym.cli.offpolicy import add_sequence_behaviour_arguments, run_sequence
from klsym.exact.autoregressive import Autoregressive
from klsym.jsonio import dumps, format_table
from klsym.rl.sequences import ALL_PLACEMENTS, KL_PQ, KL_QP, sequence_summary


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "sequence",
        help="exact sequence-level gradients of per-token KL terms in every placement",
        description="Autoregressive q and p (tabular logits of every prefix): sequence KLs, true and partial "
        "gradients, and per estimator and placement (loss, reward, reward-to-go, sequence-reward, "
        "full, loss+reward, sequence-ratio-*) the exact expected gradient and what it follows.",
    )
    parser.add_argument("--q-model", metavar="Q.npy", help="sampler q: (P, V) logits of every prefix")
    parser.add_argument("--p-model", metavar="P.npy", help="reference p: (P, V) logits of every prefix")
    parser.add_argument("--random", metavar="V,T,SEED", help="a random pair instead of model files")
    parser.add_argument(
        "--eos",
        type=int,
        default=None,
        metavar="TOKEN",
        help="end-of-sequence token: sequences stop at their first TOKEN (default: fixed length T)",
    )
    parser.add_argument(
        "--distance",
        type=float,
        default=0.5,
        help="with --random: std of the noise added to p's logits to make q (default 0.5)",
    )
    parser.add_argument("--estimators", default="k1,k2,k3", help="comma-separated estimator names (default k1,k2,k3)")
    parser.add_argument(
        "--expr",
        action="append",
        default=[],
        metavar="FORMULA",
        help="a custom estimator as a formula in r (repeatable)",
    )
    parser.add_argument(
        "--placements", default=",".join(ALL_PLACEMENTS), help="comma-separated placements (default: all)"
    )
    parser.add_argument("--mc", default=None, metavar="N", help="also run N Monte Carlo sequences (e.g. 100000 or 1e5)")
    parser.add_argument("--seed", type=int, default=0, metavar="S", help="Monte Carlo seed (default 0)")
    add_format_argument(parser)
    add_sequence_behaviour_arguments(parser)
    parser.set_defaults(func=run)


def _check_options(args) -> None:
    """Check the options (one clear line, not argparse's usage block) and parse ``--mc`` as ``klsym mc --n``."""
    if args.mc is not None:
        from klsym.cli.mc import _count  # the Monte Carlo CLI's own parser of N, imported only when asked

        try:
            args.mc = _count(args.mc)
        except argparse.ArgumentTypeError as err:
            raise UserError(f"--mc: {err}") from None
    if not (math.isfinite(args.distance) and args.distance >= 0):
        raise UserError(f"--distance must be a finite number >= 0, got {args.distance!r}")
    if args.behaviour_model is None:
        from klsym.rl.offpolicy import SEQUENCE_WEIGHTINGS

        if args.weighting != ",".join(SEQUENCE_WEIGHTINGS):
            raise UserError("--weighting needs --behaviour-model B.npy (the policy that drew the sequences)")


def pair_from_args(args):
    """(q, p) from ``--q-model/--p-model`` or ``--random V,T,SEED``, with one clear error otherwise."""
    files = args.q_model is not None or args.p_model is not None
    if files == (args.random is not None):
        raise UserError("give either --random V,T,SEED or both --q-model and --p-model")
    if files:
        if args.q_model is None or args.p_model is None:
            raise UserError("both --q-model and --p-model are required")
        q, p = Autoregressive.from_file(args.q_model, args.eos), Autoregressive.from_file(args.p_model, args.eos)
        q.check_pair(p)
        return q, p
    try:
        vocab, horizon, seed = (int(part) for part in args.random.split(","))
    except ValueError:
        raise UserError(
            f"expected --random V,T,SEED as three integers separated by commas, got {args.random!r}"
        ) from None
    if seed < 0:
        raise UserError(f"the seed of --random must be non-negative, got {seed}")
    p = Autoregressive.random(vocab, horizon, seed).with_eos(args.eos)
    return p.perturbed(args.distance, seed + 1), p


def _check_behaviour_options(args) -> None:
    """With ``--behaviour-model``: fixed horizon only, and every asked placement must have a weighting."""
    from klsym.rl.offpolicy import SEQUENCE_PLACEMENTS

    if args.eos is not None:
        raise UserError("off-policy sequences: fixed horizon only (--eos cannot be used with --behaviour-model)")
    asked = [name.strip() for name in args.placements.split(",") if name.strip()]
    if args.placements == ",".join(ALL_PLACEMENTS):  # the default: every placement that has a weighting
        args.placements = ",".join(SEQUENCE_PLACEMENTS)
    elif not asked or any(name not in SEQUENCE_PLACEMENTS for name in asked):
        unsupported = [name for name in asked if name not in SEQUENCE_PLACEMENTS] or [args.placements]
        raise UserError(
            f"--behaviour-model: no off-policy weighting for the placement(s) {', '.join(unsupported)}; "
            f"weightings cover {', '.join(SEQUENCE_PLACEMENTS)}"
        )


def run(args) -> int:
    _check_options(args)
    if args.behaviour_model is not None:
        _check_behaviour_options(args)
    q, p = pair_from_args(args)
    if args.behaviour_model is not None:
        return run_sequence(args, q, p)
    summary = sequence_summary(q, p, estimators_from_args(args), args.placements, mc=args.mc, seed=args.seed)
    if args.format == "json":
        print(dumps(summary))
        return 0
    print(
        f"V {summary['V']}  T {summary['T']}  eos {summary['eos']}  sequences enumerated {summary['sequences']:,}  "
        f"parameters {summary['parameters']:,}"
    )
    print(
        f"{KL_QP} = {summary['kl'][KL_QP]:.10g}   {KL_PQ} = {summary['kl'][KL_PQ]:.10g}   "
        f"missing future term |grad - partial| / |grad KL(q||p)| = {summary['missing_future_term']:.6g}"
    )
    mc = summary.get("mc")
    rows = []
    for name, by_placement in summary["estimators"].items():
        for placement, entry in by_placement.items():
            row = {
                "estimator": name,
                "placement": placement,
                "follows": entry["follows"],
                "rel. error vs grad KL(q||p)": entry["relative_error"],
                "cosine": entry["cosine"],
                "|gradient|": float(np.linalg.norm(entry["gradient"])),
            }
            if mc:
                row["MC max |z|"] = mc["estimators"][name][placement]["max_abs_z"]
            rows.append(row)
    print(format_table(rows))
    if mc:
        print(
            f"Monte Carlo: n {mc['n']:,}, seed {mc['seed']}, {mc['checked']} coordinates checked, max |z| "
            f"{mc['max_abs_z']:.3g} ({'passed' if mc['passed'] else 'FAILED'} |z| < {mc['z_limit']:g})"
        )
    return 0
