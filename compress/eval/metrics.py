"""Task metrics from logits: accuracy for classification, perplexity for causal LM. Numpy only."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from tqdm import tqdm

from compress.evalset import EvalSet

if TYPE_CHECKING:
    from compress.eval.runners import Runner

CAUSAL_LM = "causal-lm"
# A causal LM batch holds [B, L, vocab] float32 logits (4 x 1024 x 49k is ~0.8 GB), so its batch is capped.
LM_MAX_BATCH = 4


@dataclass
class EvalResult:
    name: str  # "accuracy" (a fraction) or "perplexity"
    value: float
    # classification: argmax class [N]; causal LM: argmax token [N, L], where position t holds the prediction
    # for token t (made from the logits at t - 1), aligned with EvalSet.target_mask; -1 where nothing is predicted.
    predictions: np.ndarray
    count: int  # rows scored (classification) or tokens scored (causal LM)


def evaluate(
    runner: Runner, evalset: EvalSet, batch_size: int = 32, limit: int | None = None, progress: bool = True
) -> EvalResult:
    """Accuracy or perplexity of `runner` on the first `limit` rows; causal LM batches hold at most 4 windows."""
    evalset = evalset.take(limit)
    if evalset.task == CAUSAL_LM:
        return _perplexity(runner, evalset, min(batch_size, LM_MAX_BATCH), progress)
    return _accuracy(runner, evalset, batch_size, progress)


def agreement(a: EvalResult, b: EvalResult, evalset: EvalSet) -> float:
    """Fraction of equal predictions; for a causal LM only over the scored (target_mask) tokens."""
    if a.predictions.shape != b.predictions.shape:
        raise ValueError(f"predictions differ in shape: {a.predictions.shape} vs {b.predictions.shape}")
    equal = a.predictions == b.predictions
    if evalset.task == CAUSAL_LM:
        equal = equal[evalset.target_mask[: len(equal)]]
    return float(equal.mean())


def _accuracy(runner: Runner, evalset: EvalSet, batch_size: int, progress: bool) -> EvalResult:
    if evalset.labels is None:
        raise ValueError("a classification eval set needs labels")
    predictions = np.empty(len(evalset), dtype=np.int64)
    with _bar(evalset, "accuracy", progress) as bar:
        for rows, features in evalset.batches(batch_size):
            predictions[rows] = runner.logits(features).argmax(axis=-1)
            bar.update(rows.stop - rows.start)
    correct = predictions == evalset.labels
    return EvalResult("accuracy", float(correct.mean()), predictions, len(evalset))


def _perplexity(runner: Runner, evalset: EvalSet, batch_size: int, progress: bool) -> EvalResult:
    input_ids = evalset.features["input_ids"]
    predictions = np.full(input_ids.shape, -1, dtype=np.int64)
    total_nll, total_tokens = 0.0, 0
    with _bar(evalset, "perplexity", progress) as bar:
        for rows, features in evalset.batches(batch_size):
            width = features["input_ids"].shape[1]
            logits = runner.logits(features)[:, :-1]
            targets = features["input_ids"][:, 1:]
            scored = evalset.target_mask[rows, 1:width]
            target_logits = np.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
            nll = _logsumexp(logits) - target_logits
            total_nll += float(nll[scored].astype(np.float64).sum())
            total_tokens += int(scored.sum())
            predictions[rows, 1:width] = logits.argmax(axis=-1)
            bar.update(rows.stop - rows.start)
    if total_tokens == 0:
        raise ValueError("the eval set scores no tokens (target_mask is all False)")
    return EvalResult("perplexity", float(np.exp(total_nll / total_tokens)), predictions, total_tokens)


def _logsumexp(logits: np.ndarray) -> np.ndarray:
    peak = logits.max(axis=-1, keepdims=True)
    return (peak + np.log(np.exp(logits - peak).sum(axis=-1, keepdims=True)))[..., 0]


def _bar(evalset: EvalSet, metric: str, progress: bool) -> tqdm:
    return tqdm(total=len(evalset), desc=f"eval {metric}", unit="rows", disable=not progress, leave=False)
