"""Block-by-block pruning over calibration batches: every layer seen once, padding ignored, and each block fed
the pruned block's outputs."""

from __future__ import annotations

import copy

import numpy as np
import torch

from compress.algos.blockwise import prune_block_by_block
from compress.algos.sparsity import prunable


def batches(tokenizer, padded=False):
    texts = ["a fine film", "dull and long, too long", "good", "bad and dull"]
    encoded = tokenizer(texts, padding="max_length" if padded else True, max_length=24, return_tensors="np")
    return [{"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}]


def test_every_layer_is_pruned_once_with_statistics_of_real_tokens_only(bert, llama):
    for model, tokenizer in (bert, llama):
        model = copy.deepcopy(model)
        seen = {}
        data = batches(tokenizer)
        real_tokens = int(np.sum(data[0]["attention_mask"]))

        def record(name, module, stats, seen=seen):
            seen[name] = stats.tokens

        prune_block_by_block(model, data, prunable(model), record, hessian=False)
        assert list(seen) == list(prunable(model)) and set(seen.values()) == {real_tokens}


def test_padding_does_not_change_the_statistics(bert):
    model, tokenizer = bert
    sums = []
    for padded in (False, True):
        found, copied = {}, copy.deepcopy(model)
        prune_block_by_block(copied, batches(tokenizer, padded), prunable(copied),
                             lambda name, module, stats, found=found: found.setdefault(name, stats.squares),
                             hessian=False)
        sums.append(found)
    for name in sums[0]:
        assert torch.allclose(sums[0][name], sums[1][name], rtol=1e-4), name


def test_later_blocks_see_the_pruned_outputs_of_earlier_ones(llama):
    model, tokenizer = llama
    squares = {}

    def zero_and_record(name, module, stats):
        squares[name] = stats.squares.clone()
        if ".0." in name:
            module.weight.data.zero_()

    pruned, unpruned = copy.deepcopy(model), copy.deepcopy(model)
    prune_block_by_block(pruned, batches(tokenizer), prunable(pruned), zero_and_record, hessian=False)
    untouched = {}
    prune_block_by_block(unpruned, batches(tokenizer), prunable(unpruned),
                         lambda name, module, stats: untouched.setdefault(name, stats.squares), hessian=False)
    first = "model.layers.0.self_attn.q_proj"
    second = "model.layers.1.self_attn.q_proj"
    assert torch.allclose(squares[first], untouched[first])
    assert not torch.allclose(squares[second], untouched[second])


def test_the_model_keeps_its_cache_setting(llama):
    model = copy.deepcopy(llama[0])
    model.config.use_cache = True
    prune_block_by_block(model, batches(llama[1]), prunable(model), lambda *args: None, hessian=True)
    assert model.config.use_cache is True
