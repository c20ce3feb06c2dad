"""``make bench``: klsym's streaming engine against a PyTorch baseline, measured in the same run.

Baseline: the seed-000 experiment in PyTorch (benchmarks/torch_baseline.py) in Schulman's setting
q = N(0, 1), p = N(1, 1), 10M samples, k1..k4 mean/std/min/max; it runs in its own venv
``.venv-bench`` (created here with the pinned CPU wheel ``torch==2.13.0``). klsym: same n, k1..k4,
float64. Every measurement is a fresh subprocess; its peak RSS comes from ``os.wait4`` (that
child's own rusage); timings exclude interpreter start and imports (both sides time the
experiment in-process after a warm-up); the table shows the best of ``--repeats`` alternating runs,
the speed-up line both best-of and median ratios, and every timing is printed.

``klsym numpy, float64, defaults`` is the same run with ``klsym mc``'s default statistics (quantiles and
batch spread) on, as users run it. Latencies are whole processes (interpreter start included): ``import
klsym``, ``klsym exact`` / ``klsym gradient`` for one Gaussian pair and every built-in, cold (an empty
derivation cache, ``$KLSYM_CACHE_DIR``) and warm, ``klsym derive`` of every built-in cold and warm, and
``klsym sweep`` of a small grid on a 2-process LocalCluster.

Usage: .venv/bin/python benchmarks/run.py [--n 1e7] [--big-n 1e8] [--repeats 3] [--no-sweep] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from klsym.paths import BENCHMARKS_DIR  # noqa: E402  (paths are defined only in klsym.paths)

BENCH_VENV = ROOT / ".venv-bench"
TORCH_PIN = "torch==2.13.0"  # CPU wheel; never unpinned (that pulls CUDA)
KLSYM_PYTHON = Path(sys.executable)


def ensure_torch_venv() -> Path:
    python = BENCH_VENV / "bin" / "python"
    check = subprocess.run([str(python), "-c", "import torch"], capture_output=True) if python.exists() else None
    if check is None or check.returncode != 0:
        print(f"creating {BENCH_VENV} with {TORCH_PIN} ...", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "venv", str(BENCH_VENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", TORCH_PIN], check=True)
    return python


#: klsym's engine with its compiled kernels loaded (in the warm-up, like any process after its first large
#: run), and with the array code only (what a short run in a fresh process uses): the same numbers.
KERNELS_ON, KERNELS_OFF = {"KLSYM_KERNELS": "on"}, {"KLSYM_KERNELS": "off"}


def measure(argv: list[str], env: dict | None = None) -> dict:
    """Run one measurement in a child process; its JSON line plus the child's own peak RSS."""
    child = subprocess.Popen(
        argv,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})},
    )
    output = child.stdout.read()
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed with exit code {child.returncode}")
    result = json.loads(output.strip().splitlines()[-1])
    result["child_peak_rss_mib"] = usage.ru_maxrss / 1024
    return result


def best(runs: list[dict]) -> dict:
    return min(runs, key=lambda r: r["seconds"])


def wall(argv: list[str], env: dict | None = None) -> tuple[float, float]:
    """Wall-clock and CPU (user + system, the child's own rusage) seconds of one whole process."""
    started = time.perf_counter()
    child = subprocess.Popen(
        argv, cwd=ROOT, env={**os.environ, **(env or {})}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    _, status, usage = os.wait4(child.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(argv)} failed")
    return time.perf_counter() - started, usage.ru_utime + usage.ru_stime


def latencies(repeats: int, sweep: bool) -> dict:
    """Whole-process latencies: cold with an empty derivation cache, warm as the best of ``repeats``."""
    klsym = [str(KLSYM_PYTHON), "-m", "klsym"]
    pair = ["--q", "0,1", "--p", "1,1"]
    commands = {
        "exact": klsym + ["exact"] + pair,
        "gradient": klsym + ["gradient"] + pair,
        "derive": klsym + ["derive"],
        "mc 1e7": klsym + ["mc"] + pair + ["--n", "1e7", "--estimators", "k1,k2,k3,k4", "--quiet"],
    }
    out = {"import klsym": min(wall([str(KLSYM_PYTHON), "-c", "import klsym"]) for _ in range(repeats))}
    seed_script = [str(BENCH_VENV / "bin" / "python"), str(BENCHMARKS_DIR / "torch_baseline.py"), "1e7", "0"]
    out["torch seed script 1e7 (whole process)"] = min(wall(seed_script) for _ in range(repeats))
    out["import klsym.cli.exact"] = min(
        wall([str(KLSYM_PYTHON), "-c", "import klsym.cli.exact"]) for _ in range(repeats)
    )
    with tempfile.TemporaryDirectory() as cache:
        env = {"KLSYM_CACHE_DIR": cache}
        for name, argv in commands.items():  # cold: the first run in an empty cache derives and stores
            out[f"{name} cold"] = wall(argv, env)
            out[f"{name} warm"] = min(wall(argv, env) for _ in range(repeats))
        if sweep:
            spec = Path(cache) / "spec.json"
            spec.write_text(
                json.dumps(
                    {
                        "pairs": [{"q": [0, 1], "p": [gap, ratio]} for gap in (0.5, 1.0) for ratio in (1.0, 1.2)],
                        "estimators": ["k1", "k2", "k3", "k4"],
                        "n": 2_000_000,
                        "seed": 0,
                    }
                )
            )
            out["sweep 4 pairs x 2e6, 2 workers"] = wall(
                klsym
                + ["sweep", "--spec", str(spec), "--workers", "2", "--quiet", "--out", str(Path(cache) / "o.json")],
                env,
            )
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", default="1e7")
    parser.add_argument("--big-n", default="1e8")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", default="0")
    parser.add_argument("--no-sweep", action="store_true", help="skip the Dask sweep timing")
    parser.add_argument("--json", action="store_true", help="print the raw measurements as JSON")
    args = parser.parse_args()

    torch_python = ensure_torch_venv()
    worker = str(BENCHMARKS_DIR / "klsym_worker.py")
    baseline = str(BENCHMARKS_DIR / "torch_baseline.py")
    runs: dict[str, list[dict]] = {
        "torch_float32": [],
        "torch_float64": [],
        "klsym": [],
        "klsym_defaults": [],
        "klsym_array": [],
        "klsym_defaults_array": [],
    }
    for _ in range(args.repeats):  # alternate so that load from elsewhere hits every side alike
        runs["torch_float32"].append(measure([str(torch_python), baseline, args.n, args.seed, "float32"]))
        runs["torch_float64"].append(measure([str(torch_python), baseline, args.n, args.seed, "float64"]))
        for kind, suffix, env in (("values", "", KERNELS_ON), ("defaults", "_defaults", KERNELS_ON)):
            runs[f"klsym{suffix}"].append(measure([str(KLSYM_PYTHON), worker, kind, args.n, args.seed], env))
        for kind, suffix, env in (("values", "_array", KERNELS_OFF), ("defaults", "_defaults_array", KERNELS_OFF)):
            runs[f"klsym{suffix}"].append(measure([str(KLSYM_PYTHON), worker, kind, args.n, args.seed], env))
    big = measure([str(KLSYM_PYTHON), worker, "values", args.big_n, args.seed])  # auto: loads the kernels
    trials = measure([str(KLSYM_PYTHON), worker, "trials", "50000", "1000", args.seed], KERNELS_ON)

    k, t32, t64 = best(runs["klsym"]), best(runs["torch_float32"]), best(runs["torch_float64"])
    kd = best(runs["klsym_defaults"])
    rows = [
        ("torch 2.13 CPU, float32 (the seed's default)", t32),
        ("torch 2.13 CPU, float64", t64),
        ("klsym numpy, float64, values only", k),
        ("klsym numpy, float64, defaults (+ quantiles, batch spread)", kd),
        ("klsym numpy, float64, values only, array code (KLSYM_KERNELS=off)", best(runs["klsym_array"])),
        ("klsym numpy, float64, defaults, array code (KLSYM_KERNELS=off)", best(runs["klsym_defaults_array"])),
        (f"klsym numpy, float64, n = {big['n']:.0e}", big),
    ]
    print(
        f"Schulman setting q = N(0,1), p = N(1,1), k1..k4 mean/std/min/max, n = {k['n']:.0e}, "
        f"best of {args.repeats}, {os.cpu_count()} cores\n"
    )
    print("| run | n | seconds | CPU seconds | samples/s | peak RSS (MiB) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for label, r in rows:
        print(
            f"| {label} | {r['n']:.0e} | {r['seconds']:.3f} | {r['cpu_seconds']:.3f} | "
            f"{r['n'] / r['seconds']:.3g} | {r['child_peak_rss_mib']:.0f} |"
        )
    median = {name: statistics.median(r["seconds"] for r in rs) for name, rs in runs.items()}
    print(
        f"\nspeed-up klsym float64 vs torch float32: {t32['seconds'] / k['seconds']:.2f}x best-of, "
        f"{median['torch_float32'] / median['klsym']:.2f}x median; vs torch float64: "
        f"{t64['seconds'] / k['seconds']:.2f}x best-of, {median['torch_float64'] / median['klsym']:.2f}x median "
        f"(target >= 3x)"
    )
    print(
        f"klsym mc defaults vs torch float32: {t32['seconds'] / kd['seconds']:.2f}x best-of, "
        f"{median['torch_float32'] / median['klsym_defaults']:.2f}x median (target >= 3x); values only vs torch "
        f"float32: {t32['seconds'] / k['seconds']:.2f}x best-of, {median['torch_float32'] / median['klsym']:.2f}x "
        f"median (target >= 5x)"
    )
    cpu = {name: statistics.median(r["cpu_seconds"] for r in rs) for name, rs in runs.items()}
    print(
        "CPU-time ratios (median; load from elsewhere moves these less): torch float32 / klsym values "
        f"{cpu['torch_float32'] / cpu['klsym']:.2f}x, defaults {cpu['torch_float32'] / cpu['klsym_defaults']:.2f}x; "
        f"kernels vs array code: values {cpu['klsym_array'] / cpu['klsym']:.2f}x, defaults "
        f"{cpu['klsym_defaults_array'] / cpu['klsym_defaults']:.2f}x"
    )
    print(
        f"klsym peak RSS at n = {big['n']:.0e}: {big['child_peak_rss_mib']:.0f} MiB, at n = {k['n']:.0e}: "
        f"{k['child_peak_rss_mib']:.0f} MiB (constant in n; both with the compiled kernels loaded: numba and LLVM "
        f"are ~150 MiB of it); the array code's peak at n = {k['n']:.0e}: "
        f"{best(runs['klsym_array'])['child_peak_rss_mib']:.0f} MiB (target < 150 MB; "
        f"{big['import_rss_mib']:.0f} MiB of it is the interpreter with klsym's imports)"
    )
    print(
        f"Yang's gradient experiment (5 estimators x 3 modes, 50k samples x 1000 trials): "
        f"{trials['seconds']:.2f} s, peak RSS {trials['child_peak_rss_mib']:.0f} MiB"
    )
    print("all timings: " + json.dumps({name: [round(r["seconds"], 3) for r in rs] for name, rs in runs.items()}))
    sequences = measure([str(KLSYM_PYTHON), str(BENCHMARKS_DIR / "sequences.py"), "--repeats", "1"])
    print(
        f"exact sequence analysis V = 16, T = 5 ({sequences['sequences']:,} sequences, k1..k3 x 9 placements): "
        f"{sequences['seconds']:.2f} s (target well under 60 s), peak RSS {sequences['child_peak_rss_mib']:.0f} MiB"
    )
    latency = latencies(args.repeats, not args.no_sweep)
    print(
        "whole-process latencies, wall (CPU) s; targets: import < 0.5, exact/gradient warm < 0.5, derive cold "
        "< 5: " + ", ".join(f"{name} {seconds:.2f} ({cpu:.2f})" for name, (seconds, cpu) in latency.items())
    )
    if args.json:
        print(json.dumps({"runs": runs, "big": big, "trials": trials, "latency": latency}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
