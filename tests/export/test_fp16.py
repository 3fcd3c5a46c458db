from __future__ import annotations

import numpy as np
import onnx
import pytest

from compress.eval.runners import OrtRunner
from compress.export.fp16 import convert_fp16


@pytest.mark.parametrize("graph_dir, evalset", [("classifier_onnx_dir", "classification_evalset"),
                                                ("llama_onnx_dir", "lm_evalset")])
def test_a_fused_graph_becomes_half_the_size_and_keeps_its_logits(graph_dir, evalset, request, tmp_path):
    source, target = request.getfixturevalue(graph_dir) / "model.onnx", tmp_path / "model.onnx"
    features = request.getfixturevalue(evalset).features
    result = convert_fp16(source, target)

    floats = sum(t.data_type == onnx.TensorProto.FLOAT for t in onnx.load(str(source)).graph.initializer)
    assert result["fp16_initializers"] == floats > 0 and result["kept_fp32_nodes"] == 0
    assert result["bytes_after"] == target.stat().st_size < 0.56 * result["bytes_before"]
    before, after = OrtRunner(source), OrtRunner(target)  # ORT's CPU provider loads and runs it
    inputs = [[(spec.name, spec.type) for spec in graph.session.get_inputs()] for graph in (after, before)]
    assert inputs[0] == inputs[1]
    assert after.session.get_outputs()[0].type == "tensor(float)"  # logits stay fp32
    expected, got = before.logits(features), after.logits(features)
    assert 0 < np.abs(got - expected).max() < 1e-2 * np.abs(expected).max()


def test_keep_fp32_leaves_the_named_nodes_weights_in_fp32(llama_onnx_dir, tmp_path):
    source, target = llama_onnx_dir / "model.onnx", tmp_path / "model.onnx"
    everything = convert_fp16(source, tmp_path / "all.onnx")
    kept = convert_fp16(source, target, keep_fp32=["down_proj"])
    assert kept["kept_fp32_nodes"] == 2 and kept["fp16_initializers"] == everything["fp16_initializers"] - 2
    model = onnx.load(str(target))
    weights = {t.name: t.data_type for t in model.graph.initializer}
    down = [node.input[1] for node in model.graph.node if "down_proj" in node.name and node.op_type == "MatMul"]
    assert len(down) == 2 and {weights[name] for name in down} == {onnx.TensorProto.FLOAT}
    OrtRunner(target)  # the casts around the fp32 nodes make a graph ORT loads
