"""Export the torch model to an fp32 ONNX graph, fuse it, and prove it computes what torch computes."""

from __future__ import annotations

import time

import numpy as np

from compress.artifact import GRAPH, Artifact, step_record
from compress.context import Context
from compress.eval.runners import OrtRunner, TorchRunner
from compress.export.onnx import export_onnx, optimize_onnx
from compress.export.verify import verify_float
from compress.recipe import ExportStep

VERIFY_BATCH = 4  # causal LM logits are [B, L, vocab]: keep each batch small
VERIFY_THREADS = 2


def run(artifact: Artifact, step: ExportStep, ctx: Context) -> Artifact:
    started = time.perf_counter()
    evalset = ctx.eval_set(artifact.tokenizer).take(step.verify.samples)
    # Before the export: tracing may leave the in-process model changed.
    torch_model = TorchRunner(artifact.model)
    reference = [torch_model.logits(features) for _, features in evalset.batches(VERIFY_BATCH)]
    graph = export_onnx(artifact.model, artifact.task, ctx.stage_dir / GRAPH, step.opset)
    fusions = optimize_onnx(graph, artifact.config) if step.optimize else {}
    session = OrtRunner(graph, threads=VERIFY_THREADS)
    max_abs_diff = 0.0
    for (rows, features), expected in zip(evalset.batches(VERIFY_BATCH), reference):
        actual = session.logits(features)
        checked = verify_float(real_tokens_only(expected, features), real_tokens_only(actual, features),
                               step.verify, output_name=f"logits of eval rows {rows.start}-{rows.stop - 1}")
        max_abs_diff = max(max_abs_diff, checked["max_abs_diff"])
    effect = {
        "onnx_bytes": graph.stat().st_size,
        "max_abs_diff": max_abs_diff,
        "rows": len(evalset),
        "fusions": fusions,
        "seconds": round(time.perf_counter() - started, 2),
    }
    return artifact.evolve(step_record(step, **effect), onnx_path=graph, precision="fp32")


def real_tokens_only(logits: np.ndarray, features: dict[str, np.ndarray]) -> np.ndarray:
    """Zero a causal LM's logits at padding: they mean nothing, and torch and the graph number padded
    positions differently (torch counts on, the graph's runner repeats the last real position)."""
    if logits.ndim != 3:
        return logits
    return np.where(features["attention_mask"][..., None].astype(bool), logits, 0.0)
