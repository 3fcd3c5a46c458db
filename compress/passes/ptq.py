"""Post-training dynamic int8 quantization of the ONNX graph, judged by the task metric against its input."""

from __future__ import annotations

import time

from compress.arch import TASKS
from compress.artifact import GRAPH, Artifact, step_record
from compress.context import Context
from compress.errors import NothingToDo
from compress.eval.metrics import evaluate
from compress.eval.runners import OrtRunner
from compress.export.onnx import graph_runtime
from compress.export.quantize import quantize_dynamic_int8
from compress.export.verify import VERIFY_THREADS, verify_quantized
from compress.recipe import PTQStep


def run(artifact: Artifact, step: PTQStep, ctx: Context) -> Artifact:
    started = time.perf_counter()
    source, target = artifact.onnx_path, ctx.stage_dir / GRAPH
    reduce_range = step.resolved_reduce_range()
    quantized = quantize_dynamic_int8(source, target, step.per_channel, reduce_range, step.keep_fp32,
                                      artifact.kind.external_data)
    if not quantized["int8_weights"]:
        raise NothingToDo(f"ptq: no weight was quantized (keep_fp32 {step.keep_fp32} kept "
                          f"{quantized['kept_fp32_nodes']} nodes in fp32); a graph labelled int8 must hold int8 weights")
    evalset = ctx.eval_set(artifact.tokenizer).take(step.verify.samples)
    before = evaluate(OrtRunner(source, threads=VERIFY_THREADS), evalset, progress=not ctx.quiet)
    after = evaluate(OrtRunner(target, threads=VERIFY_THREADS), evalset, progress=not ctx.quiet)
    measured = verify_quantized(before, after, evalset, step.verify, TASKS[artifact.task].higher_is_better)
    effect = {**quantized, "reduce_range": reduce_range, **measured,
              "seconds": round(time.perf_counter() - started, 2)}
    kind = step.output_kind(artifact.kind).evolve(runtime=graph_runtime(target))
    return artifact.evolve(step_record(step, **effect), onnx_path=target, kind=kind)
