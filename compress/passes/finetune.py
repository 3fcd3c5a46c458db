"""Fine-tune the torch model on the task: a new classification head, or causal LM on the training text."""

from __future__ import annotations

import torch

from compress.arch import TASKS, family
from compress.artifact import Artifact, step_record
from compress.context import Context
from compress.recipe import FinetuneStep
from compress.train import scores_on, train


def run(artifact: Artifact, step: FinetuneStep, ctx: Context) -> Artifact:
    model = artifact.model
    trainable_before = [(parameter, parameter.requires_grad) for parameter in model.parameters()]
    frozen = freeze_embeddings(model) if step.freeze_embeddings else 0
    summary = train(
        model,
        ctx.train_loader(artifact.tokenizer, step.batch_size),
        step,
        seed=ctx.seed,
        # Per-epoch scores come from the withheld validation rows: the eval split is the reported metric.
        evaluate=scores_on(ctx.validation_set(artifact.tokenizer), progress=not ctx.quiet),
        desc="finetune",
        quiet=ctx.quiet,
        checkpoint_dir=ctx.checkpoint_dir,
    )
    for parameter, requires_grad in trainable_before:
        parameter.requires_grad_(requires_grad)
    metric = TASKS[artifact.task].metric
    effect = {"frozen_parameters": frozen, "metric": metric, "evals_on": "validation", **summary}
    return artifact.evolve(step_record(step, **effect), model=model.to(ctx.device).eval())


def freeze_embeddings(model: torch.nn.Module) -> int:
    module = model.base_model
    for attr in family(model.config.model_type).embeddings.split("."):
        module = getattr(module, attr)
    params = list(module.parameters())
    for parameter in params:
        parameter.requires_grad_(False)
    return sum(p.numel() for p in params)
