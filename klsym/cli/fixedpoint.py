"""``klsym fixedpoint``: where KL-regularised policy-gradient training ends up, per estimator and mode.

    python -m klsym fixedpoint --p-logits p.txt --reward R.txt --beta 0.5 --estimators k1,k2,k3 --format json
    python -m klsym fixedpoint --p-logits=-0.7,-1.2,-1.6 --reward 0,0.5,1 --beta 0.5 --setting verl:kl_loss

``--p-logits`` and ``--reward`` take a ``.npy`` file (one-dimensional), a text file of numbers separated by
whitespace or commas, or the numbers themselves (``0,0.5,1``). ``--setting FRAMEWORK[:SETTING]`` analyses that
framework setting (its estimator, mode and clamps) instead of ``--estimators``/``--modes``.

JSON: ``optimum`` {``probs``, ``KL(q||p)``, ``reward``} of q* = p e^{R/beta}/Z, and ``estimators`` ->
name -> mode -> {``probs``, ``KL(q||p)``, ``KL(p||q)``, ``reward``, ``distance_to_optimum`` (KL(end||q*)),
``status``, ``stable``, ``eigenvalues``, ``equals_optimum``, ``follows``, ``method``}. ``status``: ``interior``
(a fixed point with every token alive); ``boundary`` (some lower-reward tokens die out and the others settle at a
fixed point on that face: ``probs`` is it, with zeros); ``collapse`` (all mass flows to the reward maximisers:
``probs`` is the limit point); ``diverges`` (the dynamics run to the boundary elsewhere, or do not settle).
``eigenvalues``: of the expected dynamics' Jacobian on the face where the point lives (the tokens with q > 0;
none for a vertex), ``stable`` when all have negative real part; null and false for ``diverges``. The reward
spread over beta may be at most 500 (else one error: q* would underflow). The table has one row per
estimator x mode, q* first, with KL(q||p), KL(p||q) and KL(end||q*) (``distance_to_optimum``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from klsym.cli import UserError, add_format_argument
from klsym.derive.estimators import BUILTINS, get_estimators
from klsym.exact.expectations import MODES
from klsym.jsonio import dumps, format_table
from klsym.rl.fixedpoint import FixedPointProblem, fixed_point, fixed_point_summary, summary_rows


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "fixedpoint",
        help="where KL-regularised training ends up (fixed point per estimator and mode)",
        description="Fixed point of the expected policy-gradient update E_q[R grad log q] - beta (KL-term "
        "gradient) for a categorical softmax policy, against q* = p exp(R/beta)/Z. Status: interior "
        "(every token alive); boundary (lower-reward tokens die out, the others settle at a fixed "
        "point of that face); collapse (mass flows to the reward maximisers); diverges (the "
        "dynamics run to the boundary elsewhere). Eigenvalues and stable: the Jacobian on the face "
        "where the point lives.",
    )
    parser.add_argument(
        "--p-logits",
        required=True,
        metavar="FILE|LIST",
        help="reference logits: .npy, a text file, or numbers such as -0.7,-1.2,-1.6",
    )
    parser.add_argument("--reward", required=True, metavar="FILE|LIST", help="reward per token (same forms)")
    parser.add_argument("--beta", required=True, type=float, help="KL coefficient beta > 0")
    parser.add_argument(
        "--estimators", default=",".join(BUILTINS), help="comma-separated estimator names (default: all built-ins)"
    )
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated modes: loss,reward,full")
    parser.add_argument(
        "--setting", metavar="FRAMEWORK[:SETTING]", help="analyse a framework setting (estimator, mode, clamps) instead"
    )
    add_format_argument(parser)
    parser.set_defaults(func=run)


def read_vector(text: str, what: str) -> np.ndarray:
    """Numbers from a ``.npy`` file, a text file (whitespace or commas), or the text itself."""
    path = Path(text)
    if path.suffix == ".npy" or path.is_file():
        if not path.is_file():
            raise UserError(f"{what} file not found: {text}")
        try:
            data = np.load(path, allow_pickle=False) if path.suffix == ".npy" else _numbers(path.read_text())
        except (ValueError, TypeError) as err:
            raise UserError(f"cannot read {what} from {text}: {err}") from None
        data = np.asarray(data, dtype=np.float64)
        if data.ndim > 1:
            raise UserError(
                f"{what}: {text} holds an array of shape {data.shape}; give a one-dimensional vector "
                "(one number per token)"
            )
        return np.ravel(data)
    try:
        return _numbers(text)
    except ValueError:
        raise UserError(f"{what}: {text!r} is neither a file nor a list of numbers") from None


def _numbers(text: str) -> np.ndarray:
    parts = text.replace(",", " ").split()
    if not parts:
        raise ValueError("no numbers")
    return np.array([float(part) for part in parts])


def _modes(text: str) -> list[str]:
    modes = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes:
        raise UserError(f"unknown mode(s) {unknown or text!r}; modes: {', '.join(MODES)}")
    return modes


def run(args) -> int:
    problem = FixedPointProblem(
        read_vector(args.p_logits, "--p-logits"), read_vector(args.reward, "--reward"), args.beta
    )
    if args.setting:
        from klsym.rl.frameworks import expression_term, get_setting

        framework, _, name = args.setting.partition(":")
        setting = get_setting(framework, name or None)
        summary = fixed_point_summary(problem, [], [])
        summary["setting"] = setting.key
        # the setting's own per-token expression: clamps and weights act where the framework puts them
        summary["estimators"][setting.get_estimator().name] = {
            setting.mode: fixed_point(problem, expression_term(setting), setting.mode)
        }
    else:
        summary = fixed_point_summary(problem, get_estimators(args.estimators), _modes(args.modes))
    if args.format == "json":
        print(dumps(summary))
        return 0
    print(
        f"p = {np.round(problem.p, 6).tolist()}, R = {problem.reward.tolist()}, beta = {problem.beta:g}"
        + (f", setting {summary['setting']}" if args.setting else "")
    )
    print(format_table(summary_rows(summary)))
    return 0
