"""Unstructured-pruning benchmark summaries from one run's results.json: accuracy or perplexity against the
dense model, zipped size against the dense fp32 file, and latency beside the dense graph of the same precision
(to show that zeros alone buy no speed on these runtimes)."""

from __future__ import annotations

import json
from pathlib import Path

MIB = 2**20
# (label, sparse torch stage, its int8 graph) of benchmarks/recipes/prune-unstructured-compare.yaml
ENCODER = [
    ("gradual magnitude 50 % (blocks + word embeddings) + recovery", "03-magnitude-50", "05-magnitude-50-int8"),
    ("gradual magnitude 70 %", "06-magnitude-70", "08-magnitude-70-int8"),
    ("gradual magnitude 90 %", "09-magnitude-90", "11-magnitude-90-int8"),
    ("movement 50 % (blocks only) + recovery", "12-movement-50", "14-movement-50-int8"),
]


def _rows(out: Path) -> dict[str, dict]:
    return {row["name"]: row for row in json.loads((out / "results.json").read_text())["rows"]}


def _points(row: dict) -> str:
    low, high = (bound * 100 for bound in row["metric_delta_ci95"])
    return f"{row['metric']['value']:.2%} ({row['metric_delta'] * 100:+.2f} pt, 95 % interval {low:+.2f} to {high:+.2f})"


def encoder_summary(out: Path) -> list[str]:
    rows = _rows(out)
    dense, dense_int8 = rows["00-finetune"], rows["02-dense-int8"]
    lines = [(f"Dense fp32 (00-finetune): {dense['metric']['value']:.2%}, {dense['size_bytes'] / MIB:.1f} MiB on disk, "
             f"{dense['size_zipped_bytes'] / MIB:.1f} MiB zipped; dense int8 (02-dense-int8): "
             f"{dense_int8['size_zipped_bytes'] / MIB:.1f} MiB zipped.")]
    for label, torch_stage, int8_stage in ENCODER:
        sparse, int8 = rows[torch_stage], rows[int8_stage]
        lines.append(
            f"{label}: torch {_points(sparse)}; int8 ONNX {_points(int8)}, {int8['size_zipped_bytes'] / MIB:.1f} MiB "
            f"zipped = {dense['size_bytes'] / int8['size_zipped_bytes']:.1f}x smaller than the dense fp32 file "
            f"({dense['size_zipped_bytes'] / int8['size_zipped_bytes']:.1f}x its zipped size, "
            f"{dense_int8['size_zipped_bytes'] / int8['size_zipped_bytes']:.2f}x the dense int8 zipped); int8 p50 "
            f"{int8['latency_ms']['p50']:.2f} ms vs dense int8 {dense_int8['latency_ms']['p50']:.2f} ms "
            f"(x{dense_int8['latency_ms']['p50'] / int8['latency_ms']['p50']:.2f}: zeros buy no speed here).")
    oneshot = rows["15-oneshot-50"]
    lines.append(f"one-shot magnitude 50 %, no recovery (15-oneshot-50): {_points(oneshot)}.")
    return lines


DECODER = ["00-magnitude", "01-wanda", "02-sparsegpt", "03-magnitude-2of4", "04-wanda-2of4", "05-sparsegpt-2of4"]


def decoder_summary(out: Path) -> list[str]:
    """Perplexity of each 50 % variant against the dense model, and Wanda's and SparseGPT's increase against
    magnitude's at the same pattern (aim: at most 1.4x dense, under half of magnitude's increase)."""
    rows = _rows(out)
    dense = rows["base"]["metric"]["value"]
    perplexity = {name: rows[name]["metric"]["value"] for name in DECODER}
    lines = [f"Dense perplexity {dense:.2f}."]
    for pattern, names in (("50 % unstructured", DECODER[:3]), ("2:4", DECODER[3:])):
        magnitude = perplexity[names[0]]
        for name in names:
            value, method = perplexity[name], name.split("-")[1]
            line = f"{pattern}, {method}: perplexity {value:.2f} = {value / dense:.2f}x dense"
            if method != "magnitude":
                line += f", {(value - dense) / (magnitude - dense):.0%} of magnitude's increase"
            lines.append(line + ".")
    return lines


def gpu_section(result: dict) -> list[str]:
    """The 2:4 timing table of benchmarks/sparse_gpu.py: per model shape, one block's Linears."""
    lines = [(f"{result['gpu']}, torch {result['torch']}, CUDA {result['cuda']}, {result['dtype']}, weights 2:4 by "
             "compress's own mask; ms per call (mean of 20 back-to-back calls, median of 30 such runs)."), "",
             "| Backend | Shapes | Tokens | Dense ms | 2:4 ms | Dense / 2:4 |", "|---|---|---:|---:|---:|---:|"]
    for row in result["rows"]:
        if row["layer"].startswith("one block"):
            lines.append(f"| {row['backend']} | {row['model']}, {row['layer']} | {row['tokens']} | "
                         f"{row['dense_ms']:.4f} | {row['sparse_ms']:.4f} | {row['speedup']:.2f}x |")
    lines += [f"| {backend} | - | - | - | - | cannot run: {why} |" for backend, why in result["refused"].items()]
    blocks = [row for row in result["rows"] if row["layer"].startswith("one block")]
    faster = [f"{row['model']} at {row['tokens']} tokens ({row['speedup']:.2f}x)" for row in blocks
              if row["speedup"] > 1]
    layers = [row for row in result["rows"] if not row["layer"].startswith("one block")]
    sparse = sorted(row["sparse_ms"] for row in layers)
    dense = sorted(row["dense_ms"] for row in layers)
    lines += ["", (f"2:4 beat dense only for: {', '.join(faster) or 'none of these'}. One 2:4 product took "
                   f"{sparse[0]:.3f} to {sparse[-1]:.3f} ms whatever its size; one dense product {dense[0]:.3f} to "
                   f"{dense[-1]:.3f} ms.")]
    return lines
