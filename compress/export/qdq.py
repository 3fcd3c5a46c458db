"""Fake-quant torch model -> ONNX QDQ graph holding the learned scales (no re-calibration).

Each FakeQuantLinear is written as QuantizeLinear -> DequantizeLinear on its input (uint8, its learned scale
and zero point), DequantizeLinear of its weight stored as int8 ([in, out], axis 1: per output channel), MatMul,
and Add of the bias. ONNX Runtime fuses the pairs around a MatMul on [batch, tokens, features] into integer
kernels (MatMulIntegerToFloat); a Linear on [batch, features] (pooler, classifier) becomes a float Gemm over the
dequantized values. Stored as int8, the weights take a quarter of their fp32 bytes.

Each FakeQuantEmbedding is a Gather of the looked-up rows' codes (int8, int4 two to a uint8, or 3-bit in two
bit planes) and of their float16 scales, the packed codes split by float arithmetic (exact on 0..255) and
multiplied by the scales: only the rows a batch reads are dequantized, with default-domain ops every runtime
has. A byte's fields hold columns a width/fields apart (int4: j and j + width/2), so the fields join with one
Concat: interleaved nibbles needed a Reshape to a shape computed at run time, which cost OpenVINO 0.5 ms a
MiniLM-L6 inference (2.0 -> 2.5 ms, AMX, 2 threads). 3-bit codes are a plane of their low 2 bits (four to a
byte) and a plane of their high bit (eight to a byte), 3 bytes per 8 codes; their fitted levels are a Gather.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import onnx
import torch
from torch.nn import functional as F

from compress.algos.fake_quant import ACTIVATION_MAX, ACTIVATION_MIN, FakeQuantLinear, fake_quantize
from compress.algos.fake_quant_embedding import FakeQuantEmbedding
from compress.errors import ExportMismatch, RecipeError
from compress.export.onnx import export_onnx

MIN_OPSET = 13  # DequantizeLinear's per-axis scales
PLANES = {3: 2}  # packed code tables a quantized embedding stores: 3-bit codes in two bit planes, others in one


def export_fake_quant(model: Any, task: str, target: Path, opset: int, kv_cache: bool = False) -> Path:
    """Write `model`'s QDQ graph to `target`; ExportMismatch when a fake-quant layer did not become one."""
    if opset < MIN_OPSET:
        raise RecipeError(f"export.opset: a QDQ graph with per-channel scales needs opset >= {MIN_OPSET} "
                          f"(got {opset})")
    layers = [module for module in model.modules() if isinstance(module, FakeQuantLinear)]
    tables = [module for module in model.modules() if isinstance(module, FakeQuantEmbedding)]
    with written_as_qdq(layers, tables):
        graph = export_onnx(model, task, target, opset, kv_cache=kv_cache)
    int8_weights, looked_up = quantized_weight_count(graph), quantized_table_count(graph)
    planes = sum(PLANES.get(table.bits, 1) for table in tables)
    if int8_weights != len(layers) or looked_up != planes:
        raise ExportMismatch(f"{graph}: {int8_weights} int8 weights and {looked_up} packed code planes in the "
                             f"graph for {len(layers)} fake-quant layers and {len(tables)} tables ({planes} "
                             "planes); the exporter did not trace through every one")
    return graph


@contextmanager
def written_as_qdq(layers: list[FakeQuantLinear], tables: list[FakeQuantEmbedding]) -> Iterator[None]:
    """While exporting, each layer's and table's forward is one traced op whose ONNX form is its QDQ or lookup
    subgraph."""
    modules = [*layers, *tables]
    for layer in layers:
        layer.forward = qdq_function(layer).apply
    for table in tables:
        table.forward = lookup_function(table).apply
    try:
        yield
    finally:
        for module in modules:
            del module.forward


def qdq_function(layer: FakeQuantLinear) -> type[torch.autograd.Function]:
    """An op that computes `layer`'s fake-quant forward in torch and exports as its QDQ subgraph, from one
    snapshot of its numbers. The tracer passes only tensors to `symbolic`, and fails on parameters used inside
    a Function: hence a class per layer, holding plain copies by closure."""
    scale, zero_point = (tensor.detach().cpu().clone() for tensor in layer.input_qparams())
    weight, weight_scale = layer.quantized_weight().cpu(), layer.weight_scale().cpu()
    bias = None if layer.bias is None else layer.bias.detach().float().cpu().clone()

    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        on = x.device
        x = fake_quantize(x.float(), scale.to(on), zero_point.to(on).float(), ACTIVATION_MIN, ACTIVATION_MAX)
        return F.linear(x, (weight.float() * weight_scale).to(on), None if bias is None else bias.to(on))

    def symbolic(g: Any, x: Any) -> Any:
        def constant(tensor: torch.Tensor) -> Any:
            return g.op("Constant", value_t=tensor)

        x_scale, x_zero_point = constant(scale), constant(zero_point)
        x = g.op("DequantizeLinear", g.op("QuantizeLinear", x, x_scale, x_zero_point), x_scale, x_zero_point)
        per_column = weight_scale.reshape(-1 if layer.per_channel else ())
        w = g.op("DequantizeLinear", constant(weight.t().contiguous()), constant(per_column),
                 constant(torch.zeros(per_column.shape, dtype=torch.int8)), axis_i=1)
        y = g.op("MatMul", x, w)
        return y if bias is None else g.op("Add", y, constant(bias))

    return type("QDQLinear", (torch.autograd.Function,),
                {"forward": staticmethod(forward), "symbolic": staticmethod(symbolic)})


def lookup_function(table: FakeQuantEmbedding) -> type[torch.autograd.Function]:
    """An op that looks up `table`'s quantized rows in torch and exports as the Gather-and-dequantize subgraph
    (see `qdq_function` for why a class per table)."""
    codes = table.codes()  # once: the planes and the torch lookup both read them
    planes = packed_codes(codes.cpu(), table.bits)
    values, scales = table.code_values(codes).cpu(), table.row_scales().cpu()
    levels = None if table.levels is None else table.levels.detach().float().cpu().clone()

    def forward(ctx: Any, ids: torch.Tensor) -> torch.Tensor:
        on = ids.device
        return F.embedding(ids, values.to(on)) * F.embedding(ids, scales.to(on))

    def symbolic(g: Any, ids: Any) -> Any:
        def constant(value: Any) -> Any:
            return g.op("Constant", value_t=torch.as_tensor(value))

        def looked_up(plane: torch.Tensor) -> Any:
            return g.op("Cast", g.op("Gather", constant(plane), ids, axis_i=0), to_i=onnx.TensorProto.FLOAT)

        def fields(packed: Any, count: int) -> Any:
            """The `count` equal bit fields of each byte, lowest first, joined along the row."""
            base, parts = 2 ** (8 // count), []
            for _ in range(count - 1):
                rest = g.op("Floor", g.op("Mul", packed, constant(1 / base)))
                parts.append(g.op("Sub", packed, g.op("Mul", rest, constant(base))))
                packed = rest
            return g.op("Concat", *parts, packed, axis_i=-1)

        if table.bits == 8:
            rows = looked_up(planes[0])
        elif table.bits == 4:  # each byte holds two codes + 8: the first half's in the low nibble
            rows = g.op("Sub", fields(looked_up(planes[0]), 2), constant(8.0))
        else:  # a code's low two bits + 4 x its high bit: the index of its fitted level
            low, high = fields(looked_up(planes[0]), 4), fields(looked_up(planes[1]), 8)
            index = g.op("Add", low, g.op("Mul", high, constant(4.0)))
            rows = g.op("Gather", constant(levels), g.op("Cast", index, to_i=onnx.TensorProto.INT64), axis_i=0)
        row_scales = looked_up(scales.to(torch.float16))
        return g.op("Mul", rows, row_scales)

    return type("QuantizedLookup", (torch.autograd.Function,),
                {"forward": staticmethod(forward), "symbolic": staticmethod(symbolic)})


def packed_codes(codes: torch.Tensor, bits: int) -> list[torch.Tensor]:
    """The code planes the graph stores for a table's `codes` (FakeQuantEmbedding.codes), uint8 unless int8:
    int8 codes as they are; int4 codes offset to 0..15 (1..15: they are symmetric), column j in the low nibble
    of byte j and column j + width/2 in its high nibble [rows, width/2]; 3-bit codes (0..7) as a plane of their
    low 2 bits, byte j holding columns j + k*width/4 at bits 2k [rows, width/4], and a plane of their high bit,
    byte j holding columns j + k*width/8 at bit k [rows, width/8]."""
    if bits == 8:
        return [codes]
    if bits == 4:
        return [_pack((codes.to(torch.int16) + 8).to(torch.uint8), 4)]
    unsigned = codes.to(torch.uint8)
    return [_pack(unsigned & 3, 2), _pack(unsigned >> 2, 1)]


def _pack(fields: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 [rows, width * bits / 8]: byte j holds columns j, j + step, ... (step: its byte count), lowest first."""
    parts = fields.chunk(8 // bits, dim=1)
    packed = torch.zeros_like(parts[0])
    for index, part in enumerate(parts):
        packed |= part << (index * bits)
    return packed


def quantized_weight_count(graph: Path) -> int:
    """DequantizeLinear nodes that read a stored int8 tensor: one per quantized layer."""
    model, stored = _stored_2d(graph, onnx.TensorProto.INT8)
    return sum(1 for node in model.graph.node if node.op_type == "DequantizeLinear" and node.input[0] in stored)


def quantized_table_count(graph: Path) -> int:
    """Gather nodes that read a stored int8 or uint8 table: one per quantized embedding."""
    model, stored = _stored_2d(graph, onnx.TensorProto.INT8, onnx.TensorProto.UINT8)
    return sum(1 for node in model.graph.node if node.op_type == "Gather" and node.input[0] in stored)


def _stored_2d(graph: Path, *types: int) -> tuple[onnx.ModelProto, set[str]]:
    """The graph, and the names of its 2-D initializers and constants of those element types."""
    model = onnx.load(str(graph), load_external_data=False)
    stored = {tensor.name for tensor in model.graph.initializer if tensor.data_type in types
              and len(tensor.dims) == 2}
    stored |= {node.output[0] for node in model.graph.node if node.op_type == "Constant"
               and node.attribute[0].t.data_type in types and len(node.attribute[0].t.dims) == 2}
    return model, stored
