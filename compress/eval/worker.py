"""Benchmark one artifact in a process of its own, so its peak RSS is its own.

Usage: python -m compress.eval.worker REQUEST_JSON RESULT_JSON

An ONNX artifact is measured without importing torch or transformers (see runners.py).
"""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path

from compress.eval.latency import measure_latency
from compress.eval.metrics import evaluate
from compress.eval.runners import load_runner
from compress.evalset import EvalSet


def run(request: dict) -> dict:
    runner = load_runner(Path(request["artifact_dir"]), request["threads"])
    evalset = EvalSet.load(Path(request["evalset"]))
    warmup, runs = request["warmup"], request["runs"]
    fixed = evalset.fixed_length_inputs(request["batch_size"], request["seq_len"])
    latency = measure_latency(runner, [fixed], warmup, runs)
    latency_real = None
    samples = evalset.real_length_inputs(request["real_length_samples"])
    if samples:
        # Whole cycles, so every sampled row weighs the same in the percentiles.
        cycles = -(-runs // len(samples))
        latency_real = measure_latency(runner, samples, warmup, cycles * len(samples))
    # Read before the metric's large batches, which would inflate the figure beyond what deployment needs.
    rss_mb = peak_rss_mb()
    metric = evaluate(runner, evalset, batch_size=request["metric_batch_size"], progress=False)
    return {
        "metric": {"name": metric.name, "value": metric.value},
        "latency_ms": latency,
        "latency_real_ms": latency_real,
        "peak_rss_mb": rss_mb,
    }


def peak_rss_mb() -> float:
    """This process's own peak. Linux keeps ru_maxrss across execve, so a worker started by a big parent
    would report the parent's peak; VmHWM belongs to the new address space only."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1 << 20 if sys.platform == "darwin" else 1 << 10)  # macOS reports bytes, others KiB


def main(argv: list[str]) -> None:
    if len(argv) != 2:
        sys.exit("usage: python -m compress.eval.worker REQUEST_JSON RESULT_JSON")
    request_path, result_path = map(Path, argv)
    result = run(json.loads(request_path.read_text()))
    result_path.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
