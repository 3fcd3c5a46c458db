"""Task metrics from logits: accuracy for classification, perplexity for causal LM. Numpy only."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from tqdm import tqdm

from compress.arch import is_text_stream
from compress.evalset import EvalSet

if TYPE_CHECKING:
    from compress.eval.runners import Runner

# A causal LM batch holds [B, L, vocab] float32 logits (4 x 1024 x 49k is ~0.8 GB), so its batch is capped.
LM_MAX_BATCH = 4
BOOTSTRAP_RESAMPLES = 1000
BOOTSTRAP_SEED = 0
BOOTSTRAP_CHUNK = 1 << 22  # resampled row indices held at once


@dataclass
class EvalResult:
    name: str  # "accuracy" (a fraction) or "perplexity"
    value: float
    # classification: argmax class [N]; causal LM: argmax token [N, L], where position t holds the prediction
    # for token t (made from the logits at t - 1), aligned with EvalSet.target_mask; -1 where nothing is predicted.
    predictions: np.ndarray
    count: int  # rows scored (classification) or tokens scored (causal LM)
    # What the metric is made of, per eval row, so two variants compare row by row (see compare_paired).
    # classification: "correct" (1 or 0); causal LM: "nll" (summed over the row's scored tokens) and "tokens".
    rows: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass(frozen=True)
class MetricChange:
    """candidate - reference, with a paired-bootstrap 95 % interval; for perplexity also candidate / reference - 1."""

    delta: float
    delta_ci95: tuple[float, float]
    rel: float | None = None
    rel_ci95: tuple[float, float] | None = None


def evaluate(
    runner: Runner, evalset: EvalSet, batch_size: int = 32, limit: int | None = None, progress: bool = True
) -> EvalResult:
    """Accuracy or perplexity of `runner` on the first `limit` rows; causal LM batches hold at most 4 windows."""
    evalset = evalset.take(limit)
    if is_text_stream(evalset.task):
        return _perplexity(runner, evalset, min(batch_size, LM_MAX_BATCH), progress)
    return _accuracy(runner, evalset, batch_size, progress)


def agreement(a: EvalResult, b: EvalResult, evalset: EvalSet) -> float:
    """Fraction of equal predictions; for a causal LM only over the scored (target_mask) tokens."""
    if a.predictions.shape != b.predictions.shape:
        raise ValueError(f"predictions differ in shape: {a.predictions.shape} vs {b.predictions.shape}")
    equal = a.predictions == b.predictions
    if is_text_stream(evalset.task):
        equal = equal[evalset.target_mask[: len(equal)]]
    return float(equal.mean())


def metric_from_rows(name: str, rows: dict[str, np.ndarray],
                     index: np.ndarray | slice = slice(None)) -> np.ndarray | float:
    """The metric over the rows `index` selects; a 2-D index gives one value per line of it."""
    if name == "accuracy":
        return rows["correct"][index].mean(axis=-1)
    return np.exp(rows["nll"][index].sum(axis=-1) / rows["tokens"][index].sum(axis=-1))


def compare_paired(name: str, reference: dict[str, np.ndarray], candidate: dict[str, np.ndarray],
                   resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED) -> MetricChange:
    """How `candidate` changes the metric vs `reference`, both per-row results (EvalResult.rows) of the same rows.

    Paired bootstrap: each resample draws row indices with replacement and scores both variants on the same
    ones, so what the two share (which rows are hard) cancels out of the interval.
    """
    count = len(next(iter(reference.values())))
    if count != len(next(iter(candidate.values()))) or count == 0:
        raise ValueError("a paired comparison needs the same, non-zero number of rows on both sides")
    ref_samples, cand_samples = _resampled(name, reference, candidate, count, resamples, seed)
    ref_value, cand_value = float(metric_from_rows(name, reference)), float(metric_from_rows(name, candidate))
    delta = (cand_value - ref_value, _interval(cand_samples - ref_samples))
    if name == "accuracy":
        return MetricChange(*delta)
    return MetricChange(*delta, cand_value / ref_value - 1, _interval(cand_samples / ref_samples - 1))


def _resampled(name: str, reference: dict[str, np.ndarray], candidate: dict[str, np.ndarray], count: int,
               resamples: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    per_chunk = max(1, BOOTSTRAP_CHUNK // count)
    ref_samples, cand_samples = [], []
    for start in range(0, resamples, per_chunk):
        index = rng.integers(0, count, size=(min(per_chunk, resamples - start), count))
        ref_samples.append(metric_from_rows(name, reference, index))
        cand_samples.append(metric_from_rows(name, candidate, index))
    return np.concatenate(ref_samples), np.concatenate(cand_samples)


def _interval(samples: np.ndarray) -> tuple[float, float]:
    low, high = np.percentile(samples, [2.5, 97.5])
    return float(low), float(high)


def _accuracy(runner: Runner, evalset: EvalSet, batch_size: int, progress: bool) -> EvalResult:
    if evalset.labels is None:
        raise ValueError("a classification eval set needs labels")
    predictions = np.empty(len(evalset), dtype=np.int64)
    with _bar(evalset, "accuracy", progress) as bar:
        for rows, features in evalset.batches(batch_size):
            predictions[rows] = runner.logits(features).argmax(axis=-1)
            bar.update(rows.stop - rows.start)
    rows = {"correct": (predictions == evalset.labels).astype(np.int64)}
    return EvalResult("accuracy", float(metric_from_rows("accuracy", rows)), predictions, len(evalset), rows)


def _perplexity(runner: Runner, evalset: EvalSet, batch_size: int, progress: bool) -> EvalResult:
    input_ids = evalset.features["input_ids"]
    predictions = np.full(input_ids.shape, -1, dtype=np.int64)
    rows = {"nll": np.zeros(len(evalset), dtype=np.float64), "tokens": np.zeros(len(evalset), dtype=np.int64)}
    with _bar(evalset, "perplexity", progress) as bar:
        for batch, features in evalset.batches(batch_size):
            width = features["input_ids"].shape[1]
            logits = runner.logits(features)[:, :-1]
            targets = features["input_ids"][:, 1:]
            scored = evalset.target_mask[batch, 1:width]
            target_logits = np.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
            nll = _logsumexp(logits) - target_logits
            rows["nll"][batch] = np.where(scored, nll, 0).astype(np.float64).sum(axis=1)
            rows["tokens"][batch] = scored.sum(axis=1)
            predictions[batch, 1:width] = logits.argmax(axis=-1)
            bar.update(batch.stop - batch.start)
    total_tokens = int(rows["tokens"].sum())
    if total_tokens == 0:
        raise ValueError("the eval set scores no tokens (target_mask is all False)")
    return EvalResult("perplexity", float(metric_from_rows("perplexity", rows)), predictions, total_tokens, rows)


def _logsumexp(logits: np.ndarray) -> np.ndarray:
    peak = logits.max(axis=-1, keepdims=True)
    return (peak + np.log(np.exp(logits - peak).sum(axis=-1, keepdims=True)))[..., 0]


def _bar(evalset: EvalSet, metric: str, progress: bool) -> tqdm:
    return tqdm(total=len(evalset), desc=f"eval {metric}", unit="rows", disable=not progress, leave=False)


def metric_drop(reference: float, candidate: float, higher_is_better: bool) -> float:
    """Accuracy points lost (as a fraction), or a lower-is-better metric's relative rise (perplexity)."""
    return reference - candidate if higher_is_better else candidate / reference - 1


def metric_value(metric: dict) -> str:
    """A reported metric as the reports print it: accuracy in percent, perplexity as a number."""
    return f"{metric['value']:.2%}" if metric["name"] == "accuracy" else f"{metric['value']:.2f}"
