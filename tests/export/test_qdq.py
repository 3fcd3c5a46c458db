"""QDQ export of fake-quant models: the graph holds the learned scales and int8 weights, and ONNX Runtime runs
it with integer kernels to the torch model's logits."""

from __future__ import annotations

import copy
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper

from compress.algos.fake_quant import FakeQuantLinear, input_ranges, quantizable_linears, quantize_linears
from compress.algos.fake_quant_embedding import FakeQuantEmbedding, quantize_embeddings
from compress.errors import RecipeError
from compress.eval.runners import OrtRunner, TorchRunner
from compress.export.onnx import export_onnx
from compress.export.qdq import export_fake_quant, packed_codes


def fake_quant_model(model, features: dict[str, np.ndarray], per_channel: bool = True):
    """A fake-quant copy of `model`, calibrated on `features`, its input scales then moved as training would."""
    model = copy.deepcopy(model)
    names = quantizable_linears(model)
    quantize_linears(model, names, per_channel, input_ranges(model, names, [features]))
    with torch.no_grad():
        for index, layer in enumerate(layers(model).values()):
            layer.input_scale.mul_(0.8 + index / 50)
    return model


def layers(model) -> dict[str, FakeQuantLinear]:
    return {name: module for name, module in model.named_modules() if isinstance(module, FakeQuantLinear)}


@pytest.fixture(scope="module")
def exported_classifier(tiny_classifier, classification_evalset, tmp_path_factory) -> tuple[FakeQuantLinear, Path]:
    model = fake_quant_model(tiny_classifier[0], classification_evalset.features)
    return model, export_fake_quant(model, "sequence-classification",
                                    tmp_path_factory.mktemp("qdq") / "model.onnx", opset=17)


def constants(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    values = {node.output[0]: numpy_helper.to_array(node.attribute[0].t) for node in graph.node
              if node.op_type == "Constant" and node.attribute[0].name == "value"}
    return values | {tensor.name: numpy_helper.to_array(tensor) for tensor in graph.initializer}


def nodes_by_layer(graph: onnx.GraphProto) -> dict[tuple[str, str], onnx.NodeProto]:
    """(module name, node name within it): the exporter names nodes by their module's scope."""
    named = {}
    for node in graph.node:
        scope, _, own = node.name.rpartition("/")
        named[scope.lstrip("/").replace("/", "."), own] = node
    return named


def test_onnx_runtime_reproduces_the_fake_quant_logits(exported_classifier, tiny_classifier, classification_evalset):
    model, graph = exported_classifier
    features = classification_evalset.features
    expected = TorchRunner(model).logits(features)
    actual = OrtRunner(graph).logits(features)
    assert np.abs(actual - expected).max() < 1e-4 * np.abs(expected).max()
    assert (actual.argmax(-1) == expected.argmax(-1)).all()
    float_logits = TorchRunner(tiny_classifier[0]).logits(features)  # quantization did change them
    assert np.abs(float_logits - expected).max() > 100 * np.abs(actual - expected).max()


def test_the_graph_holds_each_layers_learned_scales_and_int8_weights(exported_classifier):
    model, graph_path = exported_classifier
    graph = onnx.load(str(graph_path)).graph
    values = constants(graph)
    nodes = nodes_by_layer(graph)
    for name, layer in layers(model).items():
        quantize, weight = nodes[name, "QuantizeLinear"], nodes[name, "DequantizeLinear_1"]
        scale, zero_point = layer.input_qparams()
        assert values[quantize.input[1]] == np.float32(scale.item()), name
        assert values[quantize.input[2]].dtype == np.uint8 and values[quantize.input[2]] == zero_point.item()
        stored = values[weight.input[0]]
        assert stored.dtype == np.int8 and np.array_equal(stored, layer.quantized_weight().numpy().T), name
        assert np.array_equal(values[weight.input[1]], layer.weight_scale().numpy().ravel())
        assert {a.name: a.i for a in weight.attribute} == {"axis": 1}
    floats = [array for array in values.values() if array.dtype == np.float32 and array.ndim == 2]
    assert not [array for array in floats if array.shape in {(32, 32), (32, 64), (64, 32)}]  # no fp32 copies


def test_the_weights_take_a_quarter_of_their_float_bytes(exported_classifier, tiny_classifier, tmp_path):
    model, graph = exported_classifier
    float_graph = export_onnx(tiny_classifier[0], "sequence-classification", tmp_path / "model.onnx", opset=17)

    def matrix_bytes(path: Path) -> int:
        return sum(array.nbytes for array in constants(onnx.load(str(path)).graph).values() if array.ndim == 2)

    linear_weights = sum(layer.weight.numel() for layer in layers(model).values())
    assert matrix_bytes(float_graph) - matrix_bytes(graph) == 3 * linear_weights
    # On a model this small the extra nodes' names weigh as much as the bytes saved; on MiniLM-L6 they are noise.
    assert graph.stat().st_size < float_graph.stat().st_size


def test_onnx_runtime_fuses_the_pairs_into_integer_matmuls(exported_classifier, tmp_path):
    _, graph = exported_classifier
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])
    ops = Counter(node.op_type for node in onnx.load(options.optimized_model_filepath).graph.node)
    # Every Linear on [batch, tokens, features] (2 blocks x 6); the pooler and classifier, on [batch,
    # features], become a Gemm that is left in float over dequantized inputs.
    assert ops["MatMulIntegerToFloat"] == 12


def test_per_tensor_weights_and_a_causal_lm_export_too(tiny_causal_lm, lm_evalset, tmp_path):
    model = fake_quant_model(tiny_causal_lm[0], lm_evalset.features, per_channel=False)
    graph = export_fake_quant(model, "causal-lm", tmp_path / "model.onnx", opset=17)
    features = lm_evalset.features
    mask = features["attention_mask"].astype(bool)
    expected, actual = TorchRunner(model).logits(features)[mask], OrtRunner(graph).logits(features)[mask]
    assert np.abs(actual - expected).max() < 1e-3 * np.abs(expected).max()
    assert (actual.argmax(-1) == expected.argmax(-1)).mean() == 1.0
    stored = onnx.load(str(graph)).graph
    weight = nodes_by_layer(stored)["lm_head", "DequantizeLinear_1"]
    assert constants(stored)[weight.input[1]].shape == ()  # one scale for the whole weight


def test_an_opset_without_per_axis_scales_is_refused(exported_classifier, tmp_path):
    with pytest.raises(RecipeError, match="opset >= 13"):
        export_fake_quant(exported_classifier[0], "sequence-classification", tmp_path / "model.onnx", opset=12)


def test_int4_codes_are_packed_two_to_a_byte_offset_by_eight():
    torch.manual_seed(0)
    embedding = torch.nn.Embedding(6, 8)
    table, wide = FakeQuantEmbedding(embedding, bits=4), FakeQuantEmbedding(embedding, bits=8)
    codes = table.codes()
    (packed,) = packed_codes(codes, 4)
    assert packed.dtype == torch.uint8 and packed.shape == (6, 4)
    assert torch.equal((packed & 15).to(torch.int8) - 8, codes[:, :4])
    assert torch.equal((packed >> 4).to(torch.int8) - 8, codes[:, 4:])
    assert torch.equal(packed_codes(wide.codes(), 8)[0], wide.codes())


def test_3bit_codes_are_a_plane_of_their_low_two_bits_and_a_plane_of_their_high_bit():
    torch.manual_seed(0)
    table = FakeQuantEmbedding(torch.nn.Embedding(6, 16), bits=3)
    codes = table.codes()
    low, high = packed_codes(codes, 3)
    assert low.dtype == high.dtype == torch.uint8 and low.shape == (6, 4) and high.shape == (6, 2)
    assert set(codes.unique().tolist()) == set(range(8))
    for column in range(16):
        two_bits = (low[:, column % 4] >> (2 * (column // 4))) & 3
        bit = (high[:, column % 2] >> (column // 2)) & 1
        assert torch.equal((two_bits + 4 * bit).to(torch.int8), codes[:, column])


def test_quantized_tables_are_looked_up_row_by_row_from_their_codes(exported_classifier, classification_evalset,
                                                                     tmp_path):
    model = copy.deepcopy(exported_classifier[0])
    quantize_embeddings(model, {"bert.embeddings.word_embeddings": 4, "bert.embeddings.position_embeddings": 8})
    graph_path = export_fake_quant(model, "sequence-classification", tmp_path / "model.onnx", opset=17)

    features = classification_evalset.features
    expected = TorchRunner(model).logits(features)
    assert np.abs(OrtRunner(graph_path).logits(features) - expected).max() < 1e-4 * np.abs(expected).max()
    graph = onnx.load(str(graph_path)).graph
    values = constants(graph)
    looked_up: dict[str, list[np.ndarray]] = {}
    for node in graph.node:
        if node.op_type == "Gather" and node.input[0] in values and values[node.input[0]].ndim == 2:
            looked_up.setdefault(values[node.input[0]].dtype.name, []).append(values[node.input[0]])
    embeddings = model.bert.embeddings
    # the codes and float16 scales of the two quantized tables; the token type table left float
    assert {dtype: len(tables) for dtype, tables in looked_up.items()} == {"uint8": 1, "int8": 1, "float16": 2,
                                                                           "float32": 1}
    assert np.array_equal(looked_up["uint8"][0], packed_codes(embeddings.word_embeddings.codes(), 4)[0].numpy())
    assert np.array_equal(looked_up["int8"][0], embeddings.position_embeddings.codes().numpy())
    assert looked_up["float32"][0].shape == embeddings.token_type_embeddings.weight.shape
    assert not [array for array in values.values() if array.dtype == np.float32
                and array.shape == embeddings.word_embeddings.weight.shape]  # no float copy of the table
