"""Models for the pruning tests (width 32, 4 heads of width 8, 64 FFN neurons, 3 blocks), and a loop that
drives training hooks the way `train` does."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from compress.train import TrainState


def variant(model, **changes):
    """A seeded random model of `model`'s class with config fields `changes`, weights large enough (init 0.2)
    that every unit visibly moves the logits."""
    config = copy.deepcopy(model.config)
    config.initializer_range = 0.2
    for name, value in changes.items():
        setattr(config, name, value)
    torch.manual_seed(0)
    return type(model)(config).eval()


@pytest.fixture(scope="session")
def bert(tiny_classifier):
    """(model, tokenizer): shared, copy it before changing it."""
    model, tokenizer = tiny_classifier
    return variant(model, num_hidden_layers=3, num_attention_heads=4), tokenizer


@pytest.fixture(scope="session")
def llama(tiny_causal_lm):
    """(model, tokenizer), 4 query heads in 2 key-value groups: shared, copy it before changing it."""
    model, tokenizer = tiny_causal_lm
    return variant(model, num_hidden_layers=3), tokenizer


def layers(seed=0):
    torch.manual_seed(seed)
    return {"a": nn.Linear(8, 6), "b": nn.Linear(6, 4)}


def train_steps(modules, callbacks, steps):
    """What `train` does per optimizer step: batch start, forward, extra losses, backward, hooks, AdamW step."""
    parameters = [p for module in modules.values() for p in module.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=0.05, weight_decay=0.5)
    state = TrainState(total_steps=steps)
    for _ in range(steps):
        x = torch.randn(16, 8)
        for callback in callbacks:
            callback.on_batch_start(state, {})
        loss = modules["b"](torch.relu(modules["a"](x))).pow(2).mean() - modules["a"](x).abs().mean()
        loss = sum((extra for c in callbacks if (extra := c.extra_loss(state, None)) is not None), loss)
        loss.backward()
        for callback in callbacks:
            callback.on_after_backward(state, None)
        optimizer.step()
        optimizer.zero_grad()
        state.step += 1
        for callback in callbacks:
            callback.on_step_end(state, None)
    for callback in callbacks:
        callback.on_train_end(state, None)
    return state
