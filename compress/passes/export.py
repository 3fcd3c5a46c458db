"""Export the torch model to ONNX and prove it computes what torch computes.

Float models become portable fp32 graphs checked elementwise; QAT models become QDQ graphs with their learned
scales and weight-only models MatMulNBits graphs with their integers, both checked by task metric and agreement.
"""

from __future__ import annotations

import time
from pathlib import Path

from compress.arch import TASKS
from compress.artifact import GRAPH, Artifact, graph_files, step_record
from compress.context import Context
from compress.errors import ExportMismatch
from compress.eval.metrics import evaluate
from compress.eval.runners import OrtRunner, TorchRunner
from compress.evalset import EvalSet
from compress.export.onnx import export_onnx, graph_bytes, graph_runtime
from compress.export.verify import (
    VERIFY_BATCH,
    VERIFY_THREADS,
    reference_logits,
    verify_logits,
    verify_quantized,
)
from compress.recipe import ExportStep


def run(artifact: Artifact, step: ExportStep, ctx: Context) -> Artifact:
    started = time.perf_counter()
    if artifact.kind.is_float:
        evalset = ctx.eval_set(artifact.tokenizer).take(step.verify.samples)
        # Before the export: tracing may leave the in-process model changed.
        reference = reference_logits(TorchRunner(artifact.model), evalset)
        graph = export_onnx(artifact.model, artifact.task, ctx.stage_dir / GRAPH, step.opset, kv_cache=step.kv_cache)
        try:
            checked = verify_logits(reference, OrtRunner(graph, threads=VERIFY_THREADS), evalset, step.verify)
        except ExportMismatch as err:
            raise ExportMismatch(f"{err}; {_where(artifact, graph, evalset, step)}") from None
    else:
        evalset = ctx.eval_set(artifact.tokenizer).take(step.verify_quantized.samples)
        reference = evaluate(TorchRunner(artifact.model), evalset, progress=not ctx.quiet)
        graph = _export_quantized(artifact, ctx.stage_dir / GRAPH, step.opset, step.kv_cache)
        candidate = evaluate(OrtRunner(graph, threads=VERIFY_THREADS), evalset, progress=not ctx.quiet)
        checked = verify_quantized(reference, candidate, evalset, step.verify_quantized,
                                   TASKS[artifact.task].higher_is_better)
    kind = step.output_kind(artifact.kind).evolve(runtime=graph_runtime(graph),
                                                  external_data=len(graph_files(graph)) > 1)
    effect = {"onnx_bytes": graph_bytes(graph), **checked,
              "seconds": round(time.perf_counter() - started, 2)}
    return artifact.evolve(step_record(step, **effect), model=None, onnx_path=graph, kind=kind)


def _where(artifact: Artifact, graph: Path, evalset: EvalSet, step: ExportStep) -> str:
    """Which module the graph first gets wrong, on the rows of the first verification batch."""
    from compress.eval.divergence import first_divergence

    found = first_divergence(artifact.model, graph, evalset.take(VERIFY_BATCH).features, step.verify)
    return found.describe() if found else "no single module's output leaves tolerance: the error builds up"


def _export_quantized(artifact: Artifact, target: Path, opset: int, kv_cache: bool) -> Path:
    if artifact.kind.weights == "fake-quant":
        from compress.export.qdq import export_fake_quant

        return export_fake_quant(artifact.model, artifact.task, target, opset, kv_cache=kv_cache)
    from compress.export.lower import export_weight_only

    return export_weight_only(artifact.model, artifact.task, target, opset, kv_cache=kv_cache)
