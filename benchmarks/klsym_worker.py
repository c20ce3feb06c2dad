"""One benchmark measurement of klsym in a fresh process; prints one JSON line.

Usage: .venv/bin/python benchmarks/klsym_worker.py values N SEED
       .venv/bin/python benchmarks/klsym_worker.py defaults N SEED
       .venv/bin/python benchmarks/klsym_worker.py trials N TRIALS SEED

``values``: Schulman's setting q = N(0, 1), p = N(1, 1), k1..k4 in float64, mean/std/min/max
(quantile histogram and batch statistics off: the baseline computes neither).
``defaults``: the same with ``klsym mc``'s default statistics on (quantiles 1/5/50/95/99 %, spread of
batch means of 1024), as a user running ``python -m klsym mc ... --estimators k1,k2,k3,k4`` gets them.
``trials``: Yang's gradient experiment, q = N(0, 1), p = N(1, 1.1), k1 k2 k3 rev_k1 rev_k2, modes
loss/reward/full, one gradient estimate per trial.
"""

import json
import resource
import sys
import time

from klsym.exact.families import Gaussian
from klsym.simulate.montecarlo import gradient_trials, run


def main() -> None:
    kind = sys.argv[1]
    import_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if kind in ("values", "defaults"):
        n, seed = int(float(sys.argv[2])), int(sys.argv[3])
        q, p = Gaussian(0.0, 1.0), Gaussian(1.0, 1.0)
        options = {"quantiles": (), "batch_size": None} if kind == "values" else {}  # else run()'s defaults
        run(q, p, "k1,k2,k3,k4", n=1000, seed=seed, **options)  # warm-up (lambdify)
        started, cpu = time.perf_counter(), time.process_time()
        result = run(q, p, "k1,k2,k3,k4", n=n, seed=seed, **options)
        seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
        summary = {
            name: {key: e[key] for key in ("mean", "std", "min", "max")} for name, e in result["estimators"].items()
        }
    else:
        n, trials, seed = int(float(sys.argv[2])), int(sys.argv[3]), int(sys.argv[4])
        q, p = Gaussian(0.0, 1.0), Gaussian(1.0, 1.1)
        estimators = "k1,k2,k3,rev_k1,rev_k2"
        gradient_trials(q, p, estimators, n=100, trials=2, seed=seed)  # warm-up (lambdify)
        started, cpu = time.perf_counter(), time.process_time()
        result = gradient_trials(q, p, estimators, n=n, trials=trials, seed=seed)
        seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
        summary = {
            name: {mode: per_trial.mean(axis=0).tolist() for mode, per_trial in modes.items()}
            for name, modes in result["gradients"].items()
        }
    print(
        json.dumps(
            {
                "kind": kind,
                "n": n,
                "seconds": seconds,
                "cpu_seconds": cpu,
                "import_rss_mib": import_mib,
                "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "summary": summary,
            }
        )
    )


if __name__ == "__main__":
    main()
