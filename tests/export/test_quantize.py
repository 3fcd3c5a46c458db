from __future__ import annotations

from compress.export.quantize import (
    DYNAMIC_WEIGHTS,
    int8_op_counts,
    quantizable_layers,
    quantize_dynamic_int8,
)


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
    assert kept["quantized_weights"] > 0


def test_unsigned_weights_and_float_embeddings_when_asked(classifier_onnx_dir, tmp_path):
    import onnx

    result = quantize_dynamic_int8(classifier_onnx_dir / "model.onnx", tmp_path / "model.onnx", per_channel=True,
                                   reduce_range=False, weight_type="uint8", quantize_embeddings=False)
    assert result["weight_type"] == "uint8" and "QEmbedLayerNormalization" not in result["int8_ops"]
    weights = onnx.load(str(tmp_path / "model.onnx")).graph.initializer
    quantized = {w.data_type for w in weights if w.name.endswith("_quantized") and len(w.dims) >= 2}
    assert quantized == {onnx.TensorProto.UINT8}


def test_float_nodes_are_kept_by_exact_name(llama_onnx_dir, tmp_path):
    layers = quantizable_layers(llama_onnx_dir / "model.onnx", DYNAMIC_WEIGHTS)
    q_proj = "/model/layers.0/self_attn/q_proj/MatMul"
    assert q_proj in layers and layers[q_proj] == "MatMul"
    everything = quantize_dynamic_int8(llama_onnx_dir / "model.onnx", tmp_path / "all.onnx", per_channel=True,
                                       reduce_range=False)
    kept = quantize_dynamic_int8(llama_onnx_dir / "model.onnx", tmp_path / "kept.onnx", per_channel=True,
                                 reduce_range=False, float_nodes=[q_proj])
    assert kept["quantized_weights"] == everything["quantized_weights"] - 1 and kept["kept_fp32_nodes"] == 0
