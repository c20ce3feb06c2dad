"""Names and defaults of the off-policy weightings (no heavy imports: the CLI reads them to build its options).

The computations live in :mod:`klsym.rl.offpolicy`, which imports these names from here.
"""

from __future__ import annotations

#: Per-token weightings of a KL term on tokens drawn from a behaviour policy b.
WEIGHTINGS = ("none", "token-is", "token-is-differentiable", "truncated-is", "ppo-clip")
#: Weightings whose expected gradient is the on-policy one for every estimator and mode (b > 0 where q > 0).
UNBIASED_WEIGHTINGS = ("token-is",)
#: c of truncated-is: min(q/b, c).
DEFAULT_TRUNCATION = 2.0
#: epsilon of ppo-clip.
DEFAULT_CLIP = 0.2
#: Weightings and placements of ``klsym sequence --behaviour-model``.
SEQUENCE_WEIGHTINGS = (
    "none",
    "token-is",
    "token-is-differentiable",
    "sequence-is",
    "sequence-mean-is-differentiable",
    "per-decision",
)
SEQUENCE_PLACEMENTS = ("loss", "reward", "reward-to-go", "sequence-reward", "full", "loss+reward")

__all__ = [
    "WEIGHTINGS",
    "UNBIASED_WEIGHTINGS",
    "DEFAULT_TRUNCATION",
    "DEFAULT_CLIP",
    "SEQUENCE_WEIGHTINGS",
    "SEQUENCE_PLACEMENTS",
]
