"""Rewrite a portable graph with ONNX Runtime's transformer fusions, and prove it still computes the same."""

from __future__ import annotations

import shutil
import time

from compress.artifact import GRAPH, Artifact, graph_files, step_record
from compress.context import Context
from compress.errors import NothingToDo
from compress.eval.runners import OrtRunner
from compress.export.onnx import fuse_for_onnxruntime, graph_runtime
from compress.export.verify import VERIFY_THREADS, reference_logits, verify_logits
from compress.recipe import OrtFuseStep


def run(artifact: Artifact, step: OrtFuseStep, ctx: Context) -> Artifact:
    started = time.perf_counter()
    evalset = ctx.eval_set(artifact.tokenizer).take(step.verify.samples)
    reference = reference_logits(OrtRunner(artifact.onnx_path, threads=VERIFY_THREADS), evalset)
    graph = ctx.stage_dir / GRAPH
    for path in graph_files(artifact.onnx_path):
        if path.resolve() != (ctx.stage_dir / path.name).resolve():  # `compress export --fuse` fuses in place
            shutil.copyfile(path, ctx.stage_dir / path.name)
    fusions = fuse_for_onnxruntime(graph, artifact.config)
    if not fusions:
        raise NothingToDo("ort-fuse: ONNX Runtime found no attention, layer-norm or GELU pattern to fuse in this "
                          "graph; leave the step out")
    checked = verify_logits(reference, OrtRunner(graph, threads=VERIFY_THREADS), evalset, step.verify)
    effect = {"fusions": fusions, "onnx_bytes": sum(path.stat().st_size for path in graph_files(graph)), **checked,
              "seconds": round(time.perf_counter() - started, 2)}
    kind = step.output_kind(artifact.kind).evolve(runtime=graph_runtime(graph))
    return artifact.evolve(step_record(step, **effect), onnx_path=graph, kind=kind)
