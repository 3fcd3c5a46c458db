"""Fake-quant Linear layers: the rounding they compute, the gradients they pass, and how they save and reload."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from compress.algos.fake_quant import (
    FakeQuantLinear,
    apply_quantization_spec,
    fake_quantize,
    input_ranges,
    quantizable_linears,
    quantization_spec,
    quantize_linears,
)
from compress.artifact import Artifact
from compress.errors import ArtifactError
from compress.kinds import Kind


def test_the_straight_through_estimator_passes_gradients_inside_the_range_and_lsq_moves_the_scale():
    x = torch.tensor([0.26, -0.74, 2.0, -3.0], requires_grad=True)  # the last two fall outside [-1, 1.5]
    scale = torch.tensor(0.5, requires_grad=True)
    out = fake_quantize(x, scale, torch.tensor(2.0), 0, 5)
    assert out.tolist() == [0.5, -0.5, 1.5, -1.0]
    out.sum().backward()
    assert x.grad.tolist() == [1.0, 1.0, 0.0, 0.0]
    # LSQ: round(x/s) - x/s inside the range, the clipped level (q - zero point) outside it.
    inside = (1 - 0.52) + (-1 + 1.48)
    assert scale.grad.item() == pytest.approx(inside + (5 - 2) + (0 - 2))


def test_a_fake_quant_linear_computes_on_int8_weights_and_uint8_inputs():
    torch.manual_seed(0)
    linear = nn.Linear(6, 4)
    layer = FakeQuantLinear(linear, per_channel=True)
    layer.set_input_range(-1.0, 3.0)
    assert layer.input_scale.item() == pytest.approx(4 / 255)
    assert layer.input_zero_point.item() == 64  # 1 / (4/255) = 63.75: zero is a level of the grid
    x = torch.randn(3, 6) * 2

    weights = linear.weight.detach().numpy()
    w_scale = np.abs(weights).max(axis=1, keepdims=True) / 127
    w_int = np.clip(np.round(weights / w_scale), -127, 127)
    assert np.array_equal(layer.quantized_weight().numpy(), w_int)
    assert np.abs(w_int).max(axis=1).tolist() == [127] * 4  # each row's largest weight spans the range
    x_int = np.clip(np.round(x.numpy() / (4 / 255)) + 64, 0, 255)
    expected = ((x_int - 64) * (4 / 255)) @ (w_int * w_scale).T + linear.bias.detach().numpy()
    assert np.allclose(layer(x).detach().numpy(), expected, atol=1e-5)
    assert not np.allclose(layer(x).detach().numpy(), linear(x).detach().numpy(), atol=1e-3)  # really rounded


def test_per_tensor_weights_share_one_scale():
    torch.manual_seed(0)
    layer = FakeQuantLinear(nn.Linear(6, 4), per_channel=False)
    assert layer.weight_scale().shape == ()
    assert layer.quantized_weight().abs().max().item() == 127
    assert min(row.abs().max().item() for row in layer.quantized_weight()) < 127


def test_keep_fp32_fragments_stay_float_and_tied_weights_stay_tied(tiny_causal_lm):
    model = copy.deepcopy(tiny_causal_lm[0])
    names = quantizable_linears(model, keep_fp32=["down_proj"])
    assert "lm_head" in names and not [name for name in names if "down_proj" in name]
    quantize_linears(model, names)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert type(model.model.layers[0].mlp.down_proj) is nn.Linear
    assert isinstance(model.model.layers[0].mlp.up_proj, FakeQuantLinear)


def test_calibration_ranges_are_the_extremes_each_layer_sees(tiny_classifier, classification_evalset):
    model = copy.deepcopy(tiny_classifier[0])
    features = classification_evalset.features
    batches = [{key: value[rows] for key, value in features.items()} for rows in (slice(0, 4), slice(4, None))]
    seen = []
    hook = model.classifier.register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0]))
    ranges = input_ranges(model, ["classifier", "bert.encoder.layer.0.output.dense"], batches)
    hook.remove()
    pooled = torch.cat(seen)
    assert ranges["classifier"] == (pooled.min().item(), pooled.max().item())
    assert set(ranges) == {"classifier", "bert.encoder.layer.0.output.dense"}


@pytest.mark.parametrize("per_channel", [True, False])
def test_a_saved_fake_quant_artifact_reloads_with_identical_logits(tiny_classifier, classification_evalset, tmp_path,
                                                                  per_channel):
    model, tokenizer = copy.deepcopy(tiny_classifier[0]), tiny_classifier[1]
    quantize_linears(model, quantizable_linears(model, ["pooler"]), per_channel=per_channel)
    for index, layer in enumerate(module for module in model.modules() if isinstance(module, FakeQuantLinear)):
        layer.set_input_range(-2.0 - index / 10, 3.0 + index / 7)  # a distinct range each, as training leaves
    artifact = Artifact("sequence-classification", model.config, tokenizer, model, kind=Kind(weights="fake-quant"))
    artifact.save(tmp_path)

    loaded = Artifact.load(tmp_path)
    batch = {key: torch.from_numpy(value) for key, value in classification_evalset.features.items()}
    with torch.no_grad():
        assert torch.equal(loaded.model(**batch).logits, model(**batch).logits)
    assert loaded.kind.weights == "fake-quant"
    assert type(loaded.model.bert.pooler.dense) is nn.Linear
    assert quantization_spec(loaded.model) == quantization_spec(model)


def test_a_spec_naming_no_linear_layer_is_refused(tiny_classifier):
    spec = quantization_spec(nn.Module())
    spec["modules"] = {"bert.embeddings": {"per_channel": True}}
    with pytest.raises(ArtifactError, match="'bert.embeddings' is not a Linear layer"):
        apply_quantization_spec(copy.deepcopy(tiny_classifier[0]), spec)
