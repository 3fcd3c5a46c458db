from __future__ import annotations

import time

import numpy as np
import pytest

from compress.eval.latency import summarize, time_generation, time_runs


class RecordingRunner:
    format = "fake"

    def __init__(self) -> None:
        self.seen: list[int] = []

    def logits(self, features: dict[str, np.ndarray]) -> np.ndarray:
        self.seen.append(int(features["input_ids"][0, 0]))
        time.sleep(0.001 * (1 + len(self.seen) % 3))
        return np.zeros((1, 2), dtype=np.float32)


def test_timed_runs_in_milliseconds_after_warmup_cycling_through_inputs():
    runner = RecordingRunner()
    inputs = [{"input_ids": np.array([[i]])} for i in range(3)]
    timings = time_runs(runner, inputs, warmup=2, runs=7)
    assert len(timings) == 7
    assert all(1.0 <= t < 1000 for t in timings)
    assert runner.seen == [0, 1] + [0, 1, 2, 0, 1, 2, 0]


def test_timed_runs_need_inputs_and_runs():
    with pytest.raises(ValueError):
        time_runs(RecordingRunner(), [], warmup=0, runs=5)
    with pytest.raises(ValueError):
        time_runs(RecordingRunner(), [{"input_ids": np.array([[0]])}], warmup=0, runs=0)


class CountingGenerator:
    """Prefill takes 5 ms, each decode step 1 ms; the cache counts the positions it holds."""

    cannot_generate = None

    def __init__(self) -> None:
        self.calls: list[str] = []

    def prefill(self, input_ids: np.ndarray) -> tuple[np.ndarray, int]:
        self.calls.append("prefill")
        time.sleep(0.005)
        return input_ids[:, -1] + 1, input_ids.shape[1]

    def decode(self, tokens: np.ndarray, cache: int) -> tuple[np.ndarray, int]:
        self.calls.append(f"decode {cache}")
        time.sleep(0.001)
        return tokens + 1, cache + 1


def test_generation_is_timed_to_the_first_token_and_per_token_after_it():
    runner = CountingGenerator()
    timings = time_generation(runner, np.array([[7, 8, 9]]), new_tokens=4, warmup=1, runs=2)
    assert set(timings) == {"ttft_ms", "per_token_ms"}
    assert runner.calls == ["prefill", "decode 3", "decode 4", "decode 5"] * 3
    assert all(5.0 <= t < 1000 for t in timings["ttft_ms"]) and len(timings["ttft_ms"]) == 2
    assert all(1.0 <= t < 1000 for t in timings["per_token_ms"]) and len(timings["per_token_ms"]) == 2


def test_generation_timing_needs_a_token_after_the_first_and_a_run():
    with pytest.raises(ValueError):
        time_generation(CountingGenerator(), np.array([[1]]), new_tokens=1, warmup=0, runs=1)
    with pytest.raises(ValueError):
        time_generation(CountingGenerator(), np.array([[1]]), new_tokens=2, warmup=0, runs=0)


def test_summary_pools_the_rounds_and_measures_their_spread():
    rounds = [[1.0, 2.0, 3.0], [2.0, 4.0, 6.0], [3.0, 3.0]]
    summary = summarize(rounds)
    pooled = [1.0, 2.0, 3.0, 2.0, 4.0, 6.0, 3.0, 3.0]
    assert summary["p50"] == pytest.approx(np.percentile(pooled, 50)) == 3.0
    assert summary["p90"] == pytest.approx(np.percentile(pooled, 90))
    assert summary["mean"] == pytest.approx(np.mean(pooled))
    assert summary["rounds"] == [2.0, 4.0, 3.0]
    assert summary["spread"] == pytest.approx((4.0 - 2.0) / 3.0)


def test_summary_needs_a_timing_in_every_round():
    with pytest.raises(ValueError):
        summarize([[1.0], []])
