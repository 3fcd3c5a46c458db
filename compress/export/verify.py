"""Is a graph still the model it came from? Elementwise for fp32 exports, by task metric for quantized ones."""

from __future__ import annotations

from typing import Any

import numpy as np

from compress.errors import ExportMismatch
from compress.eval.metrics import EvalResult, agreement
from compress.evalset import EvalSet
from compress.recipe import FloatTolerance, QuantTolerance


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
    if higher_is_better:
        drop = reference.value - candidate.value
    else:
        drop = candidate.value / reference.value - 1
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
        scored = "tokens" if evalset.task == "causal-lm" else "rows"
        raise ExportMismatch(f"quantized graph fails verification on {candidate.count} {scored}: " + "; ".join(failures))
    return measured
