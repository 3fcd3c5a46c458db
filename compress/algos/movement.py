"""Movement pruning (Sanh, Wolf & Rush 2020): first-order importance learned while the model fine-tunes.

Each selected weight W gets a score S (from 0). The forward pass uses W * M(S), M the top scores at the cubic
schedule's sparsity for the step; the straight-through gradient gives dL/dS = dL/dW' * W, so weights moving
away from zero gain score and those shrinking toward it lose it. The scores follow plain gradient descent, so
S = -lr * sum over steps of dL/dW' * W: the paper's accumulated first-order score. (Adam, which normalises each
score's steps, ranked by the sign of the movement alone: at 50 % in one epoch MiniLM fell to chance.) W itself
keeps training where masked, so a weight can come back while the schedule still moves.

hard: each layer keeps its own top scores. soft: one threshold over all layers, and a penalty `lam` x the
mean sigmoid(S) that pushes scores down, so layers that need fewer weights give more. Both end on exactly the
target sparsity; the final masks are then made zeros and the parametrizations removed.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from compress.algos.sparsity import Masks, apply_masks, cubic_sparsity, ranked_masks
from compress.settings import GradualSchedule
from compress.train import Callback, TrainState


class MaskedByScores(nn.Module):
    """The parametrization: W -> W * mask, with the mask's gradient passed straight through to the scores."""

    def __init__(self, scores: torch.Tensor) -> None:
        super().__init__()
        self.scores = scores  # a plain tensor: trained by the callback's own optimizer, not the model's
        self.mask = torch.ones_like(scores, dtype=torch.bool)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        scores = self.scores.to(weight.device)
        straight_through = self.mask.to(weight.device, weight.dtype) + scores - scores.detach()
        return weight * straight_through


class Movement(Callback):
    def __init__(self, modules: dict[str, nn.Module], final: float, variant: str, schedule: GradualSchedule,
                 lr: float, lam: float) -> None:
        self.modules, self.final, self.variant, self.schedule, self.lam = modules, final, variant, schedule, lam
        self.ranking = "per_layer" if variant == "hard" else "global"
        self.parts = {}
        for name, module in modules.items():
            scores = torch.zeros_like(module.weight, dtype=torch.float32, requires_grad=True)
            self.parts[name] = MaskedByScores(scores)
            parametrize.register_parametrization(module, "weight", self.parts[name])
        self.optimizer = torch.optim.SGD([part.scores for part in self.parts.values()], lr=lr)

    def on_batch_start(self, state: TrainState, batch: Any) -> None:
        target = cubic_sparsity(state.step, state.total_steps, self.final, self.schedule.start, self.schedule.end)
        for name, mask in self.masks_at(target).items():
            self.parts[name].mask = mask

    def extra_loss(self, state: TrainState, model: Any) -> torch.Tensor | None:
        if self.variant != "soft":
            return None
        scores = [part.scores for part in self.parts.values()]
        return self.lam * sum(torch.sigmoid(s).sum() for s in scores) / sum(s.numel() for s in scores)

    def on_after_backward(self, state: TrainState, model: Any) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def on_train_end(self, state: TrainState, model: Any) -> None:
        """The final masks (at the target sparsity) as zeros in plain weights; the parametrizations go."""
        masks = self.masks_at(self.final)
        for module in self.modules.values():
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)
        apply_masks(self.modules, masks)

    def masks_at(self, sparsity: float) -> Masks:
        with torch.no_grad():
            return ranked_masks({name: part.scores for name, part in self.parts.items()}, sparsity, self.ranking)

    def state_dict(self) -> dict[str, Any]:
        return {"scores": {name: part.scores.detach().cpu() for name, part in self.parts.items()},
                "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        with torch.no_grad():
            for name, part in self.parts.items():
                part.scores.copy_(state["scores"][name])
        self.optimizer.load_state_dict(state["optimizer"])
