"""Where a variant sits on this machine's roofline: the FLOPs and bytes one forward pass needs, against the
peak compute and memory bandwidth, and how far above that floor the measured latency runs."""

from __future__ import annotations

import inspect
import json
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from compress.eval.runners import OrtRunner

# ONNX Runtime's fused attention: the QKV projection, then the scores and values products.
ATTENTION_OPS = {"Attention", "QAttention"}
# Inputs that are tables a forward gathers rows of, by op: read only as many rows as there are tokens.
TABLE_INPUTS = {"Gather": (0,), "GatherBlockQuantized": (0, 2, 3), "EmbedLayerNormalization": (2, 3, 4),
                "QEmbedLayerNormalization": (2, 3, 4)}
# Scalars and shape constants, not weights.
MIN_WEIGHT_ELEMENTS = 16
# Nominal per-core FLOP (int8: ops) per cycle, best unit first, from Intel's 64 and IA-32 Architectures
# Optimization Reference Manual: two FMA ports of 16 (AVX512) or 8 (AVX2) fp32 lanes, AMX tile multiplies.
CPU_UNITS = {
    "fp32": ((("avx512f",), "AVX512", 64), (("avx2", "fma"), "AVX2", 32)),
    "bf16": ((("amx_bf16",), "AMX", 1024), (("avx512_bf16",), "AVX512_BF16", 128)),
    "int8": ((("amx_int8",), "AMX", 2048), (("avx512_vnni",), "AVX512_VNNI", 256),
             (("avx_vnni",), "AVX_VNNI", 128), (("avx2",), "AVX2", 64)),
}
UNKNOWN_UNIT = (8, "no known vector unit: 8 FLOP/cycle assumed")
# Dense (no sparsity) peaks from NVIDIA's H200, H100 SXM and A100 80GB datasheets: FLOP/s by precision,
# and HBM bytes/s.
HOPPER = {"fp32": 67e12, "bf16": 989e12, "fp16": 989e12, "int8": 1979e12}
GPU_PEAKS = (("H200", HOPPER, 4.8e12), ("H100", HOPPER, 3.35e12),
             ("A100", {"fp32": 19.5e12, "bf16": 312e12, "fp16": 312e12, "int8": 624e12}, 1.94e12))
PREFIXES = ("", "K", "M", "G", "T", "P")


@dataclass(frozen=True)
class Cost:
    """What one forward pass at the benchmark's shape computes and must move, counted from the artifact."""
    flops: float                   # 2 x multiply-adds of every matrix product, weights' and attention's
    float_weight_bytes: float      # float weights as stored (fp32 4 B, fp16/bf16 2 B per element), read once
    quantized_weight_bytes: float  # integer weights (int8 1 B, 4-bit 0.5 B), scales, zero points, read once
    activation_elements: float     # elements going into and out of every matrix product (not weights)
    float_weight_elements: float   # the elements of float_weight_bytes, to re-count them at a runtime's width

    def bytes_moved(self, float_width: float) -> float:
        """Float weights re-counted at `float_width` bytes per element (a bf16 runtime hint halves fp32
        weights; never widens fp16 ones), quantized weights as stored, activations at `float_width`."""
        # The min is exact whenever the float weights all have one width, or all are wider or narrower.
        floats = min(self.float_weight_bytes, self.float_weight_elements * float_width)
        return floats + self.quantized_weight_bytes + self.activation_elements * float_width


def onnx_cost(graph: Path, features: dict[str, np.ndarray]) -> Cost:
    """Run `graph` once in onnxruntime with profiling: FLOPs and activations of its matrix products from the
    profiled shapes, weights from its initializers (external data is not read)."""
    import onnx

    tokens = _batch_tokens(features)[1]
    with tempfile.TemporaryDirectory() as profile_dir:
        runner = OrtRunner(graph, threads=1, profile=Path(profile_dir) / "cost")
        runner.logits(features)  # position ids and an empty cache as the bench feeds them
        events = json.loads(Path(runner.session.end_profiling()).read_text())
    flops = activations = 0.0
    for event in events:
        args = event.get("args", {})
        if event.get("cat") != "Node" or not event["name"].endswith("_kernel_time"):
            continue
        if _is_product(args["op_name"]):
            shapes = [[next(iter(typed.values())) for typed in args[key]]
                      for key in ("input_type_shape", "output_type_shape")]
            node_flops, node_activations = _product_cost(args["op_name"], *shapes)
            flops, activations = flops + node_flops, activations + node_activations
    weights = _initializers(onnx.load(str(graph), load_external_data=False).graph)
    return Cost(flops=flops, activation_elements=activations, **_weight_bytes(weights, tokens))


def _batch_tokens(features: dict[str, np.ndarray]) -> tuple[int, int]:
    ids = features.get("input_ids", next(iter(features.values())))
    return int(ids.shape[0]), math.prod(ids.shape[:2])


def _is_product(op: str) -> bool:
    # MatMul, FusedMatMul, MatMulInteger(ToFloat), DynamicQuantizeMatMul, QLinearMatMul, MatMulNBits, QGemm...
    return "MatMul" in op or "Gemm" in op or op in ATTENTION_OPS


def _product_cost(op: str, inputs: list[list[int]], outputs: list[list[int]]) -> tuple[float, float]:
    """(FLOPs, activation elements) of one profiled matrix product."""
    first, output = inputs[0], outputs[0]
    if op in ATTENTION_OPS:
        batch, seq, hidden_in = first
        hidden = output[-1]
        flops = 2 * batch * seq * hidden_in * 3 * hidden + 4 * batch * seq * seq * hidden
    else:
        flops = 2 * math.prod(output) * first[-1]
    # Biases, scales and weights the runtime did not pre-pack are listed too: a second operand is an
    # activation only when it is batched like the first (attention scores and values).
    operands = inputs[:2] if len(inputs) > 1 and len(inputs[1]) == len(first) >= 3 else [first]
    return float(flops), float(sum(math.prod(shape) for shape in [*operands, output]))


def _initializers(graph) -> list[tuple[list[int], float, bool, bool]]:
    """(shape, bytes per element, is float, only gathered) of each initializer that is a weight."""
    from onnx import TensorProto, helper

    float_types = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE)
    tables, read_whole = set(), set()
    for node in graph.node:
        slots = TABLE_INPUTS.get(node.op_type, ())
        for index, name in enumerate(node.input):
            (tables if index in slots else read_whole).add(name)
    return [(list(tensor.dims), 0.5 if tensor.data_type in (TensorProto.INT4, TensorProto.UINT4)
             else helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize, tensor.data_type in float_types,
             tensor.name in tables - read_whole)
            for tensor in graph.initializer if math.prod(tensor.dims) >= MIN_WEIGHT_ELEMENTS]


def _weight_bytes(weights: list[tuple[list[int], float, bool, bool]], tokens: int) -> dict[str, float]:
    """Cost's weight fields from (shape, bytes per element, is float, only gathered) of each weight."""
    counts = {"float_weight_bytes": 0.0, "float_weight_elements": 0.0, "quantized_weight_bytes": 0.0}
    for shape, width, is_float, gathered in weights:
        elements = math.prod(shape)
        if gathered:
            elements = elements // shape[0] * min(shape[0], tokens)
        counts["float_weight_bytes" if is_float else "quantized_weight_bytes"] += elements * width
        counts["float_weight_elements"] += elements if is_float else 0
    return counts


def torch_cost(model, features: dict[str, np.ndarray]) -> Cost:
    """One forward under torch's FlopCounterMode (matrix products and attention). Activations are the inputs
    and outputs of the Linear (and transformers' Conv1D) layers only, not attention's scores and values."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count
    from transformers.pytorch_utils import Conv1D

    accepts = inspect.signature(model.forward).parameters
    device = next(model.parameters()).device
    inputs = {name: torch.from_numpy(array).to(device) for name, array in features.items() if name in accepts}
    activations = []

    def count(_, args, output) -> None:
        activations.append(args[0].numel() + output.numel())

    hooks = [module.register_forward_hook(count)
             for module in model.modules() if isinstance(module, (torch.nn.Linear, Conv1D))]
    # torch's counter knows the GPU attention kernels but not the CPU one that sdpa dispatches to.
    cpu_attention = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu:
                     lambda query, key, value, *_, **__: sdpa_flop_count(query, key, value)}
    try:
        with torch.inference_mode(), FlopCounterMode(display=False, custom_mapping=cpu_attention) as counter:
            model(**inputs)
    finally:
        for hook in hooks:
            hook.remove()
    tables, read_whole = set(), set()
    for module in model.modules():
        for parameter in module.parameters(recurse=False):
            (tables if isinstance(module, torch.nn.Embedding) else read_whole).add(id(parameter))
    weights = [(list(parameter.shape), parameter.element_size(), parameter.dtype.is_floating_point,
                id(parameter) in tables - read_whole) for parameter in model.parameters()]
    return Cost(flops=float(counter.get_total_flops()), activation_elements=float(sum(activations)),
                **_weight_bytes(weights, _batch_tokens(features)[1]))


def cpu_peak(isa: list[str], precision: str, threads: int, ghz: float) -> tuple[float, str]:
    """Peak FLOP/s (int8: ops/s) of the best unit `isa` has for `precision`, on `threads` cores at `ghz`;
    the fp32 peak without one."""
    flags = set(isa)
    found = _unit(flags, precision)
    if found is None:
        per_cycle, label = _unit(flags, "fp32") or UNKNOWN_UNIT
        found = per_cycle, label if precision == "fp32" else f"{label} (no {precision} units, fp32 peak)"
    per_cycle, label = found
    return per_cycle * threads * ghz * 1e9, f"{label} {threads} cores"


def _unit(flags: set[str], precision: str) -> tuple[int, str] | None:
    units = (unit for unit in CPU_UNITS.get(precision, ()) if flags >= set(unit[0]))
    return next(((per_cycle, f"{name} {precision}") for _, name, per_cycle in units), None)


def gpu_peak(name: str, precision: str) -> tuple[float, float, str] | None:
    """(FLOP/s, bytes/s, label) of the first table entry whose model is in the device `name`, else None."""
    for model, flops, bandwidth in GPU_PEAKS:
        if model in name:
            return flops[precision], bandwidth, f"{model} {precision}"
    return None


def cpu_ghz() -> float | None:
    """The first "cpu MHz" of /proc/cpuinfo, in GHz; None where there is none."""
    try:
        with open("/proc/cpuinfo") as handle:
            mhz = next((line.partition(":")[2] for line in handle if line.startswith("cpu MHz")), None)
    except OSError:
        return None
    return None if mhz is None else float(mhz) / 1000


def copy_bandwidth(mib: int = 256, repeats: int = 3) -> float:
    """Bytes/s of one numpy copy of `mib` MiB, read plus write, best of `repeats`."""
    source = np.ones(mib << 20, dtype=np.uint8)
    target = source.copy()  # touches every page, so no timed copy pays for page faults
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        np.copyto(target, source)
        best = min(best, time.perf_counter() - start)
    return 2 * source.nbytes / best


def roofline(cost: Cost, compute: str, float_width: float, latency_ms: float, peak_flops: float,
             bandwidth: float, peak_label: str) -> dict:
    """The cost against the peaks: what bounds the forward, its floor latency, how far above it it runs."""
    moved = cost.bytes_moved(float_width)
    compute_s, memory_s = cost.flops / peak_flops, moved / bandwidth
    floor_ms = max(compute_s, memory_s) * 1000
    return {
        "flops": cost.flops, "bytes": moved, "intensity": cost.flops / moved, "ridge": peak_flops / bandwidth,
        "bound": "compute" if compute_s >= memory_s else "memory", "floor_ms": floor_ms,
        "x_floor": latency_ms / floor_ms, "peak_flops": peak_flops, "bandwidth": bandwidth,
        "peak_label": peak_label, "compute": compute,
    }


def roofline_line(record: dict) -> str:
    """One line of a `roofline` record."""
    return (f"{_scaled(record['flops'], 'FLOP')}, {_scaled(record['bytes'], 'B')} per forward "
            f"({_number(record['intensity'])} FLOP/B; ridge {_number(record['ridge'])} "
            f"at {record['peak_label']}): {record['bound']}-bound, floor {_number(record['floor_ms'])} ms, "
            f"runs at {_number(record['x_floor'])}x the floor")


def _scaled(value: float, unit: str) -> str:
    power = min(max(int(math.log10(value) // 3), 0), len(PREFIXES) - 1) if value > 0 else 0
    return f"{_number(value / 1000 ** power)} {PREFIXES[power]}{unit}"


def _number(value: float) -> str:
    return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
