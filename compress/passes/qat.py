"""Quantization-aware training: fake-quantize the Linear layers, start the activation ranges from calibration
rows, then train on the task loss, distilled by default from the model before QAT."""

from __future__ import annotations

import copy
from typing import Any

from compress.algos.fake_quant import input_ranges, quantizable_linears, quantize_linears
from compress.algos.fake_quant_embedding import (
    FITTED_BITS,
    bits_by_table,
    quantizable_embeddings,
    quantize_embeddings,
)
from compress.artifact import Artifact, step_record
from compress.context import Context
from compress.errors import NothingToDo, RecipeError
from compress.passes.recovery import recover
from compress.plan import StepRejects
from compress.recipe import QATStep


def run(artifact: Artifact, step: QATStep, ctx: Context) -> Artifact:
    try:
        kind = step.output_kind(artifact.kind)
    except StepRejects as why:
        raise RecipeError(f"qat: {why}") from None
    model = copy.deepcopy(artifact.model).train()  # the input stays float: it is the default teacher
    names = quantizable_linears(model, step.keep_fp32)
    if not names:
        raise NothingToDo(f"qat: keep_fp32 {step.keep_fp32} leaves no Linear layer to quantize")
    tables = ({} if step.embedding_bits is None else
              bits_by_table(quantizable_embeddings(model, step.keep_fp32), step.embedding_bits))
    batches = ctx.calibration(artifact.tokenizer, step.calibration.samples, step.calibration.batch_size, "qat")
    quantize_linears(model, names, step.per_channel, input_ranges(model, names, batches))
    quantize_embeddings(model, tables)
    summary = recover(model, artifact, step, ctx, "qat")
    effect = {"quantized_linears": len(names), "kept_fp32": len(quantizable_linears(artifact.model)) - len(names),
              "quantized_embeddings": {name: row_format(bits) for name, bits in tables.items()},
              "weights": "int8 symmetric " + ("per-channel" if step.per_channel else "per-tensor"),
              "activations": "uint8 asymmetric per-tensor", "calibration_rows": rows_in(batches), **summary}
    model = model.to(ctx.device).eval()
    return artifact.evolve(step_record(step, **effect), model=model, kind=kind)


def row_format(bits: int) -> str:
    return "3-bit fitted levels per row" if bits == FITTED_BITS else f"int{bits} per row"


def rows_in(batches: list[dict[str, Any]]) -> int:
    return sum(len(batch["input_ids"]) for batch in batches)
