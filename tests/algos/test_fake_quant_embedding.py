"""Fake-quantized embedding tables: per-row codes and float16 scales, straight-through gradients, which tables
are chosen, and how they save and reload."""

from __future__ import annotations

import copy
from typing import get_args

import pytest
import torch
from torch import nn

from compress.algos.fake_quant import apply_quantization_spec, quantization_spec
from compress.algos.fake_quant_embedding import (
    BITS,
    FakeQuantEmbedding,
    bits_by_table,
    fit_levels,
    quantizable_embeddings,
    quantize_embeddings,
)
from compress.artifact import Artifact
from compress.errors import ArtifactError, RecipeError
from compress.kinds import Kind
from compress.recipe import EmbeddingBits


def table(bits: int, rows: int = 6, dim: int = 8) -> FakeQuantEmbedding:
    torch.manual_seed(0)
    embedding = nn.Embedding(rows, dim)
    with torch.no_grad():
        embedding.weight[2] = 0.0  # an all-zero row (a padding row) keeps a usable scale
        embedding.weight[3] *= 1000.0  # rows of very different ranges each get their own scale
    return FakeQuantEmbedding(embedding, bits)


@pytest.mark.parametrize("bits, qmax", [(4, 7), (8, 127)])
def test_each_row_is_its_codes_times_its_own_float16_scale(bits, qmax):
    layer = table(bits)
    scales, codes = layer.row_scales(), layer.codes()
    assert torch.equal(scales, scales.half().float())  # what the graph stores, exactly
    peaks = layer.weight.detach().abs().amax(dim=1)
    assert torch.allclose(scales[:, 0][peaks > 0], peaks[peaks > 0] / qmax, rtol=1e-3)
    assert codes.abs().max() == qmax and codes.dtype == torch.int8
    assert not codes[2].any()
    ids = torch.tensor([[0, 3, 2, 3], [5, 1, 1, 4]])
    looked_up = layer(ids)
    assert torch.equal(looked_up, (codes.float() * scales)[ids])
    error = (looked_up - layer.weight.detach()[ids]).abs()
    assert (error <= scales[ids] / 2 * 1.001).all()  # rounding to the nearest code, row by row
    assert error.max() > 0  # it did round


def test_3bit_rows_take_the_nearest_of_eight_levels_fitted_to_the_table():
    torch.manual_seed(0)
    embedding = nn.Embedding(2000, 64)
    with torch.no_grad():
        embedding.weight.mul_(torch.rand(2000, 1) * 10)  # rows of different ranges: the scale follows each
        embedding.weight[2] = 0.0
    layer = FakeQuantEmbedding(embedding, bits=3)
    levels, scales, codes = layer.levels, layer.row_scales(), layer.codes()
    # Lloyd-Max's 8 levels for a normal distribution, which a normal table divided by its rows' deviations is
    gaussian = torch.tensor([0.2451, 0.7560, 1.3440, 2.1520])
    assert torch.allclose(levels, torch.cat([-gaussian.flip(0), gaussian]), rtol=0.05)
    assert torch.equal(scales, scales.half().float())
    assert torch.allclose(scales[:, 0], layer.weight.detach().std(dim=1).clamp_min(2.0 ** -24), rtol=1e-3)
    nearest = (layer.weight.detach()[..., None] / scales[..., None] - levels).abs().argmin(dim=-1)
    assert torch.equal(codes.long(), nearest) and codes.dtype == torch.int8
    ids = torch.tensor([[0, 3, 2], [5, 1, 1]])
    assert torch.allclose(layer(ids), (levels[codes.long()] * scales)[ids])
    # No level is zero: an all-zero row comes back as a level times the smallest float16 scale.
    assert layer(torch.tensor([2])).abs().max() < 2.2 * 2.0 ** -24


def test_fitted_levels_round_a_bell_shaped_table_closer_than_a_uniform_3bit_grid():
    torch.manual_seed(0)
    weight = torch.randn(500, 64)
    layer = FakeQuantEmbedding(nn.Embedding.from_pretrained(weight), bits=3)
    fitted_error = (layer(torch.arange(500)) - weight).pow(2).mean()
    scale = weight.abs().amax(dim=1, keepdim=True) / 3  # symmetric uniform codes -3..3
    uniform_error = (torch.round(weight / scale).clamp(-3, 3) * scale - weight).pow(2).mean()
    assert fitted_error < 0.6 * uniform_error


def test_levels_fitted_to_a_table_with_few_values_keep_the_unused_ones_in_order():
    levels = fit_levels(torch.tensor([[-1.0, 1.0, -1.0, 1.0]]))
    assert levels.shape == (8,) and torch.equal(levels, levels.sort().values)


@pytest.mark.parametrize("bits", [3, 4])
def test_gradients_pass_straight_through_to_the_rows_looked_up(bits):
    layer = table(bits)
    layer(torch.tensor([1, 1, 4])).sum().backward()
    grad = layer.weight.grad
    assert torch.equal(grad[1], torch.full((8,), 2.0)) and torch.equal(grad[4], torch.ones(8))
    assert not grad[[0, 2, 3, 5]].any()


def test_the_tables_under_the_families_embedding_module_are_chosen_but_tiny_ones(tiny_classifier):
    model = tiny_classifier[0]
    assert model.bert.embeddings.token_type_embeddings.num_embeddings == 2
    assert quantizable_embeddings(model, []) == ["bert.embeddings.word_embeddings",
                                                 "bert.embeddings.position_embeddings"]
    assert quantizable_embeddings(model, ["position"]) == ["bert.embeddings.word_embeddings"]


def test_a_table_tied_to_the_output_head_is_refused_with_the_way_out(tiny_causal_lm):
    with pytest.raises(RecipeError, match=r"model.embed_tokens shares its weight with lm_head .*keep_fp32: "
                                          r"\[embed_tokens\]"):
        quantizable_embeddings(tiny_causal_lm[0], [])
    assert quantizable_embeddings(tiny_causal_lm[0], ["embed_tokens"]) == []


@pytest.mark.parametrize("bits, width, multiple", [(4, 5, 2), (3, 12, 8)])
def test_rows_whose_codes_do_not_fill_whole_bytes_are_refused(bits, width, multiple):
    model = nn.Module()
    model.table = nn.Embedding(4, width)
    with pytest.raises(RecipeError, match=rf"table's width \({width}\) is not a multiple of {multiple}"):
        quantize_embeddings(model, {"table": bits})
    quantize_embeddings(model, {"table": 8})
    assert type(model.table) is FakeQuantEmbedding


def test_the_recipe_offers_the_bits_the_tables_take():
    assert get_args(EmbeddingBits) == BITS


def test_bits_apply_to_every_table_or_per_name_fragment():
    tables = ["bert.embeddings.word_embeddings", "bert.embeddings.position_embeddings"]
    assert bits_by_table(tables, 4) == dict.fromkeys(tables, 4)
    assert bits_by_table(tables, {"word": 3, "embeddings": 8}) == {tables[0]: 3, tables[1]: 8}  # first match
    assert bits_by_table(tables, {"word": 3}) == {tables[0]: 3}  # a table no fragment names stays float
    with pytest.raises(RecipeError, match=r"'token_type' names none of the tables that can be quantized "
                                          r"\(bert.embeddings.word_embeddings, bert.embeddings.position_embeddings\)"):
        bits_by_table(tables, {"word": 3, "token_type": 4})


def test_a_saved_artifact_with_quantized_tables_reloads_with_identical_logits(tiny_classifier, classification_evalset,
                                                                             tmp_path):
    model, tokenizer = copy.deepcopy(tiny_classifier[0]), tiny_classifier[1]
    quantize_embeddings(model, {"bert.embeddings.word_embeddings": 3, "bert.embeddings.position_embeddings": 8})
    Artifact("sequence-classification", model.config, tokenizer, model, kind=Kind(weights="fake-quant")).save(tmp_path)

    loaded = Artifact.load(tmp_path).model
    batch = {key: torch.from_numpy(value) for key, value in classification_evalset.features.items()}
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, model(**batch).logits)
    assert quantization_spec(loaded)["embeddings"] == {"bert.embeddings.word_embeddings": {"bits": 3},
                                                       "bert.embeddings.position_embeddings": {"bits": 8}}
    assert torch.equal(loaded.bert.embeddings.word_embeddings.levels, model.bert.embeddings.word_embeddings.levels)
    assert type(loaded.bert.embeddings.token_type_embeddings) is nn.Embedding


@pytest.mark.parametrize("entry", [{"bert.pooler.dense": {"bits": 4}}, {"bert.embeddings.word_embeddings": {"bits": 2}}])
def test_a_spec_naming_no_embedding_or_other_bits_is_refused(tiny_classifier, entry):
    spec = quantization_spec(nn.Module()) | {"embeddings": entry}
    with pytest.raises(ArtifactError, match="is not an Embedding of this model quantized to one of"):
        apply_quantization_spec(copy.deepcopy(tiny_classifier[0]), spec)
