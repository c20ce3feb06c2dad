"""Where one sample's time goes in the streaming engine: each step of the driver timed over a whole run.

Usage: .venv/bin/python benchmarks/stages.py [N] (default 1e7; one thread, Schulman's pair, k1..k4, mc defaults).
Prints nanoseconds per sample for the draw, the estimator values, each accumulator and the merging; run it
with ``KLSYM_KERNELS=on`` or ``off`` to compare the compiled draws with the array code.
"""

import sys
import time

from klsym.exact.families import Gaussian
from klsym.simulate.accumulators import FEED_BLOCKS, needs_samples
from klsym.simulate.driver import Stream, keep_freed_blocks
from klsym.simulate.montecarlo import ValueStatistics


def main() -> None:
    n = int(float(sys.argv[1])) if len(sys.argv) > 1 else 10_000_000
    keep_freed_blocks()
    stream = Stream(Gaussian(0.0, 1.0), Gaussian(1.0, 1.0), "k1,k2,k3,k4", seed=0)
    statistics = ValueStatistics(stream)
    stream.draw(next(stream.streaming_plan(1000)))  # loads the kernels (when used) before any timing
    seconds: dict[str, float] = {}

    def tick(step: str, started: float) -> float:
        now = time.perf_counter()
        seconds[step] = seconds.get(step, 0.0) + now - started
        return now

    accumulators = statistics.accumulators
    # the default plan's chunks, through the accumulators in the driver's order (accumulators.feed), timed
    for blocks in stream.streaming_plan(n):
        started = time.perf_counter()
        chunk = stream.draw(blocks, needs_samples(accumulators))
        started = tick("draw", started)
        parts = [accumulator.empty() for accumulator in accumulators]
        for part in parts:
            if not part.by_estimator:
                part._partials.extend(part.partials(chunk))
                started = tick(type(part).__name__, started)
        batch = next((part.summary_batch for part in parts if part.summary_batch), None)
        for block in chunk.row_groups(FEED_BLOCKS):
            block.batch = batch
            pieces: list[list] = [[] for _ in accumulators]
            for i in range(len(stream.estimators)):
                block.values(i)
                started = tick("values", started)
                for part, got in zip(parts, pieces):
                    if part.by_estimator:
                        got.append(part.piece(block, i))
                        started = tick(type(part).__name__, started)
                block.forget(i)
            for part, got in zip(parts, pieces):
                if part.by_estimator:
                    part._partials.extend(part.assemble(block, got))
                    started = tick(type(part).__name__, started)
        for accumulator, part in zip(accumulators, parts):
            accumulator.merge(part)
            started = tick("merge", started)
    per_sample = {step: round(total / n * 1e9, 1) for step, total in seconds.items()}
    print(
        f"ns per sample (kernels {'on' if stream.kernels else 'off'}): {per_sample}, total {sum(per_sample.values()):.1f}"
    )


if __name__ == "__main__":
    main()
