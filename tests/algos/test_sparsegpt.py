"""Wanda and SparseGPT on one layer: exact sparsity, N:M, and SparseGPT's weight update paying off."""

from __future__ import annotations

import pytest
import torch

from compress.algos.sparsegpt import sparsegpt, split, wanda
from compress.algos.sparsity import ranked_masks


def correlated_inputs(tokens=512, width=32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(tokens, 8, generator=generator)
    mix = torch.randn(8, width, generator=generator)
    scale = torch.linspace(0.1, 3.0, width)  # features of very different sizes: Wanda's point
    return (base @ mix + 0.1 * torch.randn(tokens, width, generator=generator)) * scale


def output_error(x, weight, pruned):
    return float(((x @ weight.T - x @ pruned.T) ** 2).mean())


@pytest.mark.parametrize("sparsity", [0.5, 0.61])
def test_both_hit_the_target_exactly(sparsity):
    x, weight = correlated_inputs(), torch.randn(24, 32)
    mask = wanda(weight, (x * x).sum(0), sparsity, None)
    assert int((~mask).sum()) == round(sparsity * weight.numel())
    pruned, kept = sparsegpt(weight, x.T @ x, sparsity, None, block=8)
    assert int((pruned == 0).sum()) == int((~kept).sum()) == round(sparsity * weight.numel())


def test_nm_patterns_hold_in_every_group():
    x, weight = correlated_inputs(), torch.randn(24, 32)
    for mask in (wanda(weight, (x * x).sum(0), 0.5, (2, 4)), sparsegpt(weight, x.T @ x, 0.5, (2, 4))[1]):
        assert (mask.view(24, 8, 4).sum(-1) == 2).all()


def test_wanda_weighs_weights_by_their_inputs_and_beats_magnitude_on_the_output():
    x, weight = correlated_inputs(), torch.randn(24, 32)
    by_magnitude = weight * ranked_masks({"w": weight.abs()}, 0.5, "per_layer")["w"]
    by_wanda = weight * wanda(weight, (x * x).sum(0), 0.5, None)
    assert output_error(x, weight, by_wanda) < output_error(x, weight, by_magnitude)


def test_sparsegpt_updates_the_kept_weights_and_reconstructs_better_than_wanda():
    x, weight = correlated_inputs(), torch.randn(24, 32)
    by_wanda = weight * wanda(weight, (x * x).sum(0), 0.5, None)
    pruned, kept = sparsegpt(weight, x.T @ x, 0.5, None)
    assert not torch.equal(pruned[kept], weight[kept])  # the survivors absorb the pruned weights' error
    assert output_error(x, weight, pruned) < 0.7 * output_error(x, weight, by_wanda)


def test_across_column_blocks_the_update_still_beats_the_bare_mask():
    x, weight = correlated_inputs(), torch.randn(24, 32)
    pruned, kept = sparsegpt(weight, x.T @ x, 0.5, None, block=8)
    assert output_error(x, weight, pruned) < 0.7 * output_error(x, weight, weight * kept)


def test_sparsegpt_survives_inputs_that_are_always_zero():
    x = correlated_inputs()
    x[:, 3] = 0
    pruned, _ = sparsegpt(torch.randn(8, 32), x.T @ x, 0.5, None)
    assert torch.isfinite(pruned).all()


def test_split_shares_a_total_exactly_in_proportion():
    assert split(10, [128, 128, 64]) == [4, 4, 2]
    assert sum(split(157, [128, 128, 100])) == 157
