from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from compress.algos.weight_only import quantizable_layers, quantize_weight_only, quantized_layers
from compress.errors import RecipeError
from compress.eval.runners import OrtRunner, TorchRunner
from compress.export.lower import export_weight_only
from compress.export.verify import real_tokens_only, verify_float
from compress.settings import FloatTolerance

FP32 = FloatTolerance(atol=1e-5, rtol=1e-5)  # what reordered float sums leave; a wrong code moves logits by 1e-3


def rtn(model, bits: int, group_size: int, symmetric: bool):
    twin = copy.deepcopy(model)
    return quantize_weight_only(twin, list(quantizable_layers(twin, ["lm_head"])), "rtn", bits, group_size, symmetric)


@pytest.mark.parametrize(("bits", "group_size", "symmetric"), [(4, 16, True), (4, 32, False), (8, 16, False)])
def test_the_lowered_graph_holds_the_same_integers_and_computes_the_torch_logits(tiny_causal_lm, lm_evalset, tmp_path,
                                                                                bits, group_size, symmetric):
    quantized = rtn(tiny_causal_lm[0], bits, group_size, symmetric)
    graph_path = export_weight_only(quantized, "causal-lm", tmp_path / "model.onnx", opset=17)

    graph = onnx.load(str(graph_path)).graph
    nodes = [node for node in graph.node if node.op_type == "MatMulNBits"]
    layers = quantized_layers(quantized)
    assert len(nodes) == len(layers) == 14 and all(node.domain == "com.microsoft" for node in nodes)
    initializers = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    for name, layer in layers.items():
        assert np.array_equal(initializers[f"{name}.qweight"].reshape(layer.out_features, -1), layer.codes.numpy())
        assert np.array_equal(initializers[f"{name}.scales"], layer.scales.numpy().reshape(-1))
        assert (f"{name}.zero_points" in initializers) != symmetric
    features = lm_evalset.features
    verify_float(real_tokens_only(TorchRunner(quantized).logits(features), features),
                 real_tokens_only(OrtRunner(graph_path).logits(features), features), FP32)


def test_odd_block_counts_pad_each_row_of_4_bit_zero_points(tiny_causal_lm, tmp_path):
    quantized = rtn(tiny_causal_lm[0], 4, 32, symmetric=False)  # 32 input features: one block a row
    graph = onnx.load(str(export_weight_only(quantized, "causal-lm", tmp_path / "model.onnx", opset=17))).graph
    zero_points = {init.name: numpy_helper.to_array(init) for init in graph.initializer}[
        "model.layers.0.self_attn.q_proj.zero_points"]
    layer = quantized.model.layers[0].self_attn.q_proj
    assert np.array_equal(zero_points, layer.zero_points.numpy().reshape(-1))  # high nibble: padding


def test_the_classifier_lowers_its_gemm_layers_with_their_bias(tiny_classifier, classification_evalset, tmp_path):
    quantized = rtn(tiny_classifier[0], 4, 32, symmetric=True)
    graph_path = export_weight_only(quantized, "sequence-classification", tmp_path / "model.onnx", opset=17)
    ops = [node.op_type for node in onnx.load(str(graph_path)).graph.node]
    assert ops.count("MatMulNBits") == 14 and "Gemm" not in ops  # pooler and classifier were Gemm
    features = classification_evalset.features
    verify_float(TorchRunner(quantized).logits(features), OrtRunner(graph_path).logits(features), FP32)


def test_a_group_size_matmulnbits_cannot_hold_is_refused_before_exporting(tiny_causal_lm, tmp_path):
    quantized = rtn(tiny_causal_lm[0], 4, 8, symmetric=True)
    with pytest.raises(RecipeError, match=r"quantize.group_size: MatMulNBits needs a power of two >= 16, not 8"):
        export_weight_only(quantized, "causal-lm", tmp_path / "model.onnx", opset=17)
    assert not (tmp_path / "model.onnx").exists()
