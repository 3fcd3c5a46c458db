"""Tokenized evaluation data as plain numpy arrays: what every runner, metric and bench worker consumes.

Kept free of torch and transformers so an ONNX Runtime bench worker can load it without importing them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


@dataclass
class EvalSet:
    task: str
    # int64 [N, L], right-padded: input_ids, attention_mask, and token_type_ids when the tokenizer makes them.
    features: dict[str, np.ndarray]
    pad_token_id: int
    labels: np.ndarray | None = None  # classification: int64 [N]
    # causal LM: bool [N, L]; True where token t is scored (predicted from the logits at t - 1).
    target_mask: np.ndarray | None = None
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.features["input_ids"])

    @property
    def lengths(self) -> np.ndarray:
        return self.features["attention_mask"].sum(axis=1)

    def take(self, n: int | None) -> EvalSet:
        if n is None or n >= len(self):
            return self
        return EvalSet(
            self.task,
            {k: v[:n] for k, v in self.features.items()},
            self.pad_token_id,
            None if self.labels is None else self.labels[:n],
            None if self.target_mask is None else self.target_mask[:n],
            self.meta,
        )

    def batches(self, batch_size: int) -> Iterator[tuple[slice, dict[str, np.ndarray]]]:
        """Row slices with their features, trimmed to the longest row of the batch."""
        for start in range(0, len(self), batch_size):
            rows = slice(start, min(start + batch_size, len(self)))
            width = int(self.lengths[rows].max())
            yield rows, {k: v[rows, :width] for k, v in self.features.items()}

    def real_token_inputs(self, batch_size: int, seq_len: int) -> dict[str, np.ndarray]:
        """`batch_size` rows of exactly `seq_len` real tokens, no padding: the eval rows' tokens concatenated in
        order (repeated when the data is short). Padded positions would push ONNX Runtime's fused attention into
        denormal floats and time something no deployment runs."""
        tokens = self.features["input_ids"][self.features["attention_mask"].astype(bool)]
        if tokens.size == 0:
            raise ValueError("the eval set holds no tokens")
        shape = (batch_size, seq_len)
        out = {key: np.zeros(shape, dtype=value.dtype) for key, value in self.features.items()}
        out["input_ids"] = np.resize(tokens, shape)
        out["attention_mask"] = np.ones(shape, dtype=self.features["attention_mask"].dtype)
        return out

    def padded_inputs(self, batch_size: int, seq_len: int) -> dict[str, np.ndarray]:
        """The first `batch_size` rows (repeated when there are fewer), right-padded (or cut) to `seq_len`."""
        out = {}
        for key, value in self.features.items():
            rows = value[:batch_size, :seq_len]
            reps = -(-batch_size // len(rows))
            rows = np.concatenate([rows] * reps)[:batch_size]
            pad_value = self.pad_token_id if key == "input_ids" else 0
            out[key] = np.pad(rows, ((0, 0), (0, seq_len - rows.shape[1])), constant_values=pad_value)
        return out

    def real_length_inputs(self, n: int) -> list[dict[str, np.ndarray]]:
        """Up to `n` single rows at their own (unpadded) length."""
        lengths = self.lengths
        return [{k: v[i : i + 1, : lengths[i]] for k, v in self.features.items()} for i in range(min(n, len(self)))]

    def fingerprint(self) -> str:
        """sha256 of the arrays every metric is computed from: equal only for the same rows, tokenized alike."""
        digest = hashlib.sha256(self.task.encode())
        arrays = {**self.features, "labels": self.labels, "target_mask": self.target_mask}
        for name, array in sorted(arrays.items()):
            if array is not None:
                digest.update(name.encode() + str(array.shape).encode() + np.ascontiguousarray(array).tobytes())
        return digest.hexdigest()

    def save(self, path: Path) -> None:
        arrays = {f"feature.{k}": v for k, v in self.features.items()}
        if self.labels is not None:
            arrays["labels"] = self.labels
        if self.target_mask is not None:
            arrays["target_mask"] = self.target_mask
        np.savez(path, task=np.array(self.task), pad_token_id=np.array(self.pad_token_id), **arrays)

    @classmethod
    def load(cls, path: Path) -> EvalSet:
        with np.load(path, allow_pickle=False) as npz:
            features = {k.removeprefix("feature."): npz[k] for k in npz.files if k.startswith("feature.")}
            return cls(
                task=str(npz["task"]),
                features=features,
                pad_token_id=int(npz["pad_token_id"]),
                labels=npz["labels"] if "labels" in npz.files else None,
                target_mask=npz["target_mask"] if "target_mask" in npz.files else None,
            )
