"""Runtimes benchmark summary from one run's results.json: the best that a user could get without `compress`
(the fine-tuned model in PyTorch, its plain fp32 ONNX export under ONNX Runtime or OpenVINO, any precision
hint) against the best that the project's passes make, at an accuracy cost of at most half a point."""

from __future__ import annotations

import json
from pathlib import Path

# Rows of benchmarks/recipes/runtimes.yaml a user gets without compress: the model and its plain export.
PEERS = ("00-finetune", "01-export")
MAX_DROP = 0.005  # accuracy, as a fraction
AIM = 1.25


def _label(row: dict) -> str:
    return f"{row['name']} ({row['metric']['value']:.2%}, {row['metric_delta'] * 100:+.2f} pt, {_p50(row):.2f} ms)"


def _p50(row: dict) -> float:
    return row["latency_ms"]["p50"]


def runtimes_summary(out: Path) -> list[str]:
    rows = [row for row in json.loads((out / "results.json").read_text())["rows"] if "not_run" not in row]
    peers = [row for row in rows if row["name"].split("@")[0] in PEERS]
    ours = [row for row in rows if row["name"].split("@")[0] not in PEERS and row["metric_delta"] >= -MAX_DROP]
    peer = min(peers, key=_p50)
    pytorch = _p50(next(row for row in rows if row["name"] == PEERS[0]))
    lines = [f"Best without compress: {_label(peer)} = {pytorch / _p50(peer):.2f}x PyTorch fp32 ({pytorch:.2f} ms)."]
    if not ours:
        return [*lines, f"No variant made by compress stays within {MAX_DROP * 100:.1f} point of the baseline."]
    best = min(ours, key=_p50)
    ratio = _p50(peer) / _p50(best)
    verdict = "met" if ratio >= AIM else "not met"
    lines.append(f"Best made by compress within {MAX_DROP * 100:.1f} point: {_label(best)} = {ratio:.2f}x the best "
                 f"without compress (aim ≥ {AIM}x: {verdict}); {pytorch / _p50(best):.2f}x PyTorch fp32.")
    fastest = min((row for row in rows if row["name"].split("@")[0] not in PEERS), key=_p50)
    if fastest is not best:
        lines.append(f"Fastest made by compress at any accuracy: {_label(fastest)} = "
                     f"{_p50(peer) / _p50(fastest):.2f}x the best without compress.")
    return lines
