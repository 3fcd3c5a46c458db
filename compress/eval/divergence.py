"""Where an exported graph first leaves its torch model (every module's output against the ONNX value its scope
ends in, on the same inputs, in the order torch computes them), and where a quantized graph first leaves its
float graph (`first_graph_divergence`).

The exporter names each node after the module that made it (`/bert/encoder/layer.1/output/dense/MatMul`), so
a module's output is the last value computed inside its scope. Modules are compared in the order their
forward passes finish (children before their parent), so the first one out of tolerance is where the
difference starts, not a block that merely carries it.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from compress.eval.runners import OrtRunner, TorchRunner
from compress.settings import FloatTolerance

SKIPPED_OPS = {"Constant", "Shape", "Gather", "Unsqueeze", "Concat", "Reshape", "Cast"}
# int8 moves every value by a few percent (relative L2); a value 10 % off marks where a layer went wrong.
QUANTIZED_RELATIVE_ERROR = 0.1


@dataclass(frozen=True)
class Divergence:
    module: str  # the torch module's name, e.g. "bert.encoder.layer.1.output.dense"
    node: str  # the ONNX node whose output was compared
    max_abs_diff: float
    compared: int  # modules compared up to and including this one

    def describe(self) -> str:
        return (f"first divergence at module {self.module} (ONNX node {self.node}): max |difference| "
                f"{self.max_abs_diff:.3g}, after {self.compared - 1} modules within tolerance")


def first_divergence(model: Any, graph: Path, features: dict[str, np.ndarray],
                     tolerance: FloatTolerance | None = None) -> Divergence | None:
    """The first module whose output the graph does not reproduce within `tolerance` (default: the export's),
    or None."""
    import onnx

    tolerance = tolerance or FloatTolerance()
    torch_outputs = _module_outputs(model, features)
    proto = onnx.load(str(graph))
    scopes = _scope_outputs(proto)
    pairs = [(name, scopes[name]) for name in torch_outputs if name in scopes]
    values = _graph_values(proto, [value for _, (value, _) in pairs], features)
    for index, (name, (value, node)) in enumerate(pairs, start=1):
        expected, got = torch_outputs[name], values[value]
        if expected.shape != got.shape:
            continue  # a module whose output the graph holds in another layout: nothing to compare
        difference = np.abs(got.astype(np.float64) - expected)
        if (difference > tolerance.atol + tolerance.rtol * np.abs(expected)).any():
            return Divergence(name, node, float(difference.max()), index)
    return None


@dataclass(frozen=True)
class GraphDivergence:
    value: str  # the value both graphs compute, named as in both
    node: str  # the candidate's node that writes it
    relative_error: float  # ||candidate - reference|| / ||reference||
    compared: int

    def describe(self) -> str:
        return (f"first value off by more than the quantization tolerance: {self.value} (node {self.node}), relative "
                f"error {self.relative_error:.1%}, after {self.compared - 1} values within it")


def first_graph_divergence(reference: Path, candidate: Path, features: dict[str, np.ndarray],
                           max_relative_error: float = QUANTIZED_RELATIVE_ERROR) -> GraphDivergence | None:
    """Where a quantized graph first leaves its float graph: the values both compute under the same name (the
    quantizers keep the names of what they replace), in the candidate's order, each judged by its relative
    error, since int8 moves every value a little and a whole layer only when something went wrong there."""
    import onnx

    protos = [onnx.load(str(path)) for path in (reference, candidate)]
    made_by = {output: node.name or node.op_type for node in protos[1].graph.node for output in node.output}
    shared = {output for node in protos[0].graph.node for output in node.output} & set(made_by)
    names = [name for name in made_by if name in shared]
    expected, got = (_graph_values(proto, names, features) for proto in protos)
    compared = 0
    for name in names:
        if expected[name].dtype.kind != "f" or expected[name].shape != got[name].shape or not expected[name].size:
            continue
        compared += 1
        reference_norm = float(np.linalg.norm(expected[name]))
        error = float(np.linalg.norm(got[name].astype(np.float64) - expected[name])) / max(reference_norm, 1e-12)
        if error > max_relative_error:
            return GraphDivergence(name, made_by[name], error, compared)
    return None


def _module_outputs(model: Any, features: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Each named module's first float tensor output, in the order the forward passes finish."""
    import torch

    outputs: dict[str, np.ndarray] = {}

    def record(name: str):
        def hook(_module: Any, _inputs: Any, output: Any) -> None:
            tensor = output[0] if isinstance(output, tuple) else getattr(output, "logits", output)
            if isinstance(tensor, torch.Tensor) and tensor.is_floating_point() and name not in outputs:
                outputs[name] = tensor.detach().double().cpu().numpy()
        return hook

    handles = [module.register_forward_hook(record(name)) for name, module in model.named_modules() if name]
    try:
        TorchRunner(model).logits(features)  # the inputs the bench feeds, on the model's device
    finally:
        for handle in handles:
            handle.remove()
    return outputs


def _scope_outputs(proto: Any) -> dict[str, tuple[str, str]]:
    """Module name -> (the last float-producing value in its scope, that node's name)."""
    last: dict[str, tuple[str, str]] = {}
    for node in proto.graph.node:
        if node.op_type in SKIPPED_OPS or not node.name.startswith("/"):
            continue
        parts = node.name.strip("/").split("/")[:-1]  # the node's own name ends the path
        for depth in range(1, len(parts) + 1):
            last[".".join(parts[:depth])] = (node.output[0], node.name)
    return last


def _graph_values(proto: Any, names: list[str], features: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The graph run with `names` exposed as extra outputs."""
    import onnx

    declared = {output.name for output in proto.graph.output}
    for name in dict.fromkeys(names):
        if name not in declared:
            proto.graph.output.append(onnx.ValueInfoProto(name=name))
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "exposed.onnx"
        onnx.save(proto, str(path))
        wanted = list(dict.fromkeys(names))
        return dict(zip(wanted, OrtRunner(path, threads=1).outputs(wanted, features), strict=True))
