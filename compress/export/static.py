"""Static int8 (QDQ) quantization with ONNX Runtime: activation ranges calibrated once, then any set of layers
quantized from them, so sensitivity and fallback trials never calibrate again."""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from compress.errors import ArtifactError, BackendError
from compress.export.calibration import graph_feeds
from compress.export.quantize import int8_weight_count, nodes_matching, op_counts, quantizable_layers
from compress.sysinfo import machine_info

# Linears (with a constant weight: not attention's activation x activation products) and embedding tables.
STATIC_WEIGHTS = {"MatMul": 1, "Gemm": 1, "Gather": 0}
QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear"})
# ORT-fused ops that hold weights QDQ cannot quantize: on such a graph the attention and embedding weights would
# stay float, a fraction of the size reduction asked for.
UNQUANTIZABLE_FUSIONS = frozenset({"Attention", "EmbedLayerNormalization"})
ARM = ("aarch64", "arm64")


class StaticInt8:
    """A graph pre-processed for ONNX Runtime's quantizer and calibrated once; `quantize` writes QDQ graphs."""

    def __init__(self, src: Path, workdir: Path, batches: list[dict[str, np.ndarray]], method: str = "minmax",
                 percentile: float = 99.999, per_channel: bool = True, reduce_range: bool = False,
                 weight_type: str = "int8", activation_type: str = "uint8", keep_fp32: list[str] = (),
                 quantize_embeddings: bool = True, external_data: bool = False) -> None:
        self.src, self.method, self.external_data = Path(src), method, external_data
        self.settings = {"per_channel": per_channel, "reduce_range": reduce_range,
                         "weight_type": weight_type, "activation_type": activation_type}
        self.graph = preprocessed(self.src, Path(workdir) / "preprocessed.onnx", external_data)
        self.kept_fp32 = nodes_matching(self.graph, keep_fp32)
        weights = {op: at for op, at in STATIC_WEIGHTS.items() if quantize_embeddings or op != "Gather"}
        self.layers = quantizable_layers(self.graph, weights, keep_fp32)
        # Activation Gathers, attention's activation x activation MatMuls and the keep_fp32 nodes stay float.
        nodes = onnx.load(str(self.graph), load_external_data=False).graph.node
        self.never_quantized = [node.name for node in nodes
                                if node.op_type in STATIC_WEIGHTS and node.name not in self.layers]
        self.ranges = Path(workdir) / "ranges.json"
        rows = calibrate(self.graph, self.ranges, batches, method, percentile, external_data)
        self.calibration = {"method": method, "rows": rows}
        if method == "percentile":
            self.calibration["percentile"] = percentile

    def quantize(self, dst: Path, float_nodes: list[str] = ()) -> dict[str, Any]:
        """QDQ int8 of every layer but `float_nodes` (and keep_fp32's), written to `dst`."""
        from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

        types = {"int8": QuantType.QInt8, "uint8": QuantType.QUInt8}
        settings = self.settings
        quantize_static(
            self.graph,
            dst,
            None,  # the ranges are read from the calibration made once in __init__
            quant_format=QuantFormat.QDQ,
            per_channel=settings["per_channel"],
            reduce_range=settings["reduce_range"],
            weight_type=types[settings["weight_type"]],
            activation_type=types[settings["activation_type"]],
            nodes_to_exclude=[*self.never_quantized, *float_nodes],
            op_types_to_quantize=list(STATIC_WEIGHTS),
            use_external_data_format=self.external_data,
            calibrate_method=calibration_method(self.method),
            calibration_cache_path=self.ranges,
        )
        return {
            "bytes_before": self.src.stat().st_size,
            "bytes_after": Path(dst).stat().st_size,
            **settings,
            "calibration": self.calibration,
            "qdq_ops": op_counts(Path(dst), QDQ_OPS),
            "quantized_weights": int8_weight_count(Path(dst)),
            "kept_fp32_nodes": len(self.kept_fp32),
        }


def auto_activation_type() -> str:
    """uint8 on x86, whose int8 GEMM kernels (AVX2, VNNI, AMX) take unsigned activations with signed weights (ONNX
    Runtime converts an s8s8 QDQ graph to u8s8 when it loads it); int8 on Arm, whose dot-product kernels are
    signed x signed."""
    return "int8" if machine_info()["arch"] in ARM else "uint8"


def calibration_method(name: str) -> Any:
    from onnxruntime.quantization import CalibrationMethod

    return {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
            "entropy": CalibrationMethod.Entropy}[name]


def preprocessed(src: Path, dst: Path, external_data: bool) -> Path:
    """ONNX Runtime's pre-processing (symbolic shape inference, basic optimizations) on a copy: its quantizer
    leaves a tensor of unknown shape in float."""
    from onnxruntime.quantization import quant_pre_process

    fused = sorted({node.op_type for node in onnx.load(str(src), load_external_data=False).graph.node}
                   & UNQUANTIZABLE_FUSIONS)
    if fused:
        raise ArtifactError(f"ptq mode static: the graph is fused for ONNX Runtime ({', '.join(fused)}), whose "
                            "weights QDQ cannot quantize; quantize the portable graph (put ptq before ort-fuse, or "
                            "branch from the export stage with 'from')")
    # auto_merge: the exported graphs' symbolic dims (batch, sequence) meet in ops that inference cannot unify.
    # When inference still fails, ONNX Runtime dumps its partial graph into the working directory and raises a
    # bare Exception: run it from the scratch directory, and say what failed.
    here, src, dst = os.getcwd(), src.resolve(), dst.resolve()
    os.chdir(dst.parent)
    try:
        quant_pre_process(src, dst, auto_merge=True, save_as_external_data=external_data)
    except Exception as err:
        raise BackendError(f"ptq mode static: ONNX Runtime's pre-processing failed on this graph ({err}); "
                           "use ptq mode dynamic or weight-only") from err
    finally:
        os.chdir(here)
    return dst


def calibrate(graph: Path, ranges: Path, batches: list[dict[str, np.ndarray]], method: str, percentile: float,
              external_data: bool) -> int:
    """Observe every batch through the graph and save the activation ranges `method` chooses to `ranges`;
    returns how many rows were observed. Batch by batch, so no more than one batch's activations are held."""
    from onnxruntime.quantization import create_calibrator, save_tensors_data

    options = {"percentile": percentile} if method == "percentile" else {}
    calibrator = create_calibrator(graph, list(STATIC_WEIGHTS), str(ranges.with_name("augmented.onnx")),
                                   calibration_method(method), external_data, extra_options=options)
    inputs = onnx.load(str(graph), load_external_data=False).graph.input
    with contextlib.redirect_stdout(io.StringIO()):  # the histogram calibrators print a banner per batch
        for batch in batches:
            calibrator.collect_data(_Once(graph_feeds(inputs, batch)))
    save_tensors_data(calibrator.compute_data(), ranges)
    return sum(len(batch["input_ids"]) for batch in batches)


class _Once:
    """A calibration data reader of one batch."""

    def __init__(self, feeds: dict[str, np.ndarray]) -> None:
        self.feeds: Iterator[dict[str, np.ndarray]] = iter([feeds])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self.feeds, None)
