"""Fine-tune the torch model on the task: a new classification head, or causal LM on the training text."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader

from compress.arch import TASKS, family
from compress.artifact import Artifact, step_record
from compress.context import Context
from compress.data import lm_token_ids
from compress.eval.metrics import evaluate
from compress.eval.runners import TorchRunner
from compress.recipe import FinetuneStep
from compress.train import TrainConfig, train


def run(artifact: Artifact, step: FinetuneStep, ctx: Context) -> Artifact:
    model = artifact.model
    frozen = freeze_embeddings(model) if step.freeze_embeddings else 0
    loader = training_loader(artifact, step, ctx)
    eval_set = ctx.eval_set(artifact.tokenizer)

    def evaluate_epoch(trained: torch.nn.Module) -> dict[str, float]:
        result = evaluate(TorchRunner(trained), eval_set, progress=not ctx.quiet)
        return {result.name: result.value}

    cfg = TrainConfig(step.epochs, step.lr, step.weight_decay, step.warmup_ratio, ctx.seed, step.max_steps)
    summary = train(model, loader, cfg, evaluate=evaluate_epoch, quiet=ctx.quiet)
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    metric = TASKS[artifact.task].metric
    return artifact.evolve(step_record(step, frozen_parameters=frozen, metric=metric, **summary), model=model.eval())


def freeze_embeddings(model: torch.nn.Module) -> int:
    module = model.base_model
    for attr in family(model.config.model_type).embeddings.split("."):
        module = getattr(module, attr)
    params = list(module.parameters())
    for parameter in params:
        parameter.requires_grad_(False)
    return sum(p.numel() for p in params)


def training_loader(artifact: Artifact, step: FinetuneStep, ctx: Context) -> DataLoader:
    tokenizer, table, max_length = artifact.tokenizer, ctx.data.train, ctx.recipe.data.max_length
    generator = torch.Generator().manual_seed(ctx.seed)
    if artifact.task == "causal-lm":
        ids = torch.tensor(lm_token_ids(table["text"], tokenizer))
        blocks = ids[: len(ids) // max_length * max_length].view(-1, max_length)
        rows = [{"input_ids": b, "attention_mask": torch.ones_like(b), "labels": b} for b in blocks]
        return DataLoader(rows, batch_size=step.batch_size, shuffle=True, generator=generator)
    from transformers import DataCollatorWithPadding

    pairs = list(table["text_pair"]) if "text_pair" in table.column_names else None
    encoded = tokenizer(list(table["text"]), pairs, truncation=True, max_length=max_length)
    rows = [{**{k: v[i] for k, v in encoded.items()}, "labels": label} for i, label in enumerate(list(table["label"]))]
    return DataLoader(rows, batch_size=step.batch_size, shuffle=True, generator=generator,
                      collate_fn=DataCollatorWithPadding(tokenizer))
