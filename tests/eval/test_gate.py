from __future__ import annotations

import copy
import json

import numpy as np
import pytest

from compress.errors import GateRefused
from compress.eval.gate import gate, read_results, render

ROWS = 400


def results(correct: np.ndarray, p50: float = 10.0, spread: float = 0.02, cpu: str = "Xeon") -> dict:
    return {
        "machine": {"cpu": cpu, "arch": "x86_64", "isa": ["avx2"], "cores": 2},
        "bench": {"threads": 2},
        "data": {"fingerprint": "sst2-dev"},
        "rows": [{"name": "03-ptq", "metric": {"name": "accuracy", "value": float(correct.mean())},
                  "metric_rows": {"correct": correct.tolist()},
                  "latency_ms": {"p50": p50, "spread": spread}},
                 {"name": "03-ptq@openvino", "not_run": "No conversion rule"}],
    }


def outcomes(accuracy: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    correct = np.zeros(ROWS, dtype=np.int64)
    correct[rng.permutation(ROWS)[: round(accuracy * ROWS)]] = 1
    return correct


BASE = outcomes(0.88)


def test_an_equal_candidate_passes():
    checks = gate(results(BASE), results(BASE.copy(), p50=10.1), max_drop=0.5, max_slowdown=1.05)
    assert [(c.row, c.measure, c.failed) for c in checks] == [("03-ptq", "accuracy", False),
                                                               ("03-ptq", "latency", False)]
    assert render(checks, 0.5, 1.05).endswith("gate passed: 2 checks within the limits (max drop 0.5, max slowdown 1.05x)")


def test_a_clearly_worse_candidate_fails_on_both():
    worse = BASE.copy()
    worse[np.flatnonzero(BASE)[:40]] = 0  # 10 points lost on the same rows
    checks = gate(results(BASE), results(worse, p50=13.0), max_drop=0.5, max_slowdown=1.05)
    assert [c.failed for c in checks] == [True, True]
    text = render(checks, 0.5, 1.05)
    assert "FAIL 03-ptq accuracy: 88.00% -> 78.00%, loss +10.00 pt" in text
    assert "FAIL 03-ptq latency: 10.00 ms -> 13.00 ms, x1.300" in text
    assert "gate failed: 2 of 2 checks lost more than allowed" in text


def test_noise_alone_does_not_fail_it():
    flipped = BASE.copy()
    flipped[np.flatnonzero(BASE)[:2]] = 0  # two rows (0.5 pt): within the interval
    flipped[np.flatnonzero(BASE == 0)[:1]] = 1
    checks = gate(results(BASE, spread=0.08), results(flipped, p50=10.7, spread=0.03), max_drop=0.2,
                  max_slowdown=1.05)
    assert [c.failed for c in checks] == [False, False]  # 0.25 pt lost, x1.07 slower: neither beyond noise


def test_different_data_or_machines_are_refused_unless_allowed():
    other = results(BASE)
    other["data"]["fingerprint"] = "ag-news"
    with pytest.raises(GateRefused, match=r"different eval data \(their eval fingerprints differ\)"):
        gate(results(BASE), other, 0.5, 1.05)
    assert "by value: no paired rows" in gate(results(BASE), other, 0.5, 1.05, other_data=True)[0].change
    with pytest.raises(GateRefused, match=r"different machines or thread counts \(Xeon, 2 cores, 2 threads"):
        gate(results(BASE), results(BASE, cpu="EPYC"), 0.5, 1.05)
    assert gate(results(BASE), results(BASE, cpu="EPYC"), 0.5, 1.05, other_machine=True)


def test_rows_are_named_or_shared_and_unreadable_files_are_one_line(tmp_path):
    with pytest.raises(GateRefused, match=r"--row 03-ptq@openvino: not a measured row of the baseline"):
        gate(results(BASE), results(BASE), 0.5, 1.05, rows=["03-ptq@openvino"])
    renamed = copy.deepcopy(results(BASE))
    renamed["rows"][0]["name"] = "04-other"
    with pytest.raises(GateRefused, match="share no measured row"):
        gate(results(BASE), renamed, 0.5, 1.05)
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(GateRefused, match=r"broken.json: not JSON"):
        read_results(tmp_path / "broken.json")
    (tmp_path / "list.json").write_text(json.dumps([1]))
    with pytest.raises(GateRefused, match="not a compress results.json"):
        read_results(tmp_path / "list.json")
    with pytest.raises(GateRefused, match="missing.json: cannot read"):
        read_results(tmp_path / "missing.json")


def test_perplexity_is_judged_on_its_relative_rise():
    nll = np.random.default_rng(1).uniform(2.0, 4.0, size=200)
    def lm(scale: float) -> dict:
        value = float(np.exp((nll * scale).sum() / 200))
        base = results(BASE)
        base["rows"][0] |= {"metric": {"name": "perplexity", "value": value},
                            "metric_rows": {"nll": (nll * scale).tolist(), "tokens": [1] * 200}}
        return base
    checks = gate(lm(1.0), lm(1.1), max_drop=5.0, max_slowdown=1.05)
    assert checks[0].measure == "perplexity" and checks[0].failed  # e^(0.1 * ~3) - 1 ≈ 35 % risen
    assert not gate(lm(1.0), lm(1.0), max_drop=5.0, max_slowdown=1.05)[0].failed


def test_results_without_an_eval_fingerprint_are_not_assumed_comparable():
    old = results(BASE)
    del old["data"]
    with pytest.raises(GateRefused, match="one was written by an older compress, without an eval fingerprint"):
        gate(old, results(BASE), 0.5, 1.05)
