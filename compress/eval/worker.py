"""A bench worker: one artifact, loaded once in a process of its own, answering its parent's requests.

Usage: python -m compress.eval.worker, then one JSON request per line on stdin, one JSON reply per line on stdout:

  {"op": "load", "artifact_dir", "evalset", "threads", "batch_size", "seq_len", "real_length_samples", "target",
   "shapes": [[batch, length], ...] (timed as inputs "fixed BxL")}
                                 -> {"runtime": {...}, "cannot_generate": null | "why"}, or {"error": "why"}
  {"op": "latency", "inputs": "fixed" | "padded" | "real" | "fixed BxL", "warmup": N, "runs": N}
                                                     -> {"timings_ms": [...]}
  {"op": "generate", "new_tokens": N, "warmup": N, "runs": N}
                                                     -> {"ttft_ms": [...], "per_token_ms": [...]}
  {"op": "rss"}                                      -> {"peak_rss_mb": X}
  {"op": "metric", "batch_size": N}                  -> {"name", "value", "rows": {...}}
  {"op": "exit"}, or the end of stdin: the worker ends.

Between requests the worker blocks on stdin, so it takes no CPU from the variant being timed. A failure ends
it with the traceback on stderr, which the parent reports. Its own process makes its peak RSS its own, and an
ONNX artifact is measured without importing torch or transformers (see runners.py).
"""

from __future__ import annotations

import json
import os
import resource
import sys
import traceback
from pathlib import Path
from typing import TextIO

from compress.errors import CompressError
from compress.eval.latency import time_generation, time_runs
from compress.eval.metrics import evaluate
from compress.eval.runners import Runner, load_failure, load_runner
from compress.eval.targets import TARGETS
from compress.evalset import EvalSet


def shape_input(batch: int, length: int) -> str:
    """The name of a fixed-length input of another shape than the main one."""
    return f"fixed {batch}x{length}"


class Worker:
    def __init__(self) -> None:
        self.runner: Runner | None = None
        self.evalset: EvalSet | None = None
        self.inputs: dict[str, list] = {}

    def handle(self, request: dict) -> dict:
        handlers = {"load": self.load, "latency": self.latency, "generate": self.generate, "rss": self.rss,
                    "metric": self.metric}
        op = request.pop("op")
        if op not in handlers:
            raise ValueError(f"unknown request {op!r}")
        if op != "load" and self.runner is None:
            raise ValueError(f"{op!r} before 'load'")
        return handlers[op](**request)

    def load(self, artifact_dir: str, evalset: str, threads: int, batch_size: int, seq_len: int,
             real_length_samples: int, target: str = "torch", shapes: list[list[int]] = ()) -> dict:
        try:
            self.runner = load_runner(Path(artifact_dir), threads, TARGETS[target])
        except CompressError:
            raise  # the artifact itself is wrong: no runtime could run it
        except Exception as err:  # noqa: BLE001  (a runtime that cannot read the graph: the row says why)
            traceback.print_exc()
            return {"error": load_failure(err)}
        self.evalset = EvalSet.load(Path(evalset))
        self.inputs = {
            "fixed": [self.evalset.real_token_inputs(batch_size, seq_len)],
            "padded": [self.evalset.padded_inputs(batch_size, seq_len)],
            "real": self.evalset.real_length_inputs(real_length_samples),
            **{shape_input(batch, length): [self.evalset.real_token_inputs(batch, length)]
               for batch, length in shapes},
        }
        return {"runtime": self.runner.runtime(), "cannot_generate": self.runner.cannot_generate}

    def latency(self, inputs: str, warmup: int, runs: int) -> dict:
        chosen = self.inputs[inputs]
        if not chosen:
            raise ValueError(f"no {inputs!r} inputs to time")
        # Whole cycles through the inputs, so every real-length row weighs the same in the percentiles.
        whole_cycles = -(-runs // len(chosen)) * len(chosen)
        return {"timings_ms": time_runs(self.runner, chosen, warmup, whole_cycles)}

    def generate(self, new_tokens: int, warmup: int, runs: int) -> dict:
        prompt = self.inputs["fixed"][0]["input_ids"]  # seq_len real tokens
        return time_generation(self.runner, prompt, new_tokens, warmup, runs)

    def rss(self) -> dict:
        return {"peak_rss_mb": peak_rss_mb()}

    def metric(self, batch_size: int) -> dict:
        result = evaluate(self.runner, self.evalset, batch_size=batch_size, progress=False)
        return {"name": result.name, "value": result.value, "rows": {k: v.tolist() for k, v in result.rows.items()}}


def serve(requests: TextIO, replies: TextIO) -> None:
    worker = Worker()
    while line := requests.readline():
        request = json.loads(line)
        if request["op"] == "exit":
            return
        replies.write(json.dumps(worker.handle(request)) + "\n")
        replies.flush()


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


def main() -> None:
    # Replies go to a private copy of stdout, and fd 1 becomes stderr: a library that prints (Python or C)
    # cannot corrupt the protocol.
    replies = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    serve(sys.stdin, replies)


if __name__ == "__main__":
    main()
