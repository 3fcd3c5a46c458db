"""Post-training quantization of the ONNX graph (dynamic, static, weight-only, fp16), judged by the task metric
against its input graph."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from compress.arch import TASKS
from compress.artifact import GRAPH, Artifact, step_record
from compress.context import Context
from compress.errors import NothingToDo
from compress.eval.metrics import evaluate
from compress.eval.runners import OrtRunner
from compress.export.onnx import graph_runtime
from compress.export.verify import VERIFY_THREADS, verify_quantized
from compress.recipe import PTQStep


def run(artifact: Artifact, step: PTQStep, ctx: Context) -> Artifact:
    started = time.perf_counter()
    source, target = artifact.onnx_path, ctx.stage_dir / GRAPH
    quantized = QUANTIZERS[step.mode](source, target, step, artifact, ctx)
    if step.mode != "fp16" and not quantized["quantized_weights"]:
        raise NothingToDo(f"ptq: no weight was quantized (keep_fp32 {step.keep_fp32} kept "
                          f"{quantized['kept_fp32_nodes']} nodes in float); a graph labelled "
                          f"{step.output_kind(artifact.kind).precision} must hold quantized weights")
    evalset = ctx.eval_set(artifact.tokenizer).take(step.verify.samples)
    before = evaluate(OrtRunner(source, threads=VERIFY_THREADS), evalset, progress=not ctx.quiet)
    after = evaluate(OrtRunner(target, threads=VERIFY_THREADS), evalset, progress=not ctx.quiet)
    measured = verify_quantized(before, after, evalset, step.verify, TASKS[artifact.task].higher_is_better)
    effect = {**quantized, **measured, "seconds": round(time.perf_counter() - started, 2)}
    kind = step.output_kind(artifact.kind).evolve(runtime=graph_runtime(target))
    return artifact.evolve(step_record(step, **effect), onnx_path=target, kind=kind)


def _dynamic(source: Path, target: Path, step: PTQStep, artifact: Artifact, ctx: Context) -> dict[str, Any]:
    from compress.export.quantize import quantize_dynamic_int8

    return quantize_dynamic_int8(source, target, step.per_channel, step.resolved_reduce_range(), step.keep_fp32,
                                 artifact.kind.external_data)


def _static(source: Path, target: Path, step: PTQStep, artifact: Artifact, ctx: Context) -> dict[str, Any]:
    raise NotImplementedError("ptq mode static")


def _weight_only(source: Path, target: Path, step: PTQStep, artifact: Artifact, ctx: Context) -> dict[str, Any]:
    from compress.export.nbits import quantize_weight_only

    calibration = None
    if step.method == "gptq":
        calibration = ctx.calibration(artifact.tokenizer, step.calibration.samples, step.calibration.batch_size)
    return quantize_weight_only(source, target, bits=step.bits, method=step.method, block_size=step.block_size,
                                symmetric=step.symmetric, accuracy_level=step.accuracy_level,
                                keep_fp32=step.keep_fp32, quantize_embeddings=step.quantize_embeddings,
                                calibration=calibration, external_data=artifact.kind.external_data)


def _fp16(source: Path, target: Path, step: PTQStep, artifact: Artifact, ctx: Context) -> dict[str, Any]:
    from compress.export.fp16 import convert_fp16

    return convert_fp16(source, target, keep_fp32=step.keep_fp32, external_data=artifact.kind.external_data)


QUANTIZERS = {"dynamic": _dynamic, "static": _static, "weight-only": _weight_only, "fp16": _fp16}
