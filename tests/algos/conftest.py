"""Models for the structured-pruning tests: width 32, 4 heads of width 8, 64 FFN neurons, 3 blocks."""

from __future__ import annotations

import copy

import pytest
import torch


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
