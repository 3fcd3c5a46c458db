"""Which weights unstructured pruning may touch, and masks with exact counts."""

from __future__ import annotations

from itertools import pairwise

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from compress.algos.sparsity import (
    cubic_sparsity,
    layer_sparsity,
    lowest,
    matrix,
    nm_mask,
    overall_sparsity,
    prunable,
    ranked_masks,
    row_masks,
)


def test_default_selection_is_every_linear_inside_the_blocks(bert):
    model, _ = bert
    names = list(prunable(model))
    assert len(names) == 3 * 6 and all(".encoder.layer." in name for name in names)
    assert not any("embeddings" in name or "classifier" in name or "pooler" in name for name in names)


def test_patterns_may_add_embeddings_and_the_head(bert):
    model, _ = bert
    names = list(prunable(model, ["*.word_embeddings", "classifier", "*.layer.0.intermediate.dense"]))
    assert names == ["bert.embeddings.word_embeddings", "bert.encoder.layer.0.intermediate.dense", "classifier"]


def test_a_pattern_matching_nothing_names_itself_and_some_real_names(bert):
    with pytest.raises(ValueError, match=r"modules: '\*\.mlp\.\*' matches no .*bert\.embeddings"):
        prunable(bert[0], ["*.intermediate.dense", "*.mlp.*"])


def test_gpt2_conv1d_is_seen_output_major():
    model = GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=1, n_head=2, n_inner=48, vocab_size=50))
    fc = prunable(model)["transformer.h.0.mlp.c_fc"]
    assert fc.weight.shape == (16, 48) and matrix(fc).shape == (48, 16)
    with torch.no_grad():
        matrix(fc)[0, 0] = 0.0  # a view: writes reach the weight
    assert fc.weight[0, 0] == 0


def test_lowest_breaks_ties_by_position_so_counts_are_exact():
    mask = lowest(torch.zeros(2, 3), 4)
    assert mask.tolist() == [[False, False, False], [False, True, True]]
    assert lowest(torch.tensor([1.0, 0.0, 0.0, 2.0, 0.0]), 2).tolist() == [True, False, False, True, True]
    assert lowest(torch.tensor([3.0, 1.0, 2.0]), 3).tolist() == [False, False, False]
    assert lowest(torch.tensor([3.0, 1.0, 2.0]), 0).tolist() == [True, True, True]


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.77, 0.9])
@pytest.mark.parametrize("ranking", ["global", "per_layer"])
def test_ranked_masks_hit_the_target_within_one_weight_per_layer(sparsity, ranking):
    torch.manual_seed(0)
    scores = {"a": torch.rand(7, 13), "b": torch.rand(5, 11) * 3, "c": torch.rand(3, 3)}
    masks = ranked_masks(scores, sparsity, ranking)
    if ranking == "per_layer":
        for name, score in scores.items():
            assert abs(int((~masks[name]).sum()) - sparsity * score.numel()) <= 0.5
    total = sum(score.numel() for score in scores.values())
    assert abs(sum(int((~mask).sum()) for mask in masks.values()) - sparsity * total) <= len(scores) * 0.5


def test_global_ranking_prunes_the_layer_with_the_smaller_weights_more():
    torch.manual_seed(0)
    masks = ranked_masks({"small": torch.rand(10, 10), "large": torch.rand(10, 10) + 0.5}, 0.5, "global")
    assert (~masks["small"]).sum() > (~masks["large"]).sum()


def test_kept_weights_are_the_largest():
    torch.manual_seed(0)
    scores = torch.rand(20, 20)
    mask = ranked_masks({"w": scores}, 0.6, "per_layer")["w"]
    assert scores[mask].min() >= scores[~mask].max()


@pytest.mark.parametrize("sparsity", [0.5, 0.37])
def test_row_masks_prune_every_row_alike_and_the_total_exactly(sparsity):
    torch.manual_seed(0)
    scores = torch.rand(6, 10)
    mask = row_masks(scores, sparsity)
    per_row = (~mask).sum(1)
    assert int(per_row.sum()) == round(sparsity * 60) and int(per_row.max() - per_row.min()) <= 1
    for row in range(6):
        assert scores[row][mask[row]].min() >= scores[row][~mask[row]].max()


def test_nm_mask_keeps_n_of_every_m_and_refuses_widths_it_cannot_group():
    torch.manual_seed(0)
    scores = torch.rand(4, 8)
    mask = nm_mask(scores, 2, 4)
    assert (mask.view(4, 2, 4).sum(-1) == 2).all()
    assert torch.equal(mask[0, :4], scores[0, :4] >= scores[0, :4].sort().values[2])
    with pytest.raises(ValueError, match="divisible by 4"):
        nm_mask(torch.rand(2, 6), 2, 4)


def test_cubic_schedule_rises_fast_then_slowly_and_ends_at_the_target():
    values = [cubic_sparsity(step, 100, 0.8, 0.1, 0.6) for step in range(101)]
    assert values[10] == 0 and values[60] == pytest.approx(0.8) and values[100] == pytest.approx(0.8)
    gains = [b - a for a, b in pairwise(values[10:61])]
    assert all(gain >= 0 for gain in gains) and gains[0] > gains[-1]


def test_layer_sparsity_counts_zeros_l0_and_l1():
    layer = torch.nn.Linear(4, 2, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[0.0, 1.0, -2.0, 0.0], [0.5, 0.0, 0.0, 0.0]]))
    report = layer_sparsity({"l": layer})
    assert report["l"] == {"sparsity": 0.625, "nonzeros": 3, "l1": 3.5, "weights": 8}
    assert overall_sparsity(report) == 0.625
