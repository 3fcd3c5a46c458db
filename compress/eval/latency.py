"""Wall-clock latency: timed runs in a worker (forward passes, or generations timed per token), and their
summary over interleaved rounds in the parent."""

from __future__ import annotations

import time

import numpy as np

from compress.eval.runners import Runner, greedy_tokens


def time_runs(runner: Runner, inputs: list[dict[str, np.ndarray]], warmup: int, runs: int) -> list[float]:
    """Milliseconds of each timed `runner.logits` call after `warmup` untimed ones; run i uses inputs[i % len]."""
    if not inputs or runs < 1:
        raise ValueError("latency needs at least one input and one timed run")
    for i in range(warmup):
        runner.logits(inputs[i % len(inputs)])
    timings_ms = []
    for i in range(runs):
        features = inputs[i % len(inputs)]
        start = time.perf_counter()
        runner.logits(features)
        timings_ms.append((time.perf_counter() - start) * 1000)
    return timings_ms


def time_generation(runner: Runner, input_ids: np.ndarray, new_tokens: int, warmup: int,
                    runs: int) -> dict[str, list[float]]:
    """Greedy generations of `new_tokens` after the prompt `input_ids`, `warmup` untimed first. For each timed
    one: the milliseconds to its first token (the prompt's prefill) and per token after that (the mean decode
    step)."""
    if new_tokens < 2 or runs < 1:
        raise ValueError("generation timing needs at least two new tokens and one timed run")
    for _ in range(warmup):
        for _ in greedy_tokens(runner, input_ids, new_tokens):
            pass
    timings: dict[str, list[float]] = {"ttft_ms": [], "per_token_ms": []}
    for _ in range(runs):
        start = time.perf_counter()
        arrivals = [time.perf_counter() for _ in greedy_tokens(runner, input_ids, new_tokens)]
        timings["ttft_ms"].append((arrivals[0] - start) * 1000)
        timings["per_token_ms"].append((arrivals[-1] - arrivals[0]) / (new_tokens - 1) * 1000)
    return timings


def summarize(rounds: list[list[float]]) -> dict:
    """p50, p90 and mean over all rounds' timings pooled; each round's p50; and the spread of those p50s
    relative to the pooled p50, which shows how much the machine drifted during the benchmark."""
    if not rounds or not all(rounds):
        raise ValueError("latency needs at least one timing in every round")
    pooled = np.concatenate([np.asarray(timings, dtype=np.float64) for timings in rounds])
    p50 = float(np.percentile(pooled, 50))
    round_p50s = [float(np.percentile(timings, 50)) for timings in rounds]
    return {
        "p50": p50,
        "p90": float(np.percentile(pooled, 90)),
        "mean": float(pooled.mean()),
        "rounds": round_p50s,
        "spread": (max(round_p50s) - min(round_p50s)) / p50,
    }
