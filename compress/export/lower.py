"""Weight-only torch model -> ONNX graph whose quantized layers are ONNX Runtime MatMulNBits nodes holding the
very integers, scales and zero points of the torch layers."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from compress.algos.weight_only import WeightOnlyLinear, dequantized_copy, quantized_layers
from compress.artifact import GRAPH_DATA, graph_files
from compress.errors import ExportMismatch, RecipeError
from compress.export.onnx import export_onnx, save_graph

CONTRIB = "com.microsoft"


def export_weight_only(model: Any, task: str, target: Path, opset: int, kv_cache: bool = False) -> Path:
    """Export the dequantized float twin of `model`, then swap each quantized layer's MatMul (or Gemm) for a
    MatMulNBits node; the layer is found by its weight, which the exporter writes transposed (MatMul) or as is
    (Gemm)."""
    layers = quantized_layers(model)
    for layer in layers.values():
        if layer.group_size < 16 or layer.group_size & (layer.group_size - 1):
            raise RecipeError(f"quantize.group_size: MatMulNBits needs a power of two >= 16, not {layer.group_size}")
    graph_path = export_onnx(dequantized_copy(model), task, target, opset, kv_cache=kv_cache)
    external = len(graph_files(graph_path)) > 1
    graph = onnx.load(str(graph_path))
    lowered = lower_to_matmulnbits(graph, layers)
    missing = sorted(set(layers) - lowered)
    if missing:
        raise ExportMismatch(f"export: {len(missing)} quantized layers have no MatMul with their weight in the "
                             f"exported graph ({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''})")
    if external:  # onnx appends to an existing data file
        graph_path.with_name(GRAPH_DATA).unlink()
    save_graph(graph, graph_path, external)
    return graph_path


def lower_to_matmulnbits(graph: onnx.ModelProto, layers: dict[str, WeightOnlyLinear]) -> set[str]:
    """Rewrite `graph` in place; returns the names of the layers lowered."""
    transposed = {_digest(layer.dequantized_weight().T): name for name, layer in layers.items()}
    as_is = {_digest(layer.dequantized_weight()): name for name, layer in layers.items()}
    initializers = {init.name: init for init in graph.graph.initializer}
    lowered, added, used = set(), {}, set()
    for index, node in enumerate(graph.graph.node):
        weight = initializers.get(node.input[1]) if len(node.input) > 1 else None
        if weight is None or len(weight.dims) != 2:
            continue
        if node.op_type == "MatMul":
            name = transposed.get(_digest(numpy_helper.to_array(weight)))
            bias = ""
        elif node.op_type == "Gemm" and _plain_linear_gemm(node):
            name = as_is.get(_digest(numpy_helper.to_array(weight)))
            bias = node.input[2] if len(node.input) > 2 else ""
        else:
            continue
        if name is None:
            continue
        if name not in added:
            added[name] = _matmulnbits_initializers(name, layers[name])
        graph.graph.node[index].CopyFrom(_matmulnbits_node(node, name, layers[name], added[name], bias))
        lowered.add(name)
        used.add(weight.name)
    still_read = {name for node in graph.graph.node for name in node.input}
    kept = [init for init in graph.graph.initializer if init.name not in used or init.name in still_read]
    del graph.graph.initializer[:]
    graph.graph.initializer.extend(kept + [init for inits in added.values() for init in inits])
    if lowered and not any(entry.domain == CONTRIB for entry in graph.opset_import):
        graph.opset_import.append(helper.make_opsetid(CONTRIB, 1))
    return lowered


def _plain_linear_gemm(node: onnx.NodeProto) -> bool:
    """x W^T + b: what torch exports for a Linear on a 2-D input."""
    attributes = {attribute.name: helper.get_attribute_value(attribute) for attribute in node.attribute}
    return (attributes.get("transB") == 1 and not attributes.get("transA") and attributes.get("alpha", 1.0) == 1.0
            and attributes.get("beta", 1.0) == 1.0)


def _matmulnbits_initializers(name: str, layer: WeightOnlyLinear) -> list[onnx.TensorProto]:
    """B uint8 [N, blocks, block_size * bits / 8], scales [N * blocks], zero points packed per row like B."""
    blocks = layer.in_features // layer.group_size
    codes = layer.codes.numpy().reshape(layer.out_features, blocks, -1)
    tensors = [numpy_helper.from_array(codes, f"{name}.qweight"),
               numpy_helper.from_array(layer.scales.numpy().astype(np.float32).reshape(-1), f"{name}.scales")]
    if not layer.symmetric:
        zero_points = layer.zero_points.numpy()
        if layer.bits == 4:
            if blocks % 2:  # each row is padded to whole bytes
                zero_points = np.pad(zero_points, ((0, 0), (0, 1)))
            zero_points = zero_points[:, 0::2] | (zero_points[:, 1::2] << 4)
        tensors.append(numpy_helper.from_array(zero_points.astype(np.uint8).reshape(-1), f"{name}.zero_points"))
    return tensors


def _matmulnbits_node(node: onnx.NodeProto, name: str, layer: WeightOnlyLinear, initializers: list[onnx.TensorProto],
                      bias: str) -> onnx.NodeProto:
    inputs = [node.input[0], *(tensor.name for tensor in initializers)]
    if bias:  # inputs 3 and 4 (zero points, g_idx) may be empty
        inputs += [""] * (5 - len(inputs)) + [bias]
    # No accuracy_level: fp32 arithmetic, so the graph computes what the torch model computes; int8
    # activations (level 4) are the choice of `ptq: {mode: weight-only}`, for speed.
    return helper.make_node("MatMulNBits", inputs, list(node.output), name=f"{node.name or name}_Q{layer.bits}",
                            domain=CONTRIB, K=layer.in_features, N=layer.out_features, bits=layer.bits,
                            block_size=layer.group_size)


def _digest(weight: Any) -> str:
    array = weight.detach().contiguous().numpy() if hasattr(weight, "detach") else np.ascontiguousarray(weight)
    return hashlib.sha256(np.ascontiguousarray(array, dtype=np.float32).tobytes()).hexdigest()
