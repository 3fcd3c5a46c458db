"""Training hooks for sparsity, driven in the order the training loop calls them."""

from __future__ import annotations

from itertools import pairwise

import torch
from torch import nn

from compress.algos.masking import GradualMagnitude, HoldMasks, L1Penalty, held_zeros
from compress.settings import GradualSchedule
from compress.train import Callback
from tests.algos.conftest import layers, train_steps


def test_held_masks_survive_adamw_with_weight_decay():
    modules = layers()
    masks = {name: torch.rand_like(m.weight) > 0.5 for name, m in modules.items()}
    for name, module in modules.items():
        module.weight.data *= masks[name]
    train_steps(modules, [HoldMasks(modules, masks)], 20)
    for name, module in modules.items():
        assert (module.weight[~masks[name]] == 0).all()
        assert (module.weight[masks[name]] != 0).all()


def test_held_zeros_finds_the_zeros_a_model_has():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    model[0].weight.data[0, :2] = 0
    hold = held_zeros(model)
    assert list(hold.modules) == ["0"] and int((~hold.masks["0"]).sum()) == 2


def test_gradual_magnitude_rises_along_the_schedule_to_the_target():
    modules = layers()
    seen = []

    class Watch(Callback):
        def on_step_end(self, state, model):
            seen.append(sum(int((m.weight == 0).sum()) for m in modules.values()))

    schedule = GradualSchedule(start=0.2, end=0.8, every=2)
    train_steps(modules, [GradualMagnitude(modules, 0.75, "per_layer", schedule), Watch()], 20)
    total = sum(m.weight.numel() for m in modules.values())
    assert seen[2] == 0 and seen[-1] == round(0.75 * 48) + round(0.75 * 24) == round(0.75 * total)
    assert all(b >= a for a, b in pairwise(seen))  # pruned weights never come back
    assert seen[9] > 0.5 * seen[-1]  # cubic: most of the pruning happens early


def test_l1_penalty_shrinks_the_weights():
    plain, penalised = layers(), layers()
    train_steps(plain, [], 15)
    train_steps(penalised, [L1Penalty(penalised, 5.0)], 15)
    assert penalised["a"].weight.abs().sum() < plain["a"].weight.abs().sum()
