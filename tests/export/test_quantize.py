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


def test_keep_fp32_leaves_the_named_matmuls_alone(llama_onnx_dir, tmp_path):
    import onnx

    everything = quantize_dynamic_int8(llama_onnx_dir / "model.onnx", tmp_path / "all.onnx", per_channel=True,
                                       reduce_range=True)
    kept = quantize_dynamic_int8(llama_onnx_dir / "model.onnx", tmp_path / "kept.onnx", per_channel=True,
                                 reduce_range=True, keep_fp32=["down_proj"])
    assert everything["kept_fp32_nodes"] == 0 and kept["kept_fp32_nodes"] == 2  # one per layer
    nodes = onnx.load(str(tmp_path / "kept.onnx")).graph.node
    down = [n.op_type for n in nodes if "down_proj" in n.name]
    assert down == ["MatMul", "MatMul"]
    assert kept["int8_ops"]["MatMulInteger"] == everything["int8_ops"]["MatMulInteger"] - 2


def test_keep_fp32_also_holds_a_gemm(classifier_onnx_dir, tmp_path):
    import onnx

    kept = quantize_dynamic_int8(classifier_onnx_dir / "model.onnx", tmp_path / "model.onnx", per_channel=True,
                                 reduce_range=False, keep_fp32=["classifier"])
    weights = {w.name for w in onnx.load(str(tmp_path / "model.onnx")).graph.initializer}
    assert "classifier.weight" in weights or "classifier.weight_Transposed" in weights
    assert not any(name.startswith("classifier.weight") and name.endswith("_quantized") for name in weights)
    assert kept["int8_weights"] > 0
