from __future__ import annotations

from compress.export.quantize import int8_op_counts, quantize_dynamic_int8


def test_fused_graph_becomes_a_smaller_int8_graph(classifier_onnx_dir, tmp_path):
    target = tmp_path / "model.onnx"
    result = quantize_dynamic_int8(classifier_onnx_dir / "model.onnx", target, per_channel=True, reduce_range=False)
    assert result["bytes_after"] == target.stat().st_size < result["bytes_before"]
    assert {"DynamicQuantizeLinear", "QAttention"} <= set(result["int8_ops"]) == set(int8_op_counts(target))
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]


def test_causal_lm_graph_quantizes(llama_onnx_dir, tmp_path):
    result = quantize_dynamic_int8(llama_onnx_dir / "model.onnx", tmp_path / "model.onnx", per_channel=False,
                                   reduce_range=True)
    assert result["int8_ops"]["MatMulInteger"] > 0 and result["bytes_after"] < result["bytes_before"]
