from __future__ import annotations

import math

import numpy as np
import pytest

from compress.eval.metrics import EvalResult, agreement, evaluate
from compress.evalset import EvalSet

VOCAB = 7


class RowLogitsRunner:
    """Classification logits looked up by row: input_ids[:, 0] holds the row's index."""

    format = "fake"

    def __init__(self, table: np.ndarray) -> None:
        self.table = table
        self.batch_sizes: list[int] = []

    def logits(self, features: dict[str, np.ndarray]) -> np.ndarray:
        self.batch_sizes.append(len(features["input_ids"]))
        return self.table[features["input_ids"][:, 0]]


class UniformRunner:
    format = "fake"

    def logits(self, features: dict[str, np.ndarray]) -> np.ndarray:
        return np.zeros((*features["input_ids"].shape, VOCAB), dtype=np.float32)


class OracleRunner:
    """Puts `margin` on the true next token: position t - 1 predicts input_ids[t]."""

    format = "fake"

    def __init__(self, margin: float) -> None:
        self.margin = margin

    def logits(self, features: dict[str, np.ndarray]) -> np.ndarray:
        ids = features["input_ids"]
        logits = np.zeros((*ids.shape, VOCAB), dtype=np.float32)
        rows, positions = np.indices((ids.shape[0], ids.shape[1] - 1))
        logits[rows, positions, ids[:, 1:]] = self.margin
        return logits


def classification_set() -> EvalSet:
    rows = 5
    input_ids = np.stack([np.arange(rows), np.full(rows, 9)], axis=1)
    attention_mask = np.array([[1, 1], [1, 0], [1, 1], [1, 0], [1, 1]])
    return EvalSet("sequence-classification", {"input_ids": input_ids, "attention_mask": attention_mask}, 0,
                   labels=np.array([0, 1, 1, 0, 2]))


def lm_set() -> EvalSet:
    input_ids = np.array([[1, 4, 2, 6, 3, 0], [5, 5, 1, 0, 0, 0], [2, 3, 4, 5, 6, 1]])
    attention_mask = (np.arange(6) < np.array([[5], [3], [6]])).astype(np.int64)
    target_mask = attention_mask.astype(bool)
    target_mask[:, 0] = False
    target_mask[2, :3] = False  # a strided window: its first tokens were scored by the window before
    return EvalSet("causal-lm", {"input_ids": input_ids, "attention_mask": attention_mask}, 0,
                   target_mask=target_mask)


def test_accuracy_matches_hand_count_across_batches():
    table = np.array([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [5.0, 0.0, 0.0], [1.0, 0.0, 0.5], [0.0, 0.0, -1.0]])
    runner = RowLogitsRunner(table)
    result = evaluate(runner, classification_set(), batch_size=2, progress=False)
    # argmax per row: 0, 1, 0, 0, 0 against labels 0, 1, 1, 0, 2 -> rows 0, 1 and 3 are right.
    assert result.name == "accuracy"
    assert result.value == pytest.approx(3 / 5)
    assert result.predictions.tolist() == [0, 1, 0, 0, 0]
    assert result.count == 5
    assert runner.batch_sizes == [2, 2, 1]


def test_accuracy_limit_keeps_first_rows():
    result = evaluate(RowLogitsRunner(np.eye(3)[[0, 0, 1, 1, 2]]), classification_set(), limit=3, progress=False)
    assert result.count == 3
    assert result.value == pytest.approx(2 / 3)


def test_uniform_logits_have_perplexity_equal_to_vocab_size():
    evalset = lm_set()
    result = evaluate(UniformRunner(), evalset, batch_size=2, progress=False)
    assert result.name == "perplexity"
    assert result.value == pytest.approx(VOCAB, rel=1e-6)
    assert result.count == int(evalset.target_mask.sum())


def test_perplexity_scores_token_t_from_logits_at_t_minus_1():
    evalset = lm_set()
    result = evaluate(OracleRunner(margin=2.0), evalset, progress=False)
    nll = math.log(math.exp(2.0) + VOCAB - 1) - 2.0
    assert result.value == pytest.approx(math.exp(nll), rel=1e-6)
    mask = evalset.target_mask
    assert (result.predictions[mask] == evalset.features["input_ids"][mask]).all()
    assert (result.predictions[:, 0] == -1).all()


def test_perplexity_is_stable_for_huge_logits():
    result = evaluate(OracleRunner(margin=1e4), lm_set(), progress=False)
    assert result.value == pytest.approx(1.0)


def test_lm_agreement_counts_only_scored_tokens():
    evalset = lm_set()
    oracle = evaluate(OracleRunner(margin=2.0), evalset, progress=False)
    uniform = evaluate(UniformRunner(), evalset, progress=False)
    targets = evalset.features["input_ids"][evalset.target_mask]
    assert agreement(oracle, oracle, evalset) == 1.0
    # Uniform logits argmax to token 0, which is never a scored target here.
    assert (targets != 0).all()
    assert agreement(oracle, uniform, evalset) == 0.0


def test_classification_agreement_and_shape_check():
    evalset = classification_set()
    a = EvalResult("accuracy", 0.0, np.array([0, 1, 1, 2, 0]), 5)
    b = EvalResult("accuracy", 0.0, np.array([0, 1, 0, 2, 1]), 5)
    assert agreement(a, b, evalset) == pytest.approx(3 / 5)
    with pytest.raises(ValueError, match="shape"):
        agreement(a, EvalResult("accuracy", 0.0, np.array([0, 1]), 2), evalset)
