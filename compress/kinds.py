"""What a stage holds, as a record of traits that combine freely.

A structured-pruned model that is then QAT-prepared is one `Kind` with `per_layer_shapes` and
`weights="fake-quant"`, not a new kind for every pair. Step contracts (`Step.output_kind` in recipe.py) read
and change these traits; `compress.json` stores them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

FORMATS = ("torch", "onnx")
# Weight schemes. Torch: float dtypes, fake-quant (QAT modules with learned scales), weight-only integers
# (neural-compressor / torchao tensors). ONNX: float, int8 integer ops (dynamic quantization), int8 QDQ
# pairs (static quantization, QAT export), weight-only MatMulNBits (4 or 8 bits, ONNX Runtime only).
FLOAT_WEIGHTS = ("fp32", "fp16", "bf16")
WEIGHTS = {
    "torch": (*FLOAT_WEIGHTS, "fake-quant", "int8-weight-only", "int4-weight-only"),
    "onnx": (*FLOAT_WEIGHTS, "int8-dynamic", "int8-qdq", "int4-matmulnbits", "int8-matmulnbits"),
}
SPARSITY = (None, "masks", "zeros")  # masks: zeros held by masks (still trainable); zeros: made permanent
RUNTIMES = ("portable", "onnxruntime")  # portable: default-domain ONNX ops only
PRECISION = {"int8-dynamic": "int8", "int8-qdq": "int8", "int8-weight-only": "int8", "int4-weight-only": "int4",
             "int4-matmulnbits": "int4", "int8-matmulnbits": "int8"}
DESCRIPTION = {"int8-dynamic": "int8 (integer ops)", "int8-qdq": "int8 (QDQ)", "int4-matmulnbits": "int4 (MatMulNBits)",
               "int8-matmulnbits": "int8 (MatMulNBits)", "int4-weight-only": "int4 weight-only",
               "int8-weight-only": "int8 weight-only"}
QUANTIZED_TORCH = ("fake-quant", "int8-weight-only", "int4-weight-only")  # saved with their quantization state


@dataclass(frozen=True)
class Kind:
    format: str = "torch"
    weights: str = "fp32"
    per_layer_shapes: bool = False  # layers differ in heads / FFN width (structured pruning)
    sparsity: str | None = None
    # ONNX only: "onnxruntime" when the graph holds ONNX Runtime contrib ops (com.microsoft). Other runtimes read
    # some of those and not others: `compress inspect` loads the graph in each to say which.
    runtime: str = "portable"
    external_data: bool = False  # ONNX only: weights in a side file (graphs over 2 GB)

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"kind: unknown format {self.format!r} (known: {', '.join(FORMATS)})")
        if self.weights not in WEIGHTS[self.format]:
            raise ValueError(f"kind: {self.format} weights cannot be {self.weights!r} "
                             f"(known: {', '.join(WEIGHTS[self.format])})")
        if self.sparsity not in SPARSITY or self.runtime not in RUNTIMES:
            raise ValueError(f"kind: unknown sparsity {self.sparsity!r} or runtime {self.runtime!r}")

    @property
    def is_float(self) -> bool:
        return self.weights in FLOAT_WEIGHTS

    @property
    def precision(self) -> str:
        """The short label reports show: fp32, bf16, int8, int4, fake-quant."""
        return PRECISION.get(self.weights, self.weights)

    def evolve(self, **changes: Any) -> Kind:
        return dataclasses.replace(self, **changes)

    def describe(self) -> str:
        """E.g. 'torch fp32', 'ONNX int8 (integer ops) with ONNX Runtime contrib ops, sparse (zeros)'."""
        parts = ["ONNX" if self.format == "onnx" else "torch", DESCRIPTION.get(self.weights, self.weights)]
        if self.format == "onnx" and self.runtime == "onnxruntime":
            parts.append("with ONNX Runtime contrib ops")
        if self.per_layer_shapes:
            parts.append("with per-layer shapes")
        if self.sparsity:
            parts.append(f"sparse ({self.sparsity})")
        if self.external_data:
            parts.append("with external data")
        return " ".join(parts)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> Kind:
        return cls(**value)


TORCH_FP32 = Kind()
