"""Calibration batches as a graph's own inputs, for ONNX Runtime's calibrators and GPTQ."""

from __future__ import annotations

import numpy as np
import onnx

from compress.errors import DataError
from compress.eval.runners import empty_past, position_ids


def graph_feeds(inputs: list[onnx.ValueInfoProto], batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Exactly the graph's inputs from a calibration batch (a session refuses extra ones): extra keys dropped,
    position ids and an empty cache made as OrtRunner makes them."""
    feeds = {}
    for spec in inputs:
        tensor = spec.type.tensor_type
        if spec.name in batch:
            value = batch[spec.name]
        elif spec.name == "position_ids":
            value = position_ids(batch["attention_mask"])
        elif spec.name.startswith("past_key_values"):
            value = empty_past([dim.dim_value or dim.dim_param for dim in tensor.shape.dim], len(batch["input_ids"]))
        else:
            raise DataError(f"data.calib: the graph needs input {spec.name!r}, which the calibration rows lack")
        feeds[spec.name] = value.astype(onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type), copy=False)
    return feeds
