"""Training after a compression step (QAT, pruning): on the task data, distilled by default from the model as it
was before the step (`distill_from`), scored on the validation split after each epoch."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from compress.algos.masking import held_zeros
from compress.algos.students import same_vocabulary
from compress.arch import TASKS
from compress.artifact import Artifact
from compress.context import Context
from compress.errors import RecipeError
from compress.passes.distill import distill_loss, objective
from compress.settings import RecoverSettings
from compress.train import Callback, default_loss, freeze_embeddings, scores_on, train, trainability_kept


def recover(model: Any, artifact: Artifact, settings: RecoverSettings, ctx: Context, field: str,
            callbacks: Sequence[Callback] = (), phase: str | None = None) -> dict[str, Any]:
    """Train `model` in place; `artifact` is the step's input; `field` names the settings in errors
    ('qat', 'prune.recover'); a step that trains more than once names each `phase` (its checkpoints' own
    directory). Returns what the training did, for the step's record."""
    if artifact.kind.sparsity:  # the zeros a sparse input came with stay zeros
        callbacks = [held_zeros(model), *callbacks]
    loss_fn = default_loss
    if settings.distill_from != "none":
        teacher = teacher_model(artifact, settings.distill_from, ctx, field)
        loss_fn = objective(distill_loss(settings, model, teacher), teacher)
    validation = ctx.validation_set(artifact.tokenizer)
    scored = validation.labels is not None or validation.target_mask is not None
    desc = field.split(".")[0]
    with trainability_kept(model):
        frozen = freeze_embeddings(model) if settings.freeze_embeddings else 0
        summary = train(model, ctx.train_loader(artifact.tokenizer, settings.batch_size), settings,
                        seed=settings.seed_or(ctx.seed), loss_fn=loss_fn, callbacks=callbacks,
                        evaluate=scores_on(validation, progress=not ctx.quiet) if scored else None,
                        desc=desc if phase is None else f"{desc} ({phase})", quiet=ctx.quiet,
                        checkpoint_dir=ctx.checkpoint_dir / phase if ctx.checkpoint_dir and phase else
                        ctx.checkpoint_dir)
    return {"distilled_from": settings.distill_from, "frozen_parameters": frozen,
            "metric": TASKS[artifact.task].metric, "evals_on": "validation", **summary}


def teacher_model(artifact: Artifact, ref: str, ctx: Context, field: str) -> Any:
    source = ctx.model(ref)
    if source.model is None or not source.kind.is_float:
        raise RecipeError(f"{field}.distill_from: {ref} is {source.kind.describe()}; distil from a float torch "
                          "model")
    if not same_vocabulary(source.tokenizer, artifact.tokenizer):
        raise RecipeError(f"{field}.distill_from: {ref} has another vocabulary than the model it teaches")
    return source.model.eval()
