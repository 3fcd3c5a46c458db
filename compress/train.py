"""The one training loop (on accelerate): fine-tuning uses it now; distillation, recovery and QAT reuse it
by passing their own `loss_fn`."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm


@dataclass(frozen=True)
class TrainConfig:
    epochs: int
    lr: float
    weight_decay: float
    warmup_ratio: float
    seed: int
    max_steps: int | None = None


def default_loss(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(**batch).loss


def train(
    model: Any,
    loader: Any,
    cfg: TrainConfig,
    evaluate: Callable[[Any], dict[str, float]] | None = None,
    loss_fn: Callable[[Any, dict[str, torch.Tensor]], torch.Tensor] = default_loss,
    quiet: bool = False,
) -> dict[str, Any]:
    """AdamW with linear warm-up then linear decay; `evaluate(model)` after each epoch."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from transformers import get_linear_schedule_with_warmup

    set_seed(cfg.seed)
    accelerator = Accelerator()
    trainable = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in trainable if p.ndim >= 2]  # no weight decay on biases and norms
    rest = [p for p in trainable if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}], lr=cfg.lr
    )
    total = len(loader) * cfg.epochs
    if cfg.max_steps:
        total = min(total, cfg.max_steps)
    scheduler = get_linear_schedule_with_warmup(optimizer, math.ceil(total * cfg.warmup_ratio), total)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)

    evals, losses, samples, step = [], [], 0, 0
    started = time.perf_counter()
    bar = tqdm(total=total, desc="finetune", unit="step", disable=quiet)
    for epoch in range(cfg.epochs):
        model.train()
        for batch in loader:
            loss = loss_fn(model, batch)
            accelerator.backward(loss)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            step += 1
            samples += len(batch["input_ids"])
            losses.append(loss.item())
            bar.update()
            bar.set_postfix(loss=f"{losses[-1]:.4f}", samples_per_s=f"{samples / (time.perf_counter() - started):.1f}")
            if step >= total:
                break
        model.eval()
        if evaluate is not None:
            evals.append({"epoch": epoch + 1, **evaluate(accelerator.unwrap_model(model))})
            bar.write(f"epoch {epoch + 1}: " + ", ".join(f"{k} {v:.4f}" for k, v in evals[-1].items() if k != "epoch"))
        if step >= total:
            break
    bar.close()
    seconds = time.perf_counter() - started
    tail = losses[-max(1, len(losses) // 10):]
    return {
        "steps": step,
        "samples": samples,
        "seconds": round(seconds, 2),
        "samples_per_s": round(samples / seconds, 2),
        "final_loss": round(sum(tail) / len(tail), 4),
        "evals": evals,
    }
