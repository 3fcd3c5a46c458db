"""Is a graph still the model it came from? Elementwise for fp32 exports, by task metric for quantized ones."""

from __future__ import annotations

from typing import Any

import numpy as np

from compress.arch import is_text_stream
from compress.errors import ExportMismatch
from compress.eval.metrics import EvalResult, agreement, metric_drop
from compress.evalset import EvalSet
from compress.settings import FloatTolerance, QuantTolerance

# Causal LM logits are [B, L, vocab]: keep each compared batch small.
VERIFY_BATCH = 4
VERIFY_THREADS = 2  # ONNX Runtime threads of the sessions that verify a pass's graph


def reference_logits(runner: Any, evalset: EvalSet) -> list[np.ndarray]:
    """What the model computes on each verification batch, kept before anything rewrites it."""
    return [runner.logits(features) for _, features in evalset.batches(VERIFY_BATCH)]


def verify_logits(reference: list[np.ndarray], candidate: Any, evalset: EvalSet, tol: FloatTolerance) -> dict:
    """`candidate` (a runner) must reproduce `reference` on every batch within `tol`; ExportMismatch otherwise."""
    max_abs_diff = 0.0
    for (rows, features), expected in zip(evalset.batches(VERIFY_BATCH), reference, strict=True):
        actual = candidate.logits(features)
        checked = verify_float(real_tokens_only(expected, features), real_tokens_only(actual, features), tol,
                               output_name=f"logits of eval rows {rows.start}-{rows.stop - 1}")
        max_abs_diff = max(max_abs_diff, checked["max_abs_diff"])
    return {"max_abs_diff": max_abs_diff, "rows": len(evalset)}


def real_tokens_only(logits: np.ndarray, features: dict[str, np.ndarray]) -> np.ndarray:
    """Zero a causal LM's logits at padding: they mean nothing, and torch and the graph number padded
    positions differently (torch counts on, the graph's runner repeats the last real position)."""
    if logits.ndim != 3:
        return logits
    return np.where(features["attention_mask"][..., None].astype(bool), logits, 0.0)


def verify_float(reference: np.ndarray, candidate: np.ndarray, tol: FloatTolerance,
                 output_name: str = "logits") -> dict[str, Any]:
    """Every element must satisfy |candidate - reference| <= atol + rtol * |reference|."""
    if reference.shape != candidate.shape:
        raise ExportMismatch(f"{output_name}: shape {candidate.shape} differs from the reference {reference.shape}")
    diff = np.abs(candidate.astype(np.float64) - reference.astype(np.float64))
    allowed = tol.atol + tol.rtol * np.abs(reference.astype(np.float64))
    max_abs_diff = float(np.nanmax(diff)) if diff.size else 0.0
    # NaN in either array fails too: `diff <= allowed` is False there.
    outside = ~(diff <= allowed)
    if outside.any():
        excess = np.where(outside, np.nan_to_num(diff - allowed, nan=np.inf), -np.inf)
        worst = np.unravel_index(int(np.argmax(excess)), diff.shape)
        index = tuple(int(i) for i in worst)
        raise ExportMismatch(
            f"{output_name}: {int(outside.sum())} of {diff.size} values differ beyond tolerance; worst at {index}: "
            f"|{float(candidate[worst]):.6g} - {float(reference[worst]):.6g}| = {float(diff[worst]):.3g} > "
            f"{float(allowed[worst]):.3g} allowed (atol {tol.atol:g} + rtol {tol.rtol:g} * |reference|); "
            f"max abs diff {max_abs_diff:.3g}"
        )
    return {"max_abs_diff": max_abs_diff, "rows": int(reference.shape[0]) if reference.ndim else 1}


def verify_quantized(reference: EvalResult, candidate: EvalResult, evalset: EvalSet, tol: QuantTolerance,
                     higher_is_better: bool) -> dict[str, Any]:
    """The task metric may drop by at most `max_metric_drop`, and predictions must agree often enough.

    The drop is in fraction points for a higher-is-better metric (accuracy), and a relative rise
    (candidate / reference - 1) for a lower-is-better one (perplexity).
    """
    drop = metric_drop(reference.value, candidate.value, higher_is_better)
    agreed = agreement(reference, candidate, evalset)
    measured = {
        "metric": reference.name,
        "metric_before": reference.value,
        "metric_after": candidate.value,
        "metric_drop": drop,
        "agreement": agreed,
        "count": candidate.count,
    }
    how = "points" if higher_is_better else "relative rise"
    failures = []
    if not drop <= tol.max_metric_drop:  # NaN fails too
        failures.append(f"{reference.name} went from {reference.value:.4g} to {candidate.value:.4g}: "
                        f"a drop of {drop:.4g} ({how}) > max_metric_drop {tol.max_metric_drop:g}")
    if agreed < tol.min_agreement:
        failures.append(f"prediction agreement {agreed:.4f} < min_agreement {tol.min_agreement:g}")
    if failures:
        scored = "tokens" if is_text_stream(evalset.task) else "rows"
        raise ExportMismatch(f"quantized graph fails verification on {candidate.count} {scored}: " + "; ".join(failures))
    return measured
