from __future__ import annotations

import onnx
from onnx import numpy_helper

from compress.eval.divergence import first_divergence


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
