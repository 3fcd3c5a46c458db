"""Dynamic int8 quantization with ONNX Runtime: int8 weights, activations quantized per batch at run time."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import onnx

# Ops of ONNX Runtime's integer kernels: a graph holding any of them has been quantized.
INT8_OPS = frozenset({"DynamicQuantizeLinear", "MatMulInteger", "DynamicQuantizeMatMul", "QAttention",
                      "QEmbedLayerNormalization", "QGemm"})
# Where each quantizable op holds its weight: a node of these ops whose weight is an initializer is a layer.
DYNAMIC_WEIGHTS = {"MatMul": 1, "Gemm": 1, "Attention": 1, "Gather": 0, "EmbedLayerNormalization": 2}
EMBEDDING_OPS = frozenset({"Gather", "EmbedLayerNormalization"})
# Signed weights against ONNX Runtime's unsigned dynamic activations: u8s8 is the pairing x86 VNNI/AMX and Arm
# dot-product kernels compute natively; on AVX2 without VNNI, reduce_range (auto) avoids its saturation. On an
# AVX2 CPU without VNNI they ran MiniLM-L6 ~10% faster than unsigned ones (batch 1, seq 128, 2 threads), at the
# same accuracy.
AUTO_WEIGHT_TYPE = "int8"


def quantize_dynamic_int8(src: Path, dst: Path, per_channel: bool, reduce_range: bool,
                          keep_fp32: list[str] = (), external_data: bool = False, weight_type: str = "int8",
                          quantize_embeddings: bool = True, float_nodes: list[str] = ()) -> dict[str, Any]:
    """Quantize `src` into `dst`, except nodes whose name contains a `keep_fp32` pattern or is in `float_nodes`;
    returns both sizes, how many int8 ops and weights the new graph holds and how many nodes were kept in fp32."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.registry import IntegerOpsRegistry

    src, dst = Path(src), Path(dst)
    excluded = nodes_matching(src, keep_fp32)
    op_types = [op for op in IntegerOpsRegistry if quantize_embeddings or op not in EMBEDDING_OPS]
    quantize_dynamic(
        src,
        dst,
        op_types_to_quantize=op_types,
        per_channel=per_channel,
        reduce_range=reduce_range,
        weight_type=QuantType.QInt8 if weight_type == "int8" else QuantType.QUInt8,
        nodes_to_exclude=[*excluded, *gemm_aliases(src, float_nodes)],
        use_external_data_format=external_data,
        # ONNX shape inference cannot type the outputs of ORT's fused ops (Attention, SkipLayerNormalization);
        # every float in our graphs is fp32.
        extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
    )
    return {
        "bytes_before": src.stat().st_size,
        "bytes_after": dst.stat().st_size,
        "weight_type": weight_type,
        "reduce_range": reduce_range,
        "int8_ops": int8_op_counts(dst),
        "quantized_weights": int8_weight_count(dst),
        "kept_fp32_nodes": len(excluded),
    }


def resolved_weight_type(requested: str) -> str:
    return AUTO_WEIGHT_TYPE if requested == "auto" else requested


def quantizable_layers(path: Path, weight_inputs: dict[str, int], keep_fp32: list[str] = ()) -> dict[str, str]:
    """Node name -> op of every node of `weight_inputs`' ops whose weight is an initializer (a Linear, an
    embedding table), in graph order, less those `keep_fp32` keeps in float."""
    graph = onnx.load(str(path), load_external_data=False).graph
    weights = {weight.name for weight in graph.initializer}
    kept = set(nodes_matching(path, keep_fp32))
    return {node.name: node.op_type for node in graph.node
            if node.op_type in weight_inputs and len(node.input) > weight_inputs[node.op_type]
            and node.input[weight_inputs[node.op_type]] in weights and node.name not in kept}


def nodes_matching(path: Path, patterns: list[str]) -> list[str]:
    if not patterns:
        return []
    graph = onnx.load(str(path), load_external_data=False).graph
    matched = [node.name for node in graph.node if any(pattern in node.name for pattern in patterns)]
    return gemm_aliases(path, matched)


def gemm_aliases(path: Path, names: list[str]) -> list[str]:
    """`names` and, for a Gemm, '<gemm>_MatMul': dynamic quantization first splits each Gemm into MatMul + Add
    so named, and matches the exclusions against that new name."""
    if not names:
        return []
    gemms = {node.name for node in onnx.load(str(path), load_external_data=False).graph.node if node.op_type == "Gemm"}
    return [*names, *(f"{name}_MatMul" for name in names if name in gemms)]


def int8_op_counts(path: Path) -> dict[str, int]:
    return op_counts(path, INT8_OPS)


def op_counts(path: Path, ops: frozenset[str]) -> dict[str, int]:
    graph = onnx.load(str(path), load_external_data=False).graph
    return dict(sorted(Counter(node.op_type for node in graph.node if node.op_type in ops).items()))


def int8_weight_count(path: Path) -> int:
    """Weights stored as 8-bit integers: zero means nothing was really quantized."""
    graph = onnx.load(str(path), load_external_data=False).graph
    eight_bit = (onnx.TensorProto.INT8, onnx.TensorProto.UINT8)
    return sum(1 for weight in graph.initializer if weight.data_type in eight_bit and len(weight.dims) >= 2)
