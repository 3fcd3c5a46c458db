"""Training hooks that keep pruned weights at zero, and those that choose them while the model trains:
gradual magnitude (Zhu & Gupta 2017) and an L1 penalty. Movement pruning has its own module (movement.py)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from compress.algos.sparsity import Masks, apply_masks, cubic_sparsity, ranked_masks, zero_masks
from compress.settings import GradualSchedule
from compress.train import Callback, TrainState


class HoldMasks(Callback):
    """Weights outside their masks stay zero through training: their gradients are zeroed before the optimizer
    step, and the weights again after it (AdamW's decoupled weight decay and its moments could move them)."""

    def __init__(self, modules: dict[str, nn.Module], masks: Masks) -> None:
        self.modules, self.masks = modules, masks

    def on_after_backward(self, state: TrainState, model: Any) -> None:
        for name, module in self.modules.items():
            if module.weight.grad is not None:
                module.weight.grad.mul_(self._mask(name, module))

    def on_step_end(self, state: TrainState, model: Any) -> None:
        self._zero_outside()

    def _zero_outside(self) -> None:
        apply_masks(self.modules, {name: self._mask(name, module) for name, module in self.modules.items()})

    def _mask(self, name: str, module: nn.Module) -> torch.Tensor:
        mask = self.masks[name]
        if mask.device != module.weight.device:  # the loop moved the model to its device
            mask = self.masks[name] = mask.to(module.weight.device)
        return mask

    def state_dict(self) -> dict[str, Any]:
        return {"masks": {name: mask.cpu() for name, mask in self.masks.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.masks = dict(state["masks"])
        self._zero_outside()


def held_zeros(model: Any) -> HoldMasks:
    """Keeps the zeros the weight matrices have now (Linear, embedding, QAT's fake-quant Linear), wherever
    there are some: a sparse model trained further (recovery, distillation, QAT) stays as sparse."""
    modules = {name: module for name, module in model.named_modules()
               if (weight := module._parameters.get("weight")) is not None and weight.ndim == 2
               and not bool(weight.detach().all())}
    return HoldMasks(modules, zero_masks(modules))


class GradualMagnitude(HoldMasks):
    """Every `schedule.every` steps the smallest weights are zeroed up to the cubic schedule's sparsity for that
    step; pruned weights are held at zero in between, so the mask only grows. The last step reaches `final`."""

    def __init__(self, modules: dict[str, nn.Module], final: float, ranking: str, schedule: GradualSchedule) -> None:
        super().__init__(modules, zero_masks(modules))
        self.final, self.ranking, self.schedule = final, ranking, schedule

    def on_step_end(self, state: TrainState, model: Any) -> None:
        if state.step % self.schedule.every == 0 or state.step == state.total_steps:
            target = cubic_sparsity(state.step, state.total_steps, self.final, self.schedule.start,
                                    self.schedule.end)
            scores = {name: module.weight.detach().abs() for name, module in self.modules.items()}
            self.masks = ranked_masks(scores, target, self.ranking)
        super().on_step_end(state, model)


class L1Penalty(Callback):
    """Adds `lam` x the mean |w| over the selected weights to each micro-batch's loss, pulling the weights the
    task needs least toward zero before the threshold cuts them."""

    def __init__(self, modules: dict[str, nn.Module], lam: float) -> None:
        self.modules, self.lam = modules, lam
        self.count = sum(module.weight.numel() for module in modules.values())

    def extra_loss(self, state: TrainState, model: Any) -> torch.Tensor:
        total = sum(module.weight.abs().sum() for module in self.modules.values())
        return self.lam * total / self.count
