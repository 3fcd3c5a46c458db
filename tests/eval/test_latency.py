from __future__ import annotations

import time

import numpy as np
import pytest

from compress.eval.latency import measure_latency


class RecordingRunner:
    format = "fake"

    def __init__(self) -> None:
        self.seen: list[int] = []

    def logits(self, features: dict[str, np.ndarray]) -> np.ndarray:
        self.seen.append(int(features["input_ids"][0, 0]))
        time.sleep(0.001 * (1 + len(self.seen) % 3))
        return np.zeros((1, 2), dtype=np.float32)


def test_latency_percentiles_in_milliseconds_cycling_through_inputs():
    runner = RecordingRunner()
    inputs = [{"input_ids": np.array([[i]])} for i in range(3)]
    latency = measure_latency(runner, inputs, warmup=2, runs=7)
    assert set(latency) == {"p50", "p90", "mean"}
    assert 1.0 <= latency["p50"] <= latency["p90"] < 1000
    assert runner.seen == [0, 1] + [0, 1, 2, 0, 1, 2, 0]


def test_latency_needs_inputs_and_runs():
    with pytest.raises(ValueError):
        measure_latency(RecordingRunner(), [], warmup=0, runs=5)
    with pytest.raises(ValueError):
        measure_latency(RecordingRunner(), [{"input_ids": np.array([[0]])}], warmup=0, runs=0)
