"""`benchmarks/stack.py`: the stacked run's summary against the issue's aims, from a run's results and files."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from stack import stack_summary  # benchmarks/ holds scripts, not a package


def row(name: str, accuracy: float, delta: float, rounds: list[float], size: int) -> dict:
    return {"name": name, "metric": {"value": accuracy}, "metric_delta": delta, "size_bytes": size,
            "latency_ms": {"p50": sorted(rounds)[1], "rounds": rounds}}


@pytest.fixture
def run(tmp_path: Path) -> Path:
    rows = [row("00-finetune", 0.86, 0.0, [16.0, 20.0, 18.0], 92_000_000),
            row("04-export", 0.85, -0.015, [4.0, 4.2, 4.1], 9_000_000),
            row("04-export@openvino", 0.845, -0.016, [2.0, 2.5, 2.4], 9_000_000),
            row("07-teacher-onnx@openvino-bf16", 0.86, -0.002, [8.0, 8.5, 7.5], 92_000_000),
            row("08-teacher-int8", 0.865, 0.001, [9.0, 9.5, 9.2], 24_000_000),
            {"name": "08-teacher-int8@openvino-cuda", "not_run": "no CUDA device"}]
    results = {"baseline": "00-finetune", "machine": {"isa": ["avx2", "avx512_vnni", "amx_int8"]}, "rows": rows}
    (tmp_path / "results.json").write_text(json.dumps(results))
    for stage, size in (("00-finetune", 90_000_000), ("04-export", 8_000_000)):
        (tmp_path / stage).mkdir()
        (tmp_path / stage / ("model.safetensors" if stage == "00-finetune" else "model.onnx")).write_bytes(
            b"\0" * size)
        (tmp_path / stage / "tokenizer.json").write_bytes(b"\0" * 1000)  # shipped, but not the model file
    return tmp_path


def test_the_fastest_stacked_row_is_judged_against_each_aim_with_its_rounds(run):
    speed, peer, size = stack_summary(run)
    assert speed.startswith("Stacked, fastest runtime: 04-export@openvino (84.50%, -1.60 pt, 2.40 ms) = 7.5x the "
                            "teacher in PyTorch fp32 (18.00 ms; round by round 8.0x, 8.0x, 7.5x; aim ≥ 8x on this "
                            "CPU: not met), -1.60 points (aim ≥ −2: met).")
    assert peer.startswith("Best peer (the teacher's export on any runtime, or its dynamic int8): "
                           "07-teacher-onnx@openvino-bf16 (86.00%, -0.20 pt, 8.00 ms); the stacked artifact is 3.33x "
                           "faster (aim ≥ 1.25x at ≤ 2 points: met).")
    assert size.startswith("Size: model file 7.63 MiB vs the teacher's 85.83 MiB = 11.2x smaller (aim ≥ 10x: met)")


def test_an_avx2_only_cpu_is_held_to_its_own_speed_aim(run):
    results = json.loads((run / "results.json").read_text())
    results["machine"]["isa"] = ["avx", "avx2", "fma"]
    (run / "results.json").write_text(json.dumps(results))
    assert "aim ≥ 6x on this CPU: met" in stack_summary(run)[0]
