"""Wall-clock latency of `runner.logits`, as percentiles over timed runs."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from compress.eval.runners import Runner


def measure_latency(runner: Runner, inputs: list[dict[str, np.ndarray]], warmup: int, runs: int) -> dict:
    """{"p50", "p90", "mean"} in milliseconds; run i uses inputs[i % len(inputs)]."""
    if not inputs or runs < 1:
        raise ValueError("latency needs at least one input and one timed run")
    for i in range(warmup):
        runner.logits(inputs[i % len(inputs)])
    timings_ms = np.empty(runs)
    for i in range(runs):
        features = inputs[i % len(inputs)]
        start = time.perf_counter()
        runner.logits(features)
        timings_ms[i] = (time.perf_counter() - start) * 1000
    return {
        "p50": float(np.percentile(timings_ms, 50)),
        "p90": float(np.percentile(timings_ms, 90)),
        "mean": float(timings_ms.mean()),
    }
