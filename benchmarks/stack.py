"""Stacked pipeline summary from one run: the stacked artifact on its fastest runtime against the fine-tuned
teacher in PyTorch fp32 and against the best a user would otherwise deploy (the teacher's own ONNX export on any
runtime or precision hint, and ONNX Runtime's dynamic int8 of it, which optimum's int8 also calls), with the
issue's aims beside each figure."""

from __future__ import annotations

import json
from pathlib import Path

from runtimes import _label, _p50  # benchmarks/runtimes.py

STACKED = "04-export"
PEERS = ("07-teacher-onnx", "08-teacher-int8")
MAX_DROP = 2.0  # points
AIMS = {"speed_amx": 8.0, "speed_avx2": 6.0, "peer": 1.25, "size": 10.0}  # speed_amx: with AVX512-VNNI or AMX
MIB = 2 ** 20


def _verdict(met: bool) -> str:
    return "met" if met else "not met"


def _model_bytes(directory: Path) -> int:
    """The weights file a deployment loads: the graph, or the safetensors file."""
    return sum(path.stat().st_size for path in directory.iterdir()
               if path.name.startswith("model.") and path.suffix in {".onnx", ".onnx_data", ".safetensors"})


def stack_summary(out: Path) -> list[str]:
    results = json.loads((out / "results.json").read_text())
    rows = [row for row in results["rows"] if "not_run" not in row]
    teacher = next(row for row in rows if row["name"] == results["baseline"])
    stacked = min((row for row in rows if row["name"].split("@")[0] == STACKED), key=_p50)
    peer = min((row for row in rows if row["name"].split("@")[0] in PEERS), key=_p50)
    isa = results["machine"]["isa"]
    speed_aim = AIMS["speed_amx" if "avx512_vnni" in isa or "amx_int8" in isa else "speed_avx2"]
    speedup, drop = _p50(teacher) / _p50(stacked), stacked["metric_delta"] * 100
    over_peer = _p50(peer) / _p50(stacked)
    model, teacher_model = _model_bytes(out / STACKED), _model_bytes(out / results["baseline"])
    rounds = zip(teacher["latency_ms"]["rounds"], stacked["latency_ms"]["rounds"])
    by_round = ", ".join(f"{slow / fast:.1f}x" for slow, fast in rounds)
    speed = (f"Stacked, fastest runtime: {_label(stacked)} = {speedup:.1f}x the teacher in PyTorch fp32 "
             f"({_p50(teacher):.2f} ms; round by round {by_round}; aim ≥ {speed_aim:g}x on this CPU: "
             f"{_verdict(speedup >= speed_aim)}), {drop:+.2f} points (aim ≥ −{MAX_DROP:g}: "
             f"{_verdict(drop >= -MAX_DROP)}).")
    peers = (f"Best peer (the teacher's export on any runtime, or its dynamic int8): {_label(peer)}; the stacked "
             f"artifact is {over_peer:.2f}x faster (aim ≥ {AIMS['peer']}x at ≤ {MAX_DROP:g} points: "
             f"{_verdict(over_peer >= AIMS['peer'] and drop >= -MAX_DROP)}).")
    size = (f"Size: model file {model / MIB:.2f} MiB vs the teacher's {teacher_model / MIB:.2f} MiB = "
            f"{teacher_model / model:.1f}x smaller (aim ≥ {AIMS['size']:g}x: "
            f"{_verdict(teacher_model >= AIMS['size'] * model)}); with the tokenizer files a deployment ships, "
            f"{stacked['size_bytes'] / MIB:.2f} vs {teacher['size_bytes'] / MIB:.2f} MiB = "
            f"{teacher['size_bytes'] / stacked['size_bytes']:.1f}x.")
    return [speed, peers, size]
