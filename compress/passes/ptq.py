"""Post-training quantization of the ONNX graph (dynamic, static, weight-only, fp16), judged by the task metric
against its input graph."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

import numpy as np

from compress.algos.sensitivity import keep_in_float, kl_divergence, rank_layers
from compress.arch import TASKS, is_text_stream
from compress.artifact import GRAPH, Artifact, step_record
from compress.context import Context
from compress.errors import ExportMismatch, NothingToDo
from compress.eval.metrics import evaluate, metric_drop
from compress.eval.runners import OrtRunner
from compress.evalset import EvalSet
from compress.export.onnx import graph_runtime
from compress.export.quantize import (
    DYNAMIC_WEIGHTS,
    EMBEDDING_OPS,
    quantizable_layers,
    quantize_dynamic_int8,
    resolved_weight_type,
)
from compress.export.verify import VERIFY_THREADS, verify_quantized
from compress.recipe import PTQ_FIELDS, PTQStep
from compress.sysinfo import machine_info

# Sensitivity quantizes each layer alone and scores it by the KL divergence of its outputs from the float graph's
# on this many validation rows (causal LM: tokens). KL moves with every layer where accuracy on a few rows would
# tie at zero, needs no labels, and one pass over them per layer keeps ~40 layers x a quantization cheap.
SENSITIVITY_ROWS = 128
DIVERGENCE_ROWS = 8  # rows the divergence finder runs both graphs on when a quantized graph fails verification
SENSITIVITY_TOKENS = 4096


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
    try:
        measured = verify_quantized(before, after, evalset, step.verify, TASKS[artifact.task].higher_is_better)
    except ExportMismatch as err:
        raise ExportMismatch(f"{err}; {_where(source, target, evalset)}") from None
    effect = {**quantized, **measured, "seconds": round(time.perf_counter() - started, 2)}
    kind = step.output_kind(artifact.kind).evolve(runtime=graph_runtime(target))
    return artifact.evolve(step_record(step, **effect), onnx_path=target, kind=kind)


def _dynamic(source: Path, target: Path, step: PTQStep, artifact: Artifact, ctx: Context) -> dict[str, Any]:
    weight_type = resolved_weight_type(step.weight_type)

    def quantize(dst: Path, float_nodes: list[str]) -> dict[str, Any]:
        return quantize_dynamic_int8(source, dst, step.per_channel, step.resolved_reduce_range(), step.keep_fp32,
                                     artifact.kind.external_data, weight_type, step.quantize_embeddings, float_nodes)

    weights = {op: at for op, at in DYNAMIC_WEIGHTS.items() if step.quantize_embeddings or op not in EMBEDDING_OPS}
    with TemporaryDirectory(prefix="compress-ptq-") as scratch:
        layers = quantizable_layers(source, weights, step.keep_fp32)
        return _tuned(quantize, layers, Path(scratch), source, target, step, artifact, ctx) | _chosen_for(step)


def _static(source: Path, target: Path, step: PTQStep, artifact: Artifact, ctx: Context) -> dict[str, Any]:
    from compress.export.static import StaticInt8, auto_activation_type

    batches = ctx.calibration(artifact.tokenizer, step.calibration.samples, step.calibration.batch_size, "ptq static")
    activation_type = auto_activation_type() if step.activation_type == "auto" else step.activation_type
    with TemporaryDirectory(prefix="compress-ptq-") as scratch:
        quantizer = StaticInt8(source, Path(scratch), batches, step.calibration.method, step.calibration.percentile,
                               step.per_channel, step.resolved_reduce_range(), resolved_weight_type(step.weight_type),
                               activation_type, step.keep_fp32, step.quantize_embeddings, artifact.kind.external_data)
        return (_tuned(quantizer.quantize, quantizer.layers, Path(scratch), source, target, step, artifact, ctx)
                | _chosen_for(step))


def _where(source: Path, target: Path, evalset: Any) -> str:
    """Which value of the quantized graph first leaves the float graph's, on the first rows verified."""
    from compress.eval.divergence import first_graph_divergence

    found = first_graph_divergence(source, target, evalset.take(DIVERGENCE_ROWS).features)
    return found.describe() if found else "no single value is far off: the loss builds up across the layers"


def _chosen_for(step: PTQStep) -> dict[str, Any]:
    """Which settings were `auto`, and the instruction sets their values (in the effect) were chosen for."""
    auto = [name for name in ("weight_type", "activation_type", "reduce_range")
            if name in PTQ_FIELDS[step.mode] and getattr(step, name) == "auto"]
    return {"auto": auto, "chosen_for": machine_info()["isa"]} if auto else {}


def _tuned(quantize: Callable[[Path, list[str]], dict[str, Any]], layers: dict[str, str], scratch: Path,
           source: Path, target: Path, step: PTQStep, artifact: Artifact, ctx: Context) -> dict[str, Any]:
    """`quantize(target, float_nodes)`; with sensitivity or fallback, the layers are first ranked on validation
    rows, and fallback keeps the most sensitive in float until the validation metric is within its budget."""
    if not (step.sensitivity or step.fallback):
        return quantize(target, [])
    validation = ctx.validation_set(artifact.tokenizer)
    higher_is_better = TASKS[artifact.task].higher_is_better
    trial = scratch / "trial.onnx"

    def quantize_trial(float_nodes: list[str]) -> Path:
        quantize(trial, float_nodes)
        return trial

    measure = _layer_change(source, _sensitivity_rows(validation), higher_is_better)
    ranked = rank_layers(layers, quantize_trial, measure)
    tuned: dict[str, Any] = {"sensitivity": ranked}
    kept: list[str] = []
    if step.fallback:
        drop = _validation_drop(source, validation, higher_is_better, progress=not ctx.quiet)
        fallback = keep_in_float([row["node"] for row in ranked], quantize_trial, drop, step.fallback.max_drop,
                                 step.fallback.max_layers)
        kept = fallback.kept_float
        tuned["fallback"] = {"max_drop": step.fallback.max_drop, "validation_drop": fallback.drop,
                             "kept_float": [row for row in ranked if row["node"] in kept], "trials": fallback.trials}
    return quantize(target, kept) | tuned


def _sensitivity_rows(validation: EvalSet) -> EvalSet:
    if is_text_stream(validation.task):
        return validation.take(max(1, SENSITIVITY_TOKENS // validation.features["input_ids"].shape[1]))
    return validation.take(SENSITIVITY_ROWS)


def _layer_change(source: Path, rows: EvalSet, higher_is_better: bool) -> Callable[[Path], dict[str, float]]:
    """A graph's mean KL divergence from `source` (the score), and its metric drop, on `rows`."""
    reference = _Tap(OrtRunner(source, threads=VERIFY_THREADS))
    before = evaluate(reference, rows, progress=False).value

    def measure(graph: Path) -> dict[str, float]:
        tap = _Tap(OrtRunner(graph, threads=VERIFY_THREADS), reference.outputs)
        after = evaluate(tap, rows, progress=False).value
        return {"score": float(np.concatenate(tap.divergence).mean()),
                "metric_drop": metric_drop(before, after, higher_is_better)}

    return measure


def _validation_drop(source: Path, validation: EvalSet, higher_is_better: bool,
                     progress: bool) -> Callable[[Path], float]:
    before = evaluate(OrtRunner(source, threads=VERIFY_THREADS), validation, progress=progress).value

    def drop(graph: Path) -> float:
        after = evaluate(OrtRunner(graph, threads=VERIFY_THREADS), validation, progress=progress).value
        return metric_drop(before, after, higher_is_better)

    return drop


class _Tap:
    """Runs a graph for `evaluate` and keeps its logits, or, given a reference's, the KL divergence from them
    at every real position: one pass yields both the metric and the divergence."""

    format = "onnx"

    def __init__(self, runner: OrtRunner, reference: list[np.ndarray] | None = None) -> None:
        self.runner, self.reference = runner, None if reference is None else iter(reference)
        self.outputs: list[np.ndarray] = []
        self.divergence: list[np.ndarray] = []

    def logits(self, features: dict[str, np.ndarray]) -> np.ndarray:
        logits = self.runner.logits(features)
        if self.reference is None:
            self.outputs.append(logits)
        else:
            divergence = kl_divergence(next(self.reference), logits)
            real = features["attention_mask"].astype(bool) if divergence.ndim == 2 else slice(None)
            self.divergence.append(divergence[real])
        return logits


def _weight_only(source: Path, target: Path, step: PTQStep, artifact: Artifact, ctx: Context) -> dict[str, Any]:
    from compress.export.nbits import quantize_weight_only

    calibration = None
    if step.method == "gptq":
        calibration = ctx.calibration(artifact.tokenizer, step.calibration.samples, step.calibration.batch_size,
                                      "ptq weight-only gptq")
    return quantize_weight_only(source, target, bits=step.bits, method=step.method, block_size=step.block_size,
                                symmetric=step.symmetric, accuracy_level=step.accuracy_level,
                                keep_fp32=step.keep_fp32, quantize_embeddings=step.quantize_embeddings,
                                calibration=calibration, external_data=artifact.kind.external_data)


def _fp16(source: Path, target: Path, step: PTQStep, artifact: Artifact, ctx: Context) -> dict[str, Any]:
    from compress.export.fp16 import convert_fp16

    return convert_fp16(source, target, keep_fp32=step.keep_fp32, external_data=artifact.kind.external_data)


QUANTIZERS = {"dynamic": _dynamic, "static": _static, "weight-only": _weight_only, "fp16": _fp16}
