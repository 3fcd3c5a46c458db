from __future__ import annotations

import onnx
import pytest
from onnx import numpy_helper

from compress.eval.divergence import first_divergence, first_graph_divergence


def test_a_faithful_export_has_no_divergence(tiny_classifier, bert_onnx_artifact, classification_evalset):
    model, _ = tiny_classifier
    assert first_divergence(model, bert_onnx_artifact / "model.onnx", classification_evalset.features) is None


def test_a_deliberately_broken_layer_is_named(tiny_classifier, bert_onnx_artifact, classification_evalset, tmp_path):
    model, _ = tiny_classifier
    proto = onnx.load(str(bert_onnx_artifact / "model.onnx"))
    weight = model.bert.encoder.layer[1].intermediate.dense.weight.detach().numpy()
    for initializer in proto.graph.initializer:  # the exporter stores a Linear's weight transposed for MatMul
        if numpy_helper.to_array(initializer).shape == weight.T.shape and (
                numpy_helper.to_array(initializer) == weight.T).all():
            broken = numpy_helper.to_array(initializer).copy()
            broken[0, :] += 0.5
            initializer.CopyFrom(numpy_helper.from_array(broken, initializer.name))
    onnx.save(proto, str(tmp_path / "model.onnx"))
    found = first_divergence(model, tmp_path / "model.onnx", classification_evalset.features)
    assert found is not None
    assert found.module == "bert.encoder.layer.1.intermediate.dense"
    assert found.node.startswith("/bert/encoder/layer.1/intermediate/dense/")
    assert found.max_abs_diff > 1e-3
    assert "first divergence at module bert.encoder.layer.1.intermediate.dense" in found.describe()


@pytest.fixture(scope="module")
def quantized_graph(bert_onnx_artifact, tmp_path_factory):
    from compress.export.quantize import quantize_dynamic_int8

    path = tmp_path_factory.mktemp("quantized") / "model.onnx"
    quantize_dynamic_int8(bert_onnx_artifact / "model.onnx", path, per_channel=True, reduce_range=False)
    return path


def test_int8_alone_stays_within_the_quantization_tolerance(bert_onnx_artifact, quantized_graph,
                                                            classification_evalset):
    assert first_graph_divergence(bert_onnx_artifact / "model.onnx", quantized_graph,
                                  classification_evalset.features) is None


def test_a_broken_quantized_layer_is_named(bert_onnx_artifact, quantized_graph, classification_evalset, tmp_path):
    proto = onnx.load(str(quantized_graph))
    node = next(n for n in proto.graph.node if n.name.startswith("/bert/encoder/layer.1/intermediate/dense/MatMul")
                and n.op_type == "MatMulInteger")
    weight = next(i for i in proto.graph.initializer if i.name == node.input[1])  # the int8 weight
    flipped = (-numpy_helper.to_array(weight).astype("int16")).clip(-127, 127).astype("int8")
    weight.CopyFrom(numpy_helper.from_array(flipped, weight.name))
    onnx.save(proto, str(tmp_path / "model.onnx"))
    found = first_graph_divergence(bert_onnx_artifact / "model.onnx", tmp_path / "model.onnx",
                                   classification_evalset.features)
    assert found is not None and "/bert/encoder/layer.1/intermediate/dense/" in found.value
    assert found.relative_error > 0.5
    assert found.describe().startswith("first value off by more than the quantization tolerance: ")
