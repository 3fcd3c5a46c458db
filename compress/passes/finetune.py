"""Fine-tune the torch model on the task: a new classification head, or causal LM on the training text."""

from __future__ import annotations

from compress.algos.masking import held_zeros
from compress.arch import TASKS
from compress.artifact import Artifact, step_record
from compress.context import Context
from compress.recipe import FinetuneStep
from compress.train import freeze_embeddings, scores_on, train, trainability_kept


def run(artifact: Artifact, step: FinetuneStep, ctx: Context) -> Artifact:
    model = artifact.model
    with trainability_kept(model):
        frozen = freeze_embeddings(model) if step.freeze_embeddings else 0
        summary = train(
            model,
            ctx.train_loader(artifact.tokenizer, step.batch_size),
            step,
            seed=step.seed_or(ctx.seed),
            # Per-epoch scores come from the withheld validation rows: the eval split is the reported metric.
            evaluate=scores_on(ctx.validation_set(artifact.tokenizer), progress=not ctx.quiet),
            desc="finetune",
            quiet=ctx.quiet,
            checkpoint_dir=ctx.checkpoint_dir,
            callbacks=[held_zeros(model)] if artifact.kind.sparsity else [],  # a sparse model stays sparse
        )
    metric = TASKS[artifact.task].metric
    effect = {"frozen_parameters": frozen, "metric": metric, "evals_on": "validation", **summary}
    return artifact.evolve(step_record(step, **effect), model=model.to(ctx.device).eval())
