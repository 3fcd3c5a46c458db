from __future__ import annotations

import numpy as np
import pytest

from compress.artifact import GRAPH
from compress.eval.roofline import (
    Cost,
    copy_bandwidth,
    cpu_ghz,
    cpu_peak,
    gpu_peak,
    onnx_cost,
    roofline,
    roofline_line,
    torch_cost,
)

TOKENS, K, HIDDEN, N = 3, 64, 128, 32
ALL_X86 = ["avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8"]


def _export(model, example, path):
    import torch

    torch.onnx.export(model, (torch.from_numpy(example),), str(path), input_names=["input"], dynamo=False)
    return path


def _two_linears(directory, leading: tuple[int, ...]):
    """(model, features, graph): Linear(K, HIDDEN), ReLU, Linear(HIDDEN, N) over [*leading, K] floats."""
    import torch

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(K, HIDDEN), torch.nn.ReLU(), torch.nn.Linear(HIDDEN, N))
    model.eval()
    features = {"input": np.random.default_rng(0).standard_normal((*leading, K)).astype(np.float32)}
    return model, features, _export(model, features["input"], directory / "model.onnx")


# 2-D runs as Gemm, whose profile lists the bias beside the activation; 3-D as MatMul.
@pytest.mark.parametrize("leading", [(TOKENS,), (1, TOKENS)])
def test_onnx_and_torch_count_the_linear_layers_by_hand(tmp_path, leading):
    model, features, graph = _two_linears(tmp_path, leading)
    weights = K * HIDDEN + HIDDEN + HIDDEN * N + N
    for cost in (onnx_cost(graph, features), torch_cost(model, features)):
        assert cost.flops == 2 * TOKENS * (K * HIDDEN + HIDDEN * N)
        assert cost.float_weight_bytes == 4 * weights
        assert cost.float_weight_elements == weights
        assert cost.quantized_weight_bytes == 0
        assert cost.activation_elements == TOKENS * (K + HIDDEN + HIDDEN + N)


def test_int8_weights_count_one_byte_each(tmp_path):
    from onnxruntime.quantization import QuantType, quantize_dynamic

    _, features, graph = _two_linears(tmp_path, (1, TOKENS))
    quantize_dynamic(graph, tmp_path / "int8.onnx", weight_type=QuantType.QInt8)
    fp32, int8 = onnx_cost(graph, features), onnx_cost(tmp_path / "int8.onnx", features)
    assert int8.flops == fp32.flops
    # Per-tensor scales and zero points are scalars, not weights.
    assert int8.quantized_weight_bytes == K * HIDDEN + HIDDEN * N
    assert int8.float_weight_bytes == 4 * (HIDDEN + N)  # the biases stay float
    assert int8.bytes_moved(4) < fp32.bytes_moved(4) / 3


def test_an_embedding_table_counts_only_the_gathered_rows(tmp_path):
    import torch

    rows, width, tokens = 100, 16, 5
    model = torch.nn.Sequential(torch.nn.Embedding(rows, width), torch.nn.Linear(width, N)).eval()
    features = {"input": np.arange(tokens, dtype=np.int64)[None]}
    graph = _export(model, features["input"], tmp_path / "embedding.onnx")
    for cost in (onnx_cost(graph, features), torch_cost(model, features)):
        assert cost.float_weight_bytes == 4 * (tokens * width + width * N + N)
        assert cost.flops == 2 * tokens * width * N


def test_fused_attention_counts_its_projection_scores_and_values(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    batch, seq, hidden = 1, 4, 8
    float32, shape = TensorProto.FLOAT, [batch, seq, hidden]
    weight = helper.make_tensor("weight", float32, [hidden, 3 * hidden], np.zeros(3 * hidden * hidden))
    bias = helper.make_tensor("bias", float32, [3 * hidden], np.zeros(3 * hidden))
    node = helper.make_node("Attention", ["input", "weight", "bias"], ["output"], domain="com.microsoft",
                            num_heads=2)
    graph = helper.make_graph([node], "attention", [helper.make_tensor_value_info("input", float32, shape)],
                              [helper.make_tensor_value_info("output", float32, shape)], [weight, bias])
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    onnx.save(helper.make_model(graph, opset_imports=opsets), tmp_path / "attention.onnx")
    cost = onnx_cost(tmp_path / "attention.onnx", {"input": np.ones((batch, seq, hidden), np.float32)})
    assert cost.flops == 2 * batch * seq * hidden * 3 * hidden + 4 * batch * seq * seq * hidden
    assert cost.float_weight_bytes == 4 * (hidden * 3 * hidden + 3 * hidden)


def test_the_tiny_bert_counts_its_layers_and_attention_in_torch_and_onnx(tiny_classifier, bert_onnx_artifact):
    import torch

    model, _ = tiny_classifier
    tokens = 16
    ids = np.full((1, tokens), 5, np.int64)
    features = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
    encoder = sum(layer.in_features * layer.out_features
                  for layer in model.bert.encoder.modules() if isinstance(layer, torch.nn.Linear))
    # The pooler and the classifier see the first token only.
    heads = sum(layer.in_features * layer.out_features
                for layer in (model.bert.pooler.dense, model.classifier))
    attention = model.config.num_hidden_layers * 4 * tokens * tokens * model.config.hidden_size
    cost = torch_cost(model, features)
    assert cost.flops >= 2 * tokens * encoder > 0
    assert cost.flops == 2 * tokens * encoder + 2 * heads + attention
    assert onnx_cost(bert_onnx_artifact / GRAPH, features).flops == cost.flops


def test_a_graph_with_a_cache_gets_an_empty_one(tiny_causal_lm, llama_artifacts):
    ids = np.arange(3, 11, dtype=np.int64)[None]
    features = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    with_cache = onnx_cost(llama_artifacts["onnx-kv"] / GRAPH, features)
    assert with_cache.flops == onnx_cost(llama_artifacts["onnx"] / GRAPH, features).flops
    assert with_cache.flops == torch_cost(tiny_causal_lm[0], features).flops


def test_bytes_moved_narrows_float_weights_but_never_widens_them():
    fp32 = Cost(flops=0, float_weight_bytes=4000, quantized_weight_bytes=500, activation_elements=10,
                float_weight_elements=1000)
    assert fp32.bytes_moved(4) == 4000 + 500 + 40
    assert fp32.bytes_moved(2) == 2000 + 500 + 20
    fp16 = Cost(flops=0, float_weight_bytes=2000, quantized_weight_bytes=0, activation_elements=10,
                float_weight_elements=1000)
    assert fp16.bytes_moved(4) == 2000 + 40


def test_cpu_peak_picks_the_best_unit_and_scales_with_threads_and_clock():
    assert cpu_peak(ALL_X86, "int8", 2, 3.0) == (2048 * 2 * 3e9, "AMX int8 2 cores")
    no_amx = [flag for flag in ALL_X86 if not flag.startswith("amx")]
    assert cpu_peak(no_amx, "int8", 2, 3.0)[0] == 256 * 2 * 3e9
    assert cpu_peak(no_amx, "bf16", 2, 3.0)[0] == 128 * 2 * 3e9
    assert cpu_peak(["avx2", "fma"], "int8", 2, 3.0)[0] == 64 * 2 * 3e9
    assert cpu_peak(ALL_X86, "fp32", 4, 1.5)[0] == cpu_peak(ALL_X86, "fp32", 2, 3.0)[0] == 64 * 6e9
    peak, label = cpu_peak(["avx2", "fma"], "bf16", 1, 1.0)
    assert peak == 32e9 and "no bf16 units, fp32 peak" in label
    assert cpu_peak(ALL_X86, "fp16", 1, 1.0)[0] == 64e9
    assert cpu_peak(["asimd"], "fp32", 1, 1.0) == (8e9, "no known vector unit: 8 FLOP/cycle assumed 1 cores")


def test_gpu_peak_matches_the_device_name():
    assert gpu_peak("NVIDIA H200", "bf16") == (989e12, 4.8e12, "H200 bf16")
    assert gpu_peak("NVIDIA A100-SXM4-80GB", "int8")[:2] == (624e12, 1.94e12)
    assert gpu_peak("NVIDIA GeForce RTX 4090", "fp32") is None


def test_roofline_says_what_bounds_the_forward_and_how_far_from_the_floor_it_runs():
    # 1 GB moved at fp32: 0.1 G float weights and 0.15 G activation elements.
    low = Cost(flops=1e9, float_weight_bytes=4e8, quantized_weight_bytes=0, activation_elements=1.5e8,
               float_weight_elements=1e8)
    record = roofline(low, "fp32", 4, latency_ms=25, peak_flops=1e12, bandwidth=1e11, peak_label="AVX2 fp32")
    assert record["bytes"] == 1e9 and record["intensity"] == 1 and record["ridge"] == 10
    assert record["bound"] == "memory" and record["floor_ms"] == pytest.approx(10)
    assert record["x_floor"] == pytest.approx(2.5)
    assert roofline_line(record) == ("1 GFLOP, 1 GB per forward (1 FLOP/B; ridge 10 at AVX2 fp32): "
                                     "memory-bound, floor 10 ms, runs at 2.5x the floor")
    high = Cost(flops=1e12, float_weight_bytes=4e8, quantized_weight_bytes=0, activation_elements=1.5e8,
                float_weight_elements=1e8)
    record = roofline(high, "fp32", 4, latency_ms=2000, peak_flops=1e12, bandwidth=1e11,
                      peak_label="AVX2 fp32")
    assert record["bound"] == "compute" and record["floor_ms"] == pytest.approx(1000)
    assert "1 TFLOP, 1 GB per forward (1000 FLOP/B" in roofline_line(record)


def test_the_machine_measures():
    ghz = cpu_ghz()
    assert ghz is None or 0.1 < ghz < 10
    assert copy_bandwidth(mib=8, repeats=2) > 1e8
