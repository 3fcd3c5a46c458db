"""One `logits(features)` interface over a torch model and an ONNX Runtime session.

Only the torch path imports torch and transformers, and only when used: an ONNX bench worker stays light,
so its peak memory and start-up reflect what deploying the graph costs.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from compress.artifact import GRAPH, TORCH_DTYPES, read_manifest
from compress.kinds import Kind

DENORMAL_AS_ZERO = "session.set_denormal_as_zero"
ORT_DTYPES = {
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(bool)": np.bool_,
}


class Runner(Protocol):
    format: str

    def logits(self, features: dict[str, np.ndarray]) -> np.ndarray: ...

    def runtime(self) -> dict[str, Any]:
        """The runtime's name, version and the settings that decide its speed."""


class TorchRunner:
    format = "torch"

    def __init__(self, model: Any, threads: int | None = None) -> None:
        import torch

        if threads is not None:
            torch.set_num_threads(threads)
        self.model = model.eval()
        parameters = inspect.signature(model.forward).parameters.values()
        # Named parameters only: a model's **kwargs would swallow inputs it does not understand.
        self.accepted = {p.name for p in parameters if p.kind is not inspect.Parameter.VAR_KEYWORD}

    def logits(self, features: dict[str, np.ndarray]) -> np.ndarray:
        import torch

        device = next(self.model.parameters()).device  # evaluation runs where the model is, CPU or GPU
        inputs = {k: torch.from_numpy(np.ascontiguousarray(v)).to(device) for k, v in features.items()
                  if k in self.accepted}
        with torch.inference_mode():
            output = self.model(**inputs)
        return output.logits.float().cpu().numpy()

    def runtime(self) -> dict[str, Any]:
        import torch

        return {"name": "torch", "version": torch.__version__, "threads": torch.get_num_threads(),
                "interop_threads": torch.get_num_interop_threads()}


class OrtRunner:
    format = "onnx"

    def __init__(self, path: Path, threads: int = 2, denormal_as_zero: bool = True) -> None:
        import onnxruntime as ort

        options = session_options(threads, denormal_as_zero)
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.inputs = self.session.get_inputs()
        self.output_name = self.session.get_outputs()[0].name

    def logits(self, features: dict[str, np.ndarray]) -> np.ndarray:
        feeds = {}
        for spec in self.inputs:
            if spec.name in features:
                value = features[spec.name]
            elif spec.name == "position_ids":
                value = position_ids(features["attention_mask"])
            elif spec.name.startswith("past_key_values"):
                value = empty_past(spec.shape, len(features["input_ids"]))
            else:
                raise KeyError(f"the ONNX graph needs input {spec.name!r}, which the eval features lack")
            feeds[spec.name] = value.astype(ORT_DTYPES.get(spec.type, np.float32), copy=False)
        (logits,) = self.session.run([self.output_name], feeds)
        return logits.astype(np.float32, copy=False)

    def runtime(self) -> dict[str, Any]:
        import onnxruntime as ort

        options = self.session.get_session_options()
        return {
            "name": "onnxruntime",
            "version": ort.__version__,
            "execution_provider": self.session.get_providers()[0],
            "intra_op_threads": options.intra_op_num_threads,
            "inter_op_threads": options.inter_op_num_threads,
            "denormal_as_zero": options.get_session_config_entry(DENORMAL_AS_ZERO) == "1",
        }


def session_options(threads: int, denormal_as_zero: bool = True) -> Any:
    """The settings of every ONNX Runtime session the project creates.

    Denormals as zero: padded positions drive the fused attention into denormal floats, which x86 computes
    in slow microcode, while flushing them changes no logit beyond the export tolerance
    (tests/eval/test_runners.py). ORT applies it to its pool threads per session, but to the calling thread
    only for the first session of the process.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry(DENORMAL_AS_ZERO, "1" if denormal_as_zero else "0")
    return options


def position_ids(attention_mask: np.ndarray) -> np.ndarray:
    return np.clip(attention_mask.cumsum(axis=1) - 1, 0, None)


def empty_past(shape: list[int | str | None], batch: int) -> np.ndarray:
    """A zero-length cache for a graph exported with past inputs: [batch, heads, 0, head_dim]."""
    return np.zeros([batch, *(dim if isinstance(dim, int) else 0 for dim in shape[1:])], dtype=np.float32)


def load_runner(artifact_dir: Path, threads: int) -> TorchRunner | OrtRunner:
    artifact_dir = Path(artifact_dir)
    manifest = read_manifest(artifact_dir)
    kind = Kind.from_json(manifest["kind"])
    if kind.format == "onnx":
        return OrtRunner(artifact_dir / GRAPH, threads)
    from compress.arch import auto_class

    # A torch artifact deploys at the precision it was saved in.
    dtype = TORCH_DTYPES.get(kind.weights, "float32")
    return TorchRunner(auto_class(manifest["task"]).from_pretrained(artifact_dir, dtype=dtype), threads)
