"""Where a variant runs: every runtime, device and precision hint the benchmark knows, in one table.

A target runs artifacts of one format. Its precision is a hint the runtime applies to float weights at load
time (OpenVINO's `INFERENCE_PRECISION_HINT`, torch autocast); `as-stored` computes at the artifact's own
precision. A faster row under a hint is a different numeric result, so each hint is its own row with its own
metric.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

from compress.kinds import Kind
from compress.sysinfo import machine_info

AS_STORED = "as-stored"
OPENVINO_PIP = "pip install openvino==2026.4.1  (or: pip install 'compress-transformers[openvino]')"
ORT_GPU_PIP = "pip uninstall -y onnxruntime && pip install onnxruntime-gpu==1.32.0"
BF16_ISA = ("amx_bf16", "avx512_bf16")
BF16_MIN_CAPABILITY = (8, 0)  # Ampere


@dataclass(frozen=True)
class Target:
    name: str
    engine: str  # "torch", "onnxruntime" or "openvino"
    format: str  # the artifacts it runs: "torch" or "onnx"
    device: str  # "cpu" or "cuda"
    precision: str = AS_STORED  # "as-stored", "fp32", "bf16" or "fp16"
    providers: tuple[str, ...] = ()  # ONNX Runtime's execution providers, in order of preference

    def unavailable(self) -> str | None:
        """Why this machine cannot run the target (device or precision missing), or None."""
        if self.device == "cuda":
            return _cuda_missing(self)
        if self.precision == "bf16" and not set(BF16_ISA) & set(machine_info()["isa"]):
            return "this CPU has neither AMX-BF16 nor AVX512-BF16, so bf16 would be emulated: not a bf16 figure"
        return None

    def computes(self, precision: str) -> str:
        """What the matrix products of an artifact stored at `precision` (a `Kind.precision`) compute in here:
        a hint lowers float weights only; ONNX integer graphs compute in int8 (MatMulNBits at ONNX Runtime's
        accuracy level 4 too); torch's integer weight-only models multiply in float."""
        floats = ("fp32", "bf16", "fp16")
        if self.precision not in (AS_STORED, "fp32") and precision in floats:
            return self.precision
        if self.format == "onnx" and precision in ("int8", "int4"):
            return "int8"
        return precision if precision in floats else "fp32"

    def rejects(self, kind: Kind) -> str | None:
        """Why this target does not run an artifact of `kind`, or None. Graphs a runtime cannot read are found
        by loading them: the row then carries the runtime's reason."""
        if kind.format != self.format:
            return f"runs {self.format} artifacts, not {kind.format}"
        if self.engine == "torch" and self.precision != AS_STORED and not kind.is_float:
            return f"a {self.precision} hint applies to float weights; these are {kind.weights}"
        return None


TARGETS = {target.name: target for target in (
    Target("torch", "torch", "torch", "cpu"),
    Target("torch-bf16", "torch", "torch", "cpu", "bf16"),  # bf16 autocast
    Target("torch-cuda", "torch", "torch", "cuda"),
    Target("torch-cuda-bf16", "torch", "torch", "cuda", "bf16"),
    Target("torch-cuda-fp16", "torch", "torch", "cuda", "fp16"),
    Target("onnxruntime", "onnxruntime", "onnx", "cpu", providers=("CPUExecutionProvider",)),
    Target("onnxruntime-cuda", "onnxruntime", "onnx", "cuda", providers=("CUDAExecutionProvider",)),
    Target("onnxruntime-tensorrt", "onnxruntime", "onnx", "cuda",
           providers=("TensorrtExecutionProvider", "CUDAExecutionProvider")),
    Target("openvino", "openvino", "onnx", "cpu", "fp32"),
    Target("openvino-bf16", "openvino", "onnx", "cpu", "bf16"),
)}
DEFAULT = {"torch": "torch", "onnx": "onnxruntime"}  # a format no listed target runs is benchmarked here


def check_targets(names: list[str]) -> list[Target]:
    """The named targets; a ValueError names an unknown one, or a missing package with its pip line."""
    targets = []
    for name in names:
        if name not in TARGETS:
            raise ValueError(f"unknown runtime {name!r} (known: {', '.join(TARGETS)})")
        target = TARGETS[name]
        if importlib.util.find_spec(target.engine) is None:
            pip = OPENVINO_PIP if target.engine == "openvino" else f"pip install {target.engine}"
            raise ValueError(f"{name} needs the {target.engine} package, which is not installed: {pip}")
        targets.append(target)
    return targets


def targets_for(format: str, targets: list[Target]) -> list[Target]:
    """The listed targets that run `format`, or that format's default one when none does."""
    return [t for t in targets if t.format == format] or [TARGETS[DEFAULT[format]]]


def _cuda_missing(target: Target) -> str | None:
    if target.engine == "onnxruntime":
        import onnxruntime as ort

        missing = [p for p in target.providers if p not in ort.get_available_providers()]
        return (f"this onnxruntime has no {', '.join(missing)} ({ORT_GPU_PIP}; TensorRT needs its own libraries "
                "too)") if missing else None
    import torch

    if not torch.cuda.is_available():
        return "no CUDA device"
    if target.precision == "bf16" and torch.cuda.get_device_capability() < BF16_MIN_CAPABILITY:
        return f"{torch.cuda.get_device_name()} has no bf16 tensor cores (Ampere or newer has)"
    return None
