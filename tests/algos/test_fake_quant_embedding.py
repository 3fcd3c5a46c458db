"""Fake-quantized embedding tables: per-row codes and float16 scales, straight-through gradients, which tables
are chosen, and how they save and reload."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from compress.algos.fake_quant import apply_quantization_spec, quantization_spec
from compress.algos.fake_quant_embedding import (
    FakeQuantEmbedding,
    quantizable_embeddings,
    quantize_embeddings,
)
from compress.artifact import Artifact
from compress.errors import ArtifactError, RecipeError
from compress.kinds import Kind


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


def test_gradients_pass_straight_through_to_the_rows_looked_up():
    layer = table(4)
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


def test_int4_rows_of_odd_width_are_refused():
    model = nn.Module()
    model.table = nn.Embedding(4, 5)
    with pytest.raises(RecipeError, match=r"table has an odd width \(5\)"):
        quantize_embeddings(model, ["table"], 4)
    quantize_embeddings(model, ["table"], 8)
    assert type(model.table) is FakeQuantEmbedding


def test_a_saved_artifact_with_quantized_tables_reloads_with_identical_logits(tiny_classifier, classification_evalset,
                                                                             tmp_path):
    model, tokenizer = copy.deepcopy(tiny_classifier[0]), tiny_classifier[1]
    quantize_embeddings(model, ["bert.embeddings.word_embeddings"], 4)
    quantize_embeddings(model, ["bert.embeddings.position_embeddings"], 8)
    Artifact("sequence-classification", model.config, tokenizer, model, kind=Kind(weights="fake-quant")).save(tmp_path)

    loaded = Artifact.load(tmp_path).model
    batch = {key: torch.from_numpy(value) for key, value in classification_evalset.features.items()}
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, model(**batch).logits)
    assert quantization_spec(loaded)["embeddings"] == {"bert.embeddings.word_embeddings": {"bits": 4},
                                                       "bert.embeddings.position_embeddings": {"bits": 8}}
    assert type(loaded.bert.embeddings.token_type_embeddings) is nn.Embedding


@pytest.mark.parametrize("entry", [{"bert.pooler.dense": {"bits": 4}}, {"bert.embeddings.word_embeddings": {"bits": 3}}])
def test_a_spec_naming_no_embedding_or_other_bits_is_refused(tiny_classifier, entry):
    spec = quantization_spec(nn.Module()) | {"embeddings": entry}
    with pytest.raises(ArtifactError, match="is not an Embedding of this model quantized to one of"):
        apply_quantization_spec(copy.deepcopy(tiny_classifier[0]), spec)
