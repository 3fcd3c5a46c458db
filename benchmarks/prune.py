"""Structured-pruning benchmark summaries: each pruned graph against the unpruned one of the same format, from
one run's results.json (benchmarks/recipes/prune-compare.yaml)."""

from __future__ import annotations

import json
from pathlib import Path

# (label, pruned stage, the unpruned stage it is compared with): fused fp32 against fused fp32, int8 against int8,
# portable against portable.
COMPARED = [
    ("gradient importance, global, 50 % of heads and FFN + recovery", "06-gradient-fused", "02-unpruned-fused"),
    ("the same in int8", "07-gradient-int8", "03-unpruned-int8"),
    ("the same, portable graphs (no ONNX Runtime fusions)", "05-gradient-onnx", "01-unpruned-onnx"),
    ("rule: uniform 50 % of every block (magnitude), + recovery", "10-uniform-fused", "02-unpruned-fused"),
    ("L0 gates, 50 % + recovery", "13-l0-fused", "02-unpruned-fused"),
    ("gradient 50 %, no recovery", "16-no-recovery-fused", "02-unpruned-fused"),
    ("gradient importance, global, 70 % of heads and FFN + recovery", "19-gradient-70-fused", "02-unpruned-fused"),
    ("the same in int8", "20-gradient-70-int8", "03-unpruned-int8"),
]


FUSED = {"04-gradient": "06-gradient-fused", "08-uniform": "10-uniform-fused", "11-l0": "13-l0-fused",
         "17-gradient-70": "19-gradient-70-fused"}


def _effect(stage: Path) -> dict:
    return json.loads((stage / "compress.json").read_text())["history"][-1]["effect"]


def prune_summary(out: Path) -> list[str]:
    """One line per pruned graph: speed-up over the unpruned graph (p50, batch 1 x 128 real tokens), accuracy
    change with its 95 % interval, size; and the 1.5x-at-1-point aim."""
    rows = {row["name"]: row for row in json.loads((out / "results.json").read_text())["rows"]}
    lines = []
    for label, pruned, unpruned in COMPARED:
        a, b = rows[pruned], rows[unpruned]
        faster = b["latency_ms"]["p50"] / a["latency_ms"]["p50"]
        change = (a["metric"]["value"] - b["metric"]["value"]) * 100
        low, high = (bound * 100 for bound in a["metric_delta_ci95"])
        lines.append(f"{label} ({pruned} vs {unpruned}): {faster:.2f}x faster, accuracy {a['metric']['value']:.2%} "
                     f"({change:+.2f} pt; vs the PyTorch baseline {a['metric_delta'] * 100:+.2f} pt, 95 % interval "
                     f"{low:+.2f} to {high:+.2f}), {a['size_bytes'] / 2**20:.1f} MiB vs {b['size_bytes'] / 2**20:.1f}.")
    return [*lines, *shapes_and_fusions(out)]


def shapes_and_fusions(out: Path) -> list[str]:
    """What each pruning kept per block, and how many attention ops ONNX Runtime fused in each pruned graph."""
    lines = []
    for stage in ("04-gradient", "08-uniform", "11-l0", "17-gradient-70"):
        effect = _effect(out / stage)
        fused = _effect(out / FUSED[stage])
        lines.append(f"{stage}: heads per block {effect['after']['heads']}, FFN neurons per block "
                     f"{effect['after']['ffn']}, {effect['after']['parameters'] / 1e6:.1f}M parameters (from "
                     f"{effect['before']['parameters'] / 1e6:.1f}M); ONNX Runtime fused "
                     f"{fused['fusions'].get('Attention', 0)} attention ops for {len(effect['after']['heads'])} blocks.")
    return lines

