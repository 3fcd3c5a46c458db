"""Post-training dynamic int8 quantization of the ONNX graph, judged by the task metric against its input."""

from __future__ import annotations

import time

from compress.arch import TASKS
from compress.artifact import GRAPH, Artifact, step_record
from compress.context import Context
from compress.errors import ArtifactError
from compress.eval.metrics import evaluate
from compress.eval.runners import OrtRunner
from compress.export.quantize import quantize_dynamic_int8
from compress.export.verify import verify_quantized
from compress.recipe import PTQStep

EVAL_THREADS = 2


def run(artifact: Artifact, step: PTQStep, ctx: Context) -> Artifact:
    started = time.perf_counter()
    if artifact.onnx_path is None:
        raise ArtifactError("ptq needs an ONNX graph; add an 'export' step before it")
    source, target = artifact.onnx_path, ctx.stage_dir / GRAPH
    quantized = quantize_dynamic_int8(source, target, step.per_channel, step.reduce_range, step.keep_fp32)
    evalset = ctx.eval_set(artifact.tokenizer).take(step.verify.samples)
    before = evaluate(OrtRunner(source, threads=EVAL_THREADS), evalset, progress=not ctx.quiet)
    after = evaluate(OrtRunner(target, threads=EVAL_THREADS), evalset, progress=not ctx.quiet)
    measured = verify_quantized(before, after, evalset, step.verify, TASKS[artifact.task].higher_is_better)
    effect = {**quantized, **measured, "seconds": round(time.perf_counter() - started, 2)}
    return artifact.evolve(step_record(step, **effect), model=None, onnx_path=target, precision="int8")
