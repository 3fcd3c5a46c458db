"""L0 gates: a hard-concrete gate on every head and FFN neuron (Louizos et al. 2018), trained with the model
under a Lagrangian penalty that drives the expected share of open units to a target (CoFi, Xia et al. 2022).

The target is approached linearly over the first `warmup` share of the steps. The gates and the two
multipliers have their own Adam optimizer: the gates descend the loss, the multipliers ascend it, so the
penalty grows until the expected size meets the target. The gates train for part of the recovery only
(CoFi prunes, then fine-tunes). Afterwards exactly the target share of units, the least open by `log_alphas`,
is removed, and the others' deterministic gate values in [0, 1] (`final_gates`) are folded into the weights.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from compress.train import Callback, TrainState

BETA, GAMMA, ZETA = 2 / 3, -0.1, 1.1  # temperature and stretch of the hard-concrete distribution
OPEN_BIAS = BETA * math.log(-GAMMA / ZETA)


class HardConcreteGates(nn.Module):
    """One log-alpha per unit, per block, per unit kind. `gate` samples while the model trains, and gives
    the deterministic value otherwise."""

    def __init__(self, units: dict[str, list[int]], init_open: float = 0.9) -> None:
        super().__init__()
        start = math.log(init_open / (1 - init_open)) + OPEN_BIAS  # P(open) of a fresh gate is init_open
        self.log_alpha = nn.ParameterDict({
            kind: nn.Parameter(torch.full((sum(units[kind]),), start)) for kind in units})
        self.splits = {kind: list(counts) for kind, counts in units.items()}

    def per_layer(self, kind: str, values: torch.Tensor) -> list[torch.Tensor]:
        return list(torch.split(values, self.splits[kind]))

    def gate(self, kind: str, layer: int, sample: bool) -> torch.Tensor | None:
        if kind not in self.log_alpha:
            return None
        log_alpha = self.per_layer(kind, self.log_alpha[kind])[layer]
        if sample:
            u = torch.rand_like(log_alpha).clamp(1e-6, 1 - 1e-6)
            s = torch.sigmoid((torch.log(u) - torch.log(1 - u) + log_alpha) / BETA)
        else:
            s = torch.sigmoid(log_alpha)
        return (s * (ZETA - GAMMA) + GAMMA).clamp(0, 1)

    def open_probability(self, kind: str) -> torch.Tensor:
        """P(gate > 0) per unit: differentiable, its sum is the expected number of open units."""
        return torch.sigmoid(self.log_alpha[kind] - OPEN_BIAS)

    def log_alphas(self, kind: str) -> list[torch.Tensor]:
        """Per block: how open each gate is, as a ranking score without the ties of gates clamped to 0 or 1."""
        return [values.detach().cpu() for values in self.per_layer(kind, self.log_alpha[kind])]

    def final_gates(self, kind: str) -> list[torch.Tensor]:
        with torch.no_grad():
            return [self.gate(kind, layer, sample=False).cpu() for layer in range(len(self.splits[kind]))]


class L0Penalty(Callback):
    """Adds lambda1 (s - t) + lambda2 (s - t)^2 per unit kind, s the expected share of open units and t its
    target share now; steps the gates and multipliers after each optimizer step."""

    def __init__(self, gates: HardConcreteGates, targets: dict[str, float], lr: float, warmup: float) -> None:
        self.gates, self.targets, self.warmup = gates, targets, warmup
        self.multipliers = nn.ParameterDict({kind: nn.Parameter(torch.zeros(2)) for kind in targets})
        for multiplier in self.multipliers.values():
            multiplier.register_hook(torch.neg)  # gradient ascent on the multipliers
        self.multipliers.to(next(gates.parameters()).device)
        self.optimizer = torch.optim.Adam([*gates.parameters(), *self.multipliers.parameters()], lr=lr)

    def target_now(self, kind: str, state: TrainState) -> float:
        ramp = min(1.0, state.step / max(1.0, self.warmup * state.total_steps)) if self.warmup else 1.0
        return 1 - ramp * (1 - self.targets[kind])

    def extra_loss(self, state: TrainState, model: Any) -> torch.Tensor:
        terms = []
        for kind in self.targets:
            gap = self.gates.open_probability(kind).mean() - self.target_now(kind, state)
            lambda1, lambda2 = self.multipliers[kind]
            terms.append(lambda1 * gap + lambda2 * gap * gap)
        return sum(terms)

    def on_step_end(self, state: TrainState, model: Any) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def expected_open(self) -> dict[str, float]:
        with torch.no_grad():
            return {kind: round(self.gates.open_probability(kind).mean().item(), 4) for kind in self.targets}

    def state_dict(self) -> dict[str, Any]:
        return {"gates": dict(self.gates.state_dict()), "multipliers": dict(self.multipliers.state_dict()),
                "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.gates.load_state_dict(state["gates"])
        self.multipliers.load_state_dict(state["multipliers"])
        optimizer = state["optimizer"]  # JSON turned the per-parameter state's integer keys into strings
        optimizer["state"] = {int(key): value for key, value in optimizer["state"].items()}
        self.optimizer.load_state_dict(optimizer)
