"""Half-precision graphs with ONNX Runtime's converter: fp16 weights and compute, fp32 inputs and logits."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import onnx

from compress.export.onnx import graph_bytes, save_graph
from compress.export.quantize import nodes_matching


def convert_fp16(source: Path, target: Path, keep_fp32: list[str] = (), external_data: bool = False) -> dict[str, Any]:
    """Convert `source` into `target`, except nodes whose name contains a `keep_fp32` fragment; returns both
    sizes and how many initializers became fp16."""
    from onnxruntime.transformers.onnx_model import OnnxModel

    source, target = Path(source), Path(target)
    excluded = nodes_matching(source, keep_fp32)
    # ORT's route for fused graphs: its symbolic shape inference types the outputs of its own ops, which ONNX's
    # cannot, and without those types no Cast is put before a node kept in fp32. keep_io_types: the inputs and
    # logits keep their types, so every runner and metric reads the graph as before.
    model = OnnxModel(onnx.load(str(source)))
    model.convert_float_to_float16(keep_io_types=True, node_block_list=excluded)
    save_graph(model.model, target, external_data)
    return {
        "bytes_before": graph_bytes(source),
        "bytes_after": graph_bytes(target),
        "fp16_initializers": sum(t.data_type == onnx.TensorProto.FLOAT16 for t in model.model.graph.initializer),
        "kept_fp32_nodes": len(excluded),
    }
