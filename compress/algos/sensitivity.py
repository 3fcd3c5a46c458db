"""Which layers to keep in float: rank the layers by how much quantizing each one alone changes the model, then
keep the most sensitive in float until the model is within a budget. Quantizing and measuring are injected."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from compress.errors import ExportMismatch

Quantize = Callable[[list[str]], Any]  # the layers kept in float -> a quantized model


def rank_layers(layers: dict[str, str], quantize: Quantize, measure: Callable[[Any], dict[str, float]]) -> list[dict]:
    """One row per layer (node, op, then what `measure` returns, which holds `score`): the model with that layer
    alone quantized, most sensitive (highest score) first; ties keep the layers' order."""
    table = []
    for node, op in layers.items():
        alone = quantize([other for other in layers if other != node])
        table.append({"node": node, "op": op, **measure(alone)})
    return sorted(table, key=lambda row: -row["score"])


@dataclass(frozen=True)
class Fallback:
    kept_float: list[str]  # the fewest most-sensitive layers found to meet the budget
    drop: float  # the metric drop with them in float
    trials: list[dict[str, Any]]  # {"kept_float": count, "drop": drop}, in the order tried


def keep_in_float(ranked: list[str], quantize: Quantize, drop: Callable[[Any], float], max_drop: float,
                  max_layers: int | None = None) -> Fallback:
    """Keep the first layers of `ranked` in float, as few as meet `drop <= max_drop`, at most `max_layers`.

    Doubling (0, 1, 2, 4, ...) then bisection: about 2 log2(layers) evaluations instead of one per layer, on the
    assumption that keeping more layers in float never costs accuracy. ExportMismatch when even `max_layers`
    (default: all of them) miss the budget.
    """
    trials: list[dict[str, Any]] = []

    def trial(count: int) -> float:
        trials.append({"kept_float": count, "drop": drop(quantize(ranked[:count]))})
        return trials[-1]["drop"]

    limit = len(ranked) if max_layers is None else min(max_layers, len(ranked))
    failing, count = -1, 0  # the most layers known to miss the budget; the count to try next
    while not trial(count) <= max_drop:  # NaN fails too
        failing = count
        if count == limit:
            best = min(trials, key=lambda t: t["drop"])
            raise ExportMismatch(f"fallback.max_drop {max_drop:g} not met: the best validation drop was "
                                 f"{best['drop']:.4g} with {best['kept_float']} of {len(ranked)} layers in float "
                                 f"(fallback.max_layers {max_layers}); raise max_drop or max_layers")
        count = min(max(1, 2 * count), limit)
    passing = count
    while passing - failing > 1:
        middle = (failing + passing) // 2
        if trial(middle) <= max_drop:  # NaN fails
            passing = middle
        else:
            failing = middle
    met = next(t for t in reversed(trials) if t["kept_float"] == passing)
    return Fallback(ranked[:passing], met["drop"], trials)


def kl_divergence(reference: np.ndarray, candidate: np.ndarray) -> np.ndarray:
    """KL(softmax(reference) || softmax(candidate)) over the last axis, one value per row or position."""
    ref_log = _log_softmax(reference.astype(np.float64))
    cand_log = _log_softmax(candidate.astype(np.float64))
    return (np.exp(ref_log) * (ref_log - cand_log)).sum(axis=-1)


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
