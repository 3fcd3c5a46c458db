from __future__ import annotations

import math

import numpy as np
import pytest

from compress.eval.metrics import EvalResult, agreement, compare_paired, evaluate, metric_from_rows
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
    assert result.rows["correct"].tolist() == [1, 1, 0, 1, 0]
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
    scored_per_row = evalset.target_mask.sum(axis=1)
    assert result.rows["tokens"].tolist() == scored_per_row.tolist()
    np.testing.assert_allclose(result.rows["nll"], scored_per_row * nll, rtol=1e-6)
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


def test_metric_from_rows_scores_each_line_of_a_2d_index():
    rows = {"nll": np.array([2.0, 0.0, 4.0]), "tokens": np.array([1, 1, 2])}
    assert metric_from_rows("perplexity", rows) == pytest.approx(math.exp(6 / 4))
    per_line = metric_from_rows("perplexity", rows, np.array([[0, 0], [1, 2]]))
    np.testing.assert_allclose(per_line, [math.exp(2.0), math.exp(4 / 3)])
    correct = {"correct": np.array([1, 0, 1, 1])}
    np.testing.assert_allclose(metric_from_rows("accuracy", correct, np.array([[0, 1], [2, 3]])), [0.5, 1.0])


def test_identical_variants_change_by_exactly_zero():
    rng = np.random.default_rng(1)
    accuracy_rows = {"correct": (rng.random(200) < 0.8).astype(np.int64)}
    change = compare_paired("accuracy", accuracy_rows, accuracy_rows)
    assert (change.delta, change.delta_ci95, change.rel, change.rel_ci95) == (0.0, (0.0, 0.0), None, None)
    lm_rows = {"nll": rng.random(50) * 100, "tokens": rng.integers(20, 40, 50)}
    change = compare_paired("perplexity", lm_rows, lm_rows)
    assert (change.delta, change.delta_ci95, change.rel, change.rel_ci95) == (0.0, (0.0, 0.0), 0.0, (0.0, 0.0))


@pytest.mark.parametrize("wrong", [5, 44])
def test_accuracy_interval_around_rows_lost_has_the_binomial_width(wrong):
    rows = 872
    rng = np.random.default_rng(2)
    reference = np.ones(rows, dtype=np.int64)
    reference[rng.choice(rows, 120, replace=False)] = 0
    candidate = reference.copy()
    candidate[rng.choice(np.flatnonzero(reference), wrong, replace=False)] = 0  # wrong on `wrong` rows more
    change = compare_paired("accuracy", {"correct": reference}, {"correct": candidate})
    assert change.delta == pytest.approx(-wrong / rows)
    low, high = change.delta_ci95
    assert low < change.delta < high <= 0
    # Only the rows that differ vary between resamples: the half-width is that of a binomial proportion.
    share = wrong / rows
    expected_half_width = 1.96 * math.sqrt(share * (1 - share) / rows)
    assert (high - low) / 2 == pytest.approx(expected_half_width, rel=0.2)


def test_perplexity_change_is_relative_and_exact_for_a_constant_shift_per_token():
    rng = np.random.default_rng(3)
    tokens = rng.integers(50, 256, 64)
    reference = {"nll": tokens * rng.uniform(2.0, 3.0, 64), "tokens": tokens}
    shift = 0.03  # nats per token: perplexity times e^0.03 on every subset of windows
    candidate = {"nll": reference["nll"] + shift * tokens, "tokens": tokens}
    change = compare_paired("perplexity", reference, candidate)
    rise = math.exp(shift) - 1
    assert change.rel == pytest.approx(rise)
    assert change.rel_ci95 == pytest.approx((rise, rise))
    ppl = metric_from_rows("perplexity", reference)
    assert change.delta == pytest.approx(ppl * rise)
    assert change.delta_ci95[0] < change.delta < change.delta_ci95[1]


def test_bootstrap_is_seeded_and_needs_paired_rows():
    a, b = {"correct": np.array([1, 0, 1, 1, 0, 1])}, {"correct": np.array([1, 1, 0, 1, 0, 0])}
    assert compare_paired("accuracy", a, b) == compare_paired("accuracy", a, b)
    assert compare_paired("accuracy", a, b, seed=1) != compare_paired("accuracy", a, b, seed=2)
    with pytest.raises(ValueError, match="same"):
        compare_paired("accuracy", a, {"correct": np.array([1, 0])})
