"""Quantization-aware training: fake-quantize the Linear layers, start the activation ranges from calibration
rows, then train on the task loss, distilled by default from the model before QAT."""

from __future__ import annotations

import copy
from typing import Any

from compress.algos.fake_quant import input_ranges, quantizable_linears, quantize_linears
from compress.algos.students import same_vocabulary
from compress.arch import TASKS
from compress.artifact import Artifact, step_record
from compress.context import Context
from compress.errors import NothingToDo, RecipeError
from compress.passes.distill import distill_loss, objective
from compress.plan import StepRejects
from compress.recipe import QATStep
from compress.train import default_loss, freeze_embeddings, scores_on, train, trainability_kept


def run(artifact: Artifact, step: QATStep, ctx: Context) -> Artifact:
    try:
        kind = step.output_kind(artifact.kind)
    except StepRejects as why:
        raise RecipeError(f"qat: {why}") from None
    model = copy.deepcopy(artifact.model).train()  # the input stays float: it is the default teacher
    names = quantizable_linears(model, step.keep_fp32)
    if not names:
        raise NothingToDo(f"qat: keep_fp32 {step.keep_fp32} leaves no Linear layer to quantize")
    batches = ctx.calibration(artifact.tokenizer, step.calibration.samples, step.calibration.batch_size, "qat")
    quantize_linears(model, names, step.per_channel, input_ranges(model, names, batches))
    teacher = None if step.distill_from == "none" else _teacher(artifact, step, ctx)
    validation = ctx.validation_set(artifact.tokenizer)
    scored = validation.labels is not None or validation.target_mask is not None
    with trainability_kept(model):
        frozen = freeze_embeddings(model) if step.freeze_embeddings else 0
        summary = train(model, ctx.train_loader(artifact.tokenizer, step.batch_size), step,
                        seed=step.seed_or(ctx.seed),
                        loss_fn=default_loss if teacher is None else _distilled(step, model, teacher),
                        evaluate=scores_on(validation, progress=not ctx.quiet) if scored else None,
                        desc="qat", quiet=ctx.quiet, checkpoint_dir=ctx.checkpoint_dir)
    effect = {"quantized_linears": len(names), "kept_fp32": len(quantizable_linears(artifact.model)) - len(names),
              "weights": "int8 symmetric " + ("per-channel" if step.per_channel else "per-tensor"),
              "activations": "uint8 asymmetric per-tensor", "calibration_rows": rows_in(batches),
              "distilled_from": step.distill_from, "frozen_parameters": frozen,
              "metric": TASKS[artifact.task].metric, "evals_on": "validation", **summary}
    model = model.to(ctx.device).eval()
    return artifact.evolve(step_record(step, **effect), model=model, kind=kind)


def rows_in(batches: list[dict[str, Any]]) -> int:
    return sum(len(batch["input_ids"]) for batch in batches)


def _teacher(artifact: Artifact, step: QATStep, ctx: Context) -> Any:
    source = ctx.model(step.distill_from)
    if source.model is None or not source.kind.is_float:
        raise RecipeError(f"qat.distill_from: {step.distill_from} is {source.kind.describe()}; distil from a "
                          "float torch model")
    if not same_vocabulary(source.tokenizer, artifact.tokenizer):
        raise RecipeError(f"qat.distill_from: {step.distill_from} has another vocabulary than the model it teaches")
    return source.model.eval()


def _distilled(step: QATStep, model: Any, teacher: Any) -> Any:
    return objective(distill_loss(step, model, teacher), teacher)
