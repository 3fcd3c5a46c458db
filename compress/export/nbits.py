"""Weight-only quantization with ONNX Runtime: MatMul weights as 4- or 8-bit blocks with a scale each
(MatMulNBits), embedding tables as 4-bit blocks (GatherBlockQuantized); activations stay float."""

from __future__ import annotations

import contextlib
import io
import logging
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from compress.errors import DataError, RecipeError
from compress.export.calibration import graph_feeds
from compress.export.onnx import graph_bytes, save_graph
from compress.export.quantize import nodes_matching

NBITS_OPS = ("MatMulNBits", "GatherBlockQuantized")
INT4_OPSET = 21  # GatherBlockQuantized holds int4 tensors, a type of opset 21

# ORT's quantizer installs a root handler at import and logs every node at INFO.
logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)


def quantize_weight_only(source: Path, target: Path, *, bits: int, method: str, block_size: int, symmetric: bool,
                         accuracy_level: int, keep_fp32: list[str], quantize_embeddings: bool,
                         calibration: list[dict[str, np.ndarray]] | None, external_data: bool) -> dict[str, Any]:
    """Quantize the MatMul weights of `source` into `target` (and the embedding Gathers when asked), except
    nodes whose name contains a `keep_fp32` fragment; returns both sizes and what the graph now holds."""
    if bits == 8 and method != "rtn":
        # gptq writes 8-bit weights back as float (no MatMulNBits); hqq's float zero points have no 8-bit CPU kernel.
        raise RecipeError(f"bits: 8-bit weight-only needs method rtn (ONNX Runtime has no 8-bit {method} graph "
                          "that runs on its CPU provider)")
    if method == "gptq" and not calibration:
        raise DataError("data.calib: ptq weight-only gptq calibrates on rows, and data.calib (by default "
                        "data.train) holds none")
    source, target = Path(source), Path(target)
    excluded = nodes_matching(source, keep_fp32)
    model = onnx.load(str(source), load_external_data=False)
    embeddings = embedding_gathers(model, excluded) if quantize_embeddings and bits == 4 else []
    if embeddings:
        model = at_int4_opset(model)
    onnx.load_external_data_for_model(model, str(source.parent))
    untied = untie_transposed_weights(model, excluded)

    if method == "gptq":
        model = _gptq(model, bits, block_size, symmetric, excluded, calibration)
    elif method == "hqq":
        model = _hqq(model, bits, block_size, excluded)
    else:
        model = _rtn(model, bits, block_size, symmetric, excluded, ("MatMul",))
    if embeddings:
        model = _rtn(model, 4, block_size, symmetric, excluded, ("Gather",))
    _set_accuracy_level(model, accuracy_level)
    save_graph(model, target, external_data)

    nodes = [node for node in model.graph.node if node.op_type in NBITS_OPS]
    record = {
        "bytes_before": graph_bytes(source),
        "bytes_after": graph_bytes(target),
        "quantized_weights": len(nodes),
        "kept_fp32_nodes": len(excluded),
        "method": method,
        "bits": bits,
        "block_size": block_size,
        # hqq always writes zero points, so this is read from the graph rather than the setting
        "symmetric": not any(len(node.input) > 3 and node.input[3] for node in nodes),
        "accuracy_level": accuracy_level,
        "untied_weights": untied,
        "nbits_ops": dict(sorted(Counter(node.op_type for node in nodes).items())),
        # ORT pads such a weight with zeros up to whole blocks: it runs, but stores the padding
        "padded_weights": sum(_attribute(node, "K") % block_size != 0 for node in nodes if node.op_type == "MatMulNBits"),
    }
    if quantize_embeddings and not embeddings:
        record["embeddings_kept_float"] = ("GatherBlockQuantized is 4-bit only" if bits != 4 else
                                           "no Gather reads a weight table (a fused graph keeps it in "
                                           "EmbedLayerNormalization)")
    return record


def embedding_gathers(model: onnx.ModelProto, excluded: list[str]) -> list[str]:
    """Gathers that look up rows of a weight table (not shape arithmetic), outside `excluded`."""
    weights = {tensor.name for tensor in model.graph.initializer}
    return [node.name for node in model.graph.node
            if node.op_type == "Gather" and node.input[0] in weights and node.name not in excluded]


def untie_transposed_weights(model: onnx.ModelProto, excluded: list[str]) -> int:
    """Store as a weight of its own each Transpose of a weight that feeds MatMuls; returns how many.

    A tied lm_head (Llama, SmolLM2) reads the embedding table through such a Transpose, and the quantizer
    only takes a MatMul whose weight is an initializer: it would leave the largest matrix in float. ONNX
    Runtime folds that Transpose at load anyway, so the float graph held both copies in memory already.
    """
    weights = {tensor.name: tensor for tensor in model.graph.initializer}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    folded = [node for node in model.graph.node
              if node.op_type == "Transpose" and node.input[0] in weights and readers.get(node.output[0])
              and all(reader.op_type == "MatMul" and reader.input[1] == node.output[0]
                      and reader.name not in excluded for reader in readers[node.output[0]])]
    for node in folded:
        table = onnx.numpy_helper.to_array(weights[node.input[0]])
        model.graph.initializer.append(onnx.numpy_helper.from_array(table.transpose(_attribute(node, "perm")),
                                                                    node.output[0]))
        model.graph.node.remove(node)
    return len(folded)


def at_int4_opset(model: onnx.ModelProto) -> onnx.ModelProto:
    """The graph at opset 21 (GatherBlockQuantized's int4 tables need it).

    ONNX's converter rewrites the ops whose meaning changed since (ReduceMean's axes became an input at 18),
    but it cannot read ORT's fused ops. ORT's quantizer then only relabels the opset, which is sound for a
    fused graph: its normalisations, where those ops were, are fused away.
    """
    if _default_opset(model) >= INT4_OPSET:
        return model
    try:
        converted = onnx.version_converter.convert_version(model, INT4_OPSET)
    except RuntimeError:
        return model
    # The converter leaves its shape inference's value_info behind: metadata as large as a small model's weights.
    converted.graph.ClearField("value_info")
    converted.graph.value_info.extend(model.graph.value_info)
    return converted


def _default_opset(model: onnx.ModelProto) -> int:
    return next(entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx"))


def _rtn(model: onnx.ModelProto, bits: int, block_size: int, symmetric: bool, excluded: list[str],
         op_types: tuple[str, ...]) -> onnx.ModelProto:
    """Round to nearest with ORT's own block quantizer: 4 or 8 bits, symmetric or not, MatMul and Gather
    (its RTNWeightOnlyQuantConfig takes another route, MatMul only)."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    quantizer = MatMulNBitsQuantizer(model, bits=bits, block_size=block_size, is_symmetric=symmetric,
                                     nodes_to_exclude=excluded, op_types_to_quantize=op_types)
    with np.errstate(divide="ignore", invalid="ignore"):  # an all-zero row (padding token) has scale 0, masked after
        quantizer.process()
    return quantizer.model.model


def _hqq(model: onnx.ModelProto, bits: int, block_size: int, excluded: list[str]) -> onnx.ModelProto:
    from onnxruntime.quantization.matmul_nbits_quantizer import HQQWeightOnlyQuantConfig, MatMulNBitsQuantizer

    config = HQQWeightOnlyQuantConfig(block_size=block_size, bits=bits)
    quantizer = MatMulNBitsQuantizer(model, nodes_to_exclude=excluded, algo_config=config)
    quantizer.process()
    return quantizer.model.model


def _gptq(model: onnx.ModelProto, bits: int, block_size: int, symmetric: bool, excluded: list[str],
          calibration: list[dict[str, np.ndarray]]) -> onnx.ModelProto:
    """ORT's GPTQ, called directly: through MatMulNBitsQuantizer it ignores `nodes_to_exclude`."""
    from onnxruntime.quantization.neural_compressor import gptq_quantize

    batches = [(graph_feeds(model.graph.input, batch), None) for batch in calibration]
    with contextlib.redirect_stdout(io.StringIO()):  # it draws a progress bar on stdout
        quantized = gptq_quantize(model, batches, weight_config=dict.fromkeys(excluded, "fp32"), num_bits=bits,
                                  group_size=block_size, scheme="sym" if symmetric else "asym", n_samples=-1)
    return quantized.model


def _set_accuracy_level(model: onnx.ModelProto, level: int) -> None:
    """The compute type of every MatMulNBits (4: int8 activations); the hqq and gptq writers leave it unset."""
    for node in model.graph.node:
        if node.op_type == "MatMulNBits" and level and not any(a.name == "accuracy_level" for a in node.attribute):
            node.attribute.append(onnx.helper.make_attribute("accuracy_level", level))


def _attribute(node: onnx.NodeProto, name: str) -> Any:
    return next((onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == name), None)
