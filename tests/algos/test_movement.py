"""Movement pruning's scores, schedule and end state, driven in the order the training loop calls its hooks."""

from __future__ import annotations

import torch
from torch import nn

from compress.algos.movement import Movement
from compress.settings import GradualSchedule
from compress.train import TrainState
from tests.algos.conftest import layers, train_steps


def test_movement_ends_at_the_target_with_plain_weights_and_resumes_its_scores():
    modules = layers()
    movement = Movement(modules, 0.5, "hard", GradualSchedule(end=0.5), lr=0.05, lam=0.0)
    assert hasattr(modules["a"], "parametrizations")
    train_steps(modules, [movement], 12)
    for module in modules.values():
        assert not hasattr(module, "parametrizations") and isinstance(module.weight, nn.Parameter)
        assert int((module.weight == 0).sum()) == module.weight.numel() // 2
    again = Movement(layers(), 0.5, "hard", GradualSchedule(), lr=0.05, lam=0.0)
    again.load_state_dict(movement.state_dict())
    assert all(torch.equal(again.parts[name].scores, movement.parts[name].scores) for name in modules)


def test_movement_scores_grow_where_training_pushes_weights_away_from_zero():
    torch.manual_seed(0)
    layer = nn.Linear(4, 1, bias=False)
    layer.weight.data = torch.tensor([[0.5, 0.5, -0.5, 0.1]])
    movement = Movement({"w": layer}, 0.5, "hard", GradualSchedule(start=0.9, end=0.95), lr=0.1, lam=0.0)
    state = TrainState(total_steps=100)
    for _ in range(5):  # the loss rewards the first weight growing and the second shrinking
        movement.on_batch_start(state, {})
        (-layer.weight[0, 0] + layer.weight[0, 1]).backward()
        movement.on_after_backward(state, None)
    scores = movement.parts["w"].scores[0]
    assert scores[0] > 0 > scores[1]


def test_movement_finds_a_planted_sparse_solution_from_a_dense_start():
    torch.manual_seed(0)
    true = torch.randn(8, 64) * (torch.rand(8, 64) > 0.5)
    layer = nn.Linear(64, 8, bias=False)
    layer.weight.data = true + 0.3 * torch.randn(8, 64)  # every weight starts off its target
    movement = Movement({"w": layer}, 0.5, "hard", GradualSchedule(start=0.1, end=0.7), lr=0.01, lam=0.0)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.05)
    state = TrainState(total_steps=300)
    for _ in range(300):
        x = torch.randn(64, 64)
        movement.on_batch_start(state, {})
        ((layer(x) - x @ true.T) ** 2).mean().backward()
        movement.on_after_backward(state, None)
        optimizer.step()
        optimizer.zero_grad()
        state.step += 1
    movement.on_train_end(state, None)
    kept, support = layer.weight != 0, true != 0
    assert (kept & support).sum() > 0.85 * support.sum() and (kept & ~support).sum() < 0.15 * (~support).sum()
