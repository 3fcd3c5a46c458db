from __future__ import annotations

import numpy as np
import pytest

from compress.algos.sensitivity import keep_in_float, kl_divergence, rank_layers
from compress.errors import ExportMismatch
from compress.eval.metrics import metric_drop

LAYERS = {"q": "MatMul", "k": "MatMul", "ffn": "MatMul", "head": "Gemm", "embed": "Gather"}
# What quantizing each layer costs, in accuracy points; the fake model's drop is the sum over quantized layers.
DAMAGE = {"q": 0.001, "k": 0.0, "ffn": 0.01, "head": 0.2, "embed": 0.03}


def quantized(float_nodes: list[str]) -> frozenset[str]:
    """The fake quantizer: the 'graph' is the set of quantized layers."""
    return frozenset(LAYERS) - set(float_nodes)


def fake_drop(graph: frozenset[str]) -> float:
    return sum(DAMAGE[layer] for layer in graph)


def test_layers_rank_by_the_score_of_each_alone_quantized():
    table = rank_layers(LAYERS, quantized, lambda graph: {"score": fake_drop(graph), "alone": sorted(graph)})
    assert [row["node"] for row in table] == ["head", "embed", "ffn", "q", "k"]
    assert table[0] == {"node": "head", "op": "Gemm", "score": 0.2, "alone": ["head"]}


def test_fallback_keeps_the_fewest_sensitive_layers_that_meet_the_budget():
    calls = []

    def drop(graph):
        calls.append(graph)
        return fake_drop(graph)

    ranked = ["head", "embed", "ffn", "q", "k"]
    fallback = keep_in_float(ranked, quantized, drop, max_drop=0.015)
    assert fallback.kept_float == ["head", "embed"]
    assert fallback.drop == pytest.approx(0.011)
    assert [t["kept_float"] for t in fallback.trials] == [0, 1, 2]  # doubling stops at the first pass
    assert fallback.trials[0]["drop"] == pytest.approx(0.241) and len(calls) == 3


def test_fallback_bisects_between_a_failing_and_a_passing_count():
    ranked = [f"l{i}" for i in range(16)]
    damage = {layer: 0.01 for layer in ranked}
    fallback = keep_in_float(ranked, lambda kept: [x for x in ranked if x not in kept],
                             lambda graph: sum(damage[x] for x in graph), max_drop=0.065)
    assert len(fallback.kept_float) == 10 and fallback.drop == pytest.approx(0.06)
    assert [t["kept_float"] for t in fallback.trials] == [0, 1, 2, 4, 8, 16, 12, 10, 9]


def test_a_model_within_budget_keeps_nothing_in_float():
    fallback = keep_in_float(["head"], quantized, lambda graph: 0.0, max_drop=0.0)
    assert fallback.kept_float == [] and fallback.trials == [{"kept_float": 0, "drop": 0.0}]


def test_a_budget_beyond_max_layers_fails_naming_the_setting_and_the_best_drop():
    with pytest.raises(ExportMismatch, match=r"fallback.max_drop 0.005 not met: the best validation drop was "
                                             r"0.041 with 1 of 5 layers in float \(fallback.max_layers 1\)"):
        keep_in_float(["head", "embed", "ffn", "q", "k"], quantized, fake_drop, max_drop=0.005, max_layers=1)


def test_a_nan_drop_never_meets_the_budget():
    with pytest.raises(ExportMismatch):
        keep_in_float(["head"], quantized, lambda graph: float("nan"), max_drop=1.0)


def test_kl_divergence_is_zero_for_equal_logits_and_matches_the_formula():
    logits = np.array([[2.0, 0.0], [0.0, 0.0]])
    assert kl_divergence(logits, logits + 5.0) == pytest.approx([0.0, 0.0])  # a shift changes no probability
    p, q = np.array([0.5, 0.5]), np.exp([2.0, 0.0]) / np.exp([2.0, 0.0]).sum()
    assert kl_divergence(np.zeros((1, 2)), logits[:1])[0] == pytest.approx(float((p * np.log(p / q)).sum()))
    assert kl_divergence(np.zeros((3, 4, 5)), np.ones((3, 4, 5))).shape == (3, 4)


def test_metric_drop_is_points_or_a_relative_rise():
    assert metric_drop(0.9, 0.85, higher_is_better=True) == pytest.approx(0.05)
    assert metric_drop(20.0, 21.0, higher_is_better=False) == pytest.approx(0.05)
