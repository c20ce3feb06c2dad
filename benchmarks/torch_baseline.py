"""Baseline: the seed-000 PyTorch experiment (Schulman's setting), timed.

q = N(0, 1) (the sampler), p = N(1, 1) (the reference); n samples x ~ q; for k1..k4 the mean, std,
min and max, computed the way the seed's script does (torch.distributions, whole arrays in memory,
k4 from the densities). Runs in its own venv (.venv-bench, torch==2.13.0 CPU wheel); prints one
JSON line with the timing and this process's peak RSS.

Usage: .venv-bench/bin/python benchmarks/torch_baseline.py N SEED [float32|float64]
"""

import json
import resource
import sys
import time

import torch
import torch.distributions as dis


def experiment(n: int, seed: int, dtype: torch.dtype) -> dict:
    torch.manual_seed(seed)
    q = dis.Normal(torch.tensor(0.0, dtype=dtype), torch.tensor(1.0, dtype=dtype))
    p = dis.Normal(torch.tensor(1.0, dtype=dtype), torch.tensor(1.0, dtype=dtype))
    x = q.sample((n,))
    log_q = q.log_prob(x)
    logr = p.log_prob(x) - log_q
    px, qx = p.log_prob(x).exp(), log_q.exp()
    estimators = {
        "k1": -logr,
        "k2": logr**2 / 2,
        "k3": (logr.exp() - 1) - logr,
        "k4": (px**2 - 2 * px * qx + 2 * qx**2).log() - 2 * log_q,
    }
    return {
        name: {"mean": k.mean().item(), "std": k.std().item(), "min": k.min().item(), "max": k.max().item()}
        for name, k in estimators.items()
    }


def main() -> None:
    n, seed = int(float(sys.argv[1])), int(sys.argv[2])
    dtype = getattr(torch, sys.argv[3] if len(sys.argv) > 3 else "float32")
    experiment(1000, seed, dtype)  # warm-up: first-call dispatch costs are not the experiment
    started, cpu = time.perf_counter(), time.process_time()
    estimators = experiment(n, seed, dtype)
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        json.dumps(
            {
                "n": n,
                "seed": seed,
                "dtype": str(dtype).removeprefix("torch."),
                "threads": torch.get_num_threads(),
                "cpu_seconds": cpu,
                "seconds": seconds,
                "peak_rss_mib": peak_mib,
                "estimators": estimators,
            }
        )
    )


if __name__ == "__main__":
    main()
