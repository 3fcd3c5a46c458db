"""Export the torch model to a portable fp32 ONNX graph and prove it computes what torch computes."""

from __future__ import annotations

import time

from compress.artifact import GRAPH, Artifact, graph_files, step_record
from compress.context import Context
from compress.eval.runners import OrtRunner, TorchRunner
from compress.export.onnx import export_onnx, graph_runtime
from compress.export.verify import VERIFY_THREADS, reference_logits, verify_logits
from compress.recipe import ExportStep


def run(artifact: Artifact, step: ExportStep, ctx: Context) -> Artifact:
    started = time.perf_counter()
    evalset = ctx.eval_set(artifact.tokenizer).take(step.verify.samples)
    # Before the export: tracing may leave the in-process model changed.
    reference = reference_logits(TorchRunner(artifact.model), evalset)
    graph = export_onnx(artifact.model, artifact.task, ctx.stage_dir / GRAPH, step.opset)
    checked = verify_logits(reference, OrtRunner(graph, threads=VERIFY_THREADS), evalset, step.verify)
    files = graph_files(graph)
    kind = step.output_kind(artifact.kind).evolve(runtime=graph_runtime(graph), external_data=len(files) > 1)
    effect = {"onnx_bytes": sum(path.stat().st_size for path in files), **checked,
              "seconds": round(time.perf_counter() - started, 2)}
    return artifact.evolve(step_record(step, **effect), model=None, onnx_path=graph, kind=kind)
