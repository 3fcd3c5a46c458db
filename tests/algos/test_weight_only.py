from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from compress.algos.weight_only import (
    WeightOnlyLinear,
    apply_quantization_spec,
    check_awq_supported,
    check_group_size,
    quantizable_layers,
    quantization_spec,
    quantize_weight_only,
    quantized_layers,
)
from compress.errors import ArtifactError, BackendError, RecipeError


def calibration_batches(evalset, padded: bool = False) -> list[dict[str, np.ndarray]]:
    """Two batches of the eval rows: enough for the mechanics of GPTQ and AWQ on a random model. Unpadded
    (padding tokens read as text), like the causal LM's calibration blocks."""
    ids, mask = evalset.features["input_ids"], evalset.features["attention_mask"]
    mask = mask if padded else np.ones_like(mask)
    return [{"input_ids": ids[start:start + 4], "attention_mask": mask[start:start + 4]} for start in (0, 4)]


def quantized_copy(model, method: str, bits: int = 4, group_size: int = 16, symmetric: bool = True,
                   calibration=None):
    twin = copy.deepcopy(model)
    return quantize_weight_only(twin, list(quantizable_layers(twin, ["lm_head"])), method, bits, group_size,
                                symmetric, calibration)


def test_a_quantized_layer_packs_its_codes_low_bits_first_and_computes_with_their_dequantized_weight():
    integers = torch.tensor([[1, 2, 15, 0], [7, 8, 9, 10]])
    scales = torch.tensor([[0.5, 2.0], [1.0, 0.25]])
    zero_points = torch.tensor([[1, 0], [8, 9]])
    bias = torch.tensor([0.5, -1.0])
    layer = WeightOnlyLinear.from_integers(integers, scales, zero_points, bits=4, bias=bias)

    assert layer.group_size == 2 and layer.codes.tolist() == [[1 | 2 << 4, 15], [7 | 8 << 4, 9 | 10 << 4]]
    expected = torch.tensor([[0.0, 0.5, 30.0, 0.0], [-1.0, 0.0, 0.0, 0.25]])
    assert torch.equal(layer.dequantized_weight(), expected)
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    assert torch.equal(layer(x), torch.tensor([[91.5, -1.0]]))

    symmetric = WeightOnlyLinear.from_integers(integers, scales, None, bits=4, bias=None)
    assert symmetric.zero_points is None and symmetric.dequantized_weight()[0].tolist() == [-3.5, -3.0, 14.0, -16.0]


@pytest.mark.parametrize("method", ["rtn", "gptq", "awq"])
def test_each_method_quantizes_every_linear_but_lm_head_onto_a_4_bit_grid(tiny_causal_lm, lm_evalset, method):
    model, _ = tiny_causal_lm
    calibration = calibration_batches(lm_evalset) if method != "rtn" else None
    quantized = quantized_copy(model, method, calibration=calibration)

    layers = quantized_layers(quantized)
    assert len(layers) == 14 and type(quantized.lm_head) is nn.Linear  # 2 blocks x 7 projections
    for layer in layers.values():
        assert layer.integers().max() <= 15 and layer.scales.dtype == torch.float32 and layer.zero_points is None
    ids = torch.tensor(lm_evalset.features["input_ids"])
    with torch.no_grad():
        drift = (quantized(ids).logits - model(ids).logits).abs().max().item()
    assert 0 < drift < 0.25
    original = dict(model.named_modules())
    if method == "rtn":  # round to nearest: each weight within half a step of its grid point
        for name, layer in layers.items():
            steps = layer.scales.repeat_interleave(layer.group_size, dim=1)
            assert ((layer.dequantized_weight() - original[name].weight).abs() <= steps / 2 + 1e-6).all()
    if method == "awq":  # its scales went into the norms before the projections: not plain RTN
        block = quantized.model.layers[0]
        assert not torch.equal(block.input_layernorm.weight, model.model.layers[0].input_layernorm.weight)


def test_asymmetric_8_bit_layers_keep_their_zero_points(tiny_causal_lm):
    quantized = quantized_copy(tiny_causal_lm[0], "rtn", bits=8, group_size=32, symmetric=False)
    layer = quantized.model.layers[0].mlp.down_proj
    assert layer.codes.shape == (32, 64) and layer.zero_points.shape == (32, 2)
    assert len(set(layer.zero_points.flatten().tolist())) > 1


def test_the_spec_rebuilds_empty_layers_that_the_saved_tensors_fill(tiny_causal_lm, tiny_llama_dir, tmp_path):
    from safetensors.torch import load_model, save_model
    from transformers import AutoConfig, AutoModelForCausalLM

    quantized = quantized_copy(tiny_causal_lm[0], "rtn", symmetric=False)
    spec = quantization_spec(quantized)
    assert spec["layers"]["model.layers.1.mlp.down_proj"] == {"in_features": 64, "out_features": 32, "bits": 4,
                                                              "group_size": 16, "symmetric": False, "bias": False}
    fresh = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tiny_llama_dir))
    apply_quantization_spec(fresh, spec)
    save_model(quantized, str(tmp_path / "model.safetensors"))
    load_model(fresh, str(tmp_path / "model.safetensors"))
    ids = torch.arange(1, 20)[None]
    with torch.no_grad():
        assert torch.equal(fresh.eval()(ids).logits, quantized(ids).logits)
    with pytest.raises(ArtifactError, match="format"):
        apply_quantization_spec(fresh, {"format": "other", "layers": {}})


def test_a_group_size_that_does_not_divide_a_layer_names_group_size(tiny_causal_lm):
    layers = quantizable_layers(tiny_causal_lm[0], ["lm_head"])
    check_group_size(layers, 32)
    with pytest.raises(RecipeError, match=r"quantize.group_size: 48 does not divide the 32 input features of "
                                          r"model.layers.0.self_attn.q_proj") as error:
        check_group_size(layers, 48)
    assert error.value.exit_code == 2


def test_awq_needs_known_scale_pairs(tiny_classifier):
    with pytest.raises(RecipeError, match=r"quantize.method awq: .* model family 'bert'"):
        check_awq_supported(tiny_classifier[0])


def test_a_neural_compressor_failure_names_the_backend_and_the_onnx_route(tiny_causal_lm, lm_evalset):
    # INC 3.x AWQ replays each block with the first batch's attention mask: padded rows break it.
    with pytest.raises(BackendError, match=r"quantize.backend neural-compressor \(awq\) failed on this model: "
                                          r"RuntimeError: .*; .*ptq: \{mode: weight-only\}") as error:
        quantized_copy(tiny_causal_lm[0], "awq", calibration=calibration_batches(lm_evalset, padded=True))
    assert "\n" not in str(error.value)


def test_the_classifier_quantizes_too(tiny_classifier, classification_evalset):
    model, _ = tiny_classifier
    quantized = quantized_copy(model, "rtn", group_size=32)
    assert len(quantized_layers(quantized)) == 2 * 6 + 2  # encoder projections, pooler, classifier
    features = {key: torch.tensor(value) for key, value in classification_evalset.features.items()}
    with torch.no_grad():
        drift = (quantized(**features).logits - model(**features).logits).abs().max().item()
    assert 0 < drift < 0.05
