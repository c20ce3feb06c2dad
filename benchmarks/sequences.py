"""Exact sequence-level analysis at benchmark size: V = 16 tokens, T = 5 positions (16^5 = 1,048,576 sequences).

Times :func:`klsym.rl.sequences.sequence_summary` for k1, k2, k3 in every placement (sequence KLs, true and partial
gradients, 3 estimators x 9 placements with follows-labels; 1,118,480 logits) on an LLM-shaped pair (p Zipf-like
per prefix, q = p with N(0, 0.3^2) noise). Target (issue 12): well under a minute on a 2-core machine. Prints one
JSON line last (for ``benchmarks/run.py``).

Usage: .venv/bin/python benchmarks/sequences.py [--vocab 16] [--horizon 5] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from klsym.exact.autoregressive import Autoregressive  # noqa: E402
from klsym.rl.sequences import sequence_summary  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=16)
    parser.add_argument("--horizon", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    p = Autoregressive.zipf(args.vocab, args.horizon, seed=0)
    q = p.perturbed(0.3, seed=1)
    sequence_summary(Autoregressive.random(2, 2), Autoregressive.random(2, 2, 1), "k1,k2,k3")  # warm-up: lambdify
    timings = []
    for _ in range(args.repeats):
        started = time.perf_counter()
        summary = sequence_summary(q, p, "k1,k2,k3")
        timings.append(time.perf_counter() - started)
    labels = {
        name: {placement: entry["follows"] for placement, entry in by.items()}
        for name, by in summary["estimators"].items()
    }
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        f"exact sequence analysis, V = {args.vocab}, T = {args.horizon}: {summary['sequences']:,} sequences, "
        f"{summary['parameters']:,} logits, k1..k3 x 9 placements, {os.cpu_count()} cores"
    )
    print(
        f"seconds: best {min(timings):.2f}, all {[round(t, 2) for t in timings]} (target: well under 60 s); "
        f"peak RSS {peak:.0f} MiB"
    )
    print(
        json.dumps(
            {
                "sequences": summary["sequences"],
                "seconds": min(timings),
                "timings": timings,
                "peak_rss_mib": peak,
                "follows": labels,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
