from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from compress.errors import ExportMismatch
from compress.eval.metrics import EvalResult
from compress.eval.runners import OrtRunner, TorchRunner
from compress.export.verify import verify_float, verify_quantized
from compress.recipe import FloatTolerance, QuantTolerance


def scale_weight_matrices(source, target, factor: float = 1.1) -> None:
    model = onnx.load(str(source))
    for weight in model.graph.initializer:
        if len(weight.dims) == 2 and weight.data_type == onnx.TensorProto.FLOAT:
            weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight) * factor, weight.name))
    onnx.save(model, str(target))


def test_an_altered_graph_is_caught(tiny_classifier, classifier_onnx_dir, classification_evalset, tmp_path):
    model, _ = tiny_classifier
    features = classification_evalset.features
    scale_weight_matrices(classifier_onnx_dir / "model.onnx", tmp_path / "altered.onnx")
    candidate = OrtRunner(tmp_path / "altered.onnx").logits(features)
    with pytest.raises(ExportMismatch, match=r"logits: .* worst at \(\d+, \d+\).*allowed \(atol 0.0001") as err:
        verify_float(TorchRunner(model).logits(features), candidate, FloatTolerance())
    assert err.value.exit_code == 3


def test_verify_float_measures_and_rejects_nan():
    reference = np.array([[1.0, -2.0], [3.0, 100.0]], np.float32)
    close = reference + np.array([[5e-5, 0], [0, 0.09]], np.float32)  # 0.09 < 1e-4 + 1e-3 * 100
    assert verify_float(reference, close, FloatTolerance()) == pytest.approx({"max_abs_diff": 0.09, "rows": 2},
                                                                             rel=1e-3)
    broken = reference.copy()
    broken[1, 0] = np.nan
    with pytest.raises(ExportMismatch, match=r"scores: 1 of 4 .* worst at \(1, 0\)"):
        verify_float(reference, broken, FloatTolerance(), output_name="scores")
    with pytest.raises(ExportMismatch, match="shape"):
        verify_float(reference, reference[:1], FloatTolerance())


def accuracy(predictions: list[int], labels: list[int]) -> EvalResult:
    predictions = np.array(predictions)
    return EvalResult("accuracy", float((predictions == np.array(labels)).mean()), predictions, len(predictions))


def test_verify_quantized_accepts_a_faithful_candidate_and_reports_figures(classification_evalset):
    evalset = classification_evalset
    reference = accuracy(list(evalset.labels), list(evalset.labels))
    one_flip = accuracy([0, *evalset.labels[1:]], list(evalset.labels))
    measured = verify_quantized(reference, one_flip, evalset, QuantTolerance(max_metric_drop=0.2, min_agreement=0.8),
                                higher_is_better=True)
    assert measured["metric_drop"] == pytest.approx(0.125) and measured["agreement"] == pytest.approx(0.875)


def test_verify_quantized_rejects_impossible_thresholds(classification_evalset):
    evalset = classification_evalset
    reference = accuracy(list(evalset.labels), list(evalset.labels))
    damaged = accuracy([1 - evalset.labels[0], *evalset.labels[1:]], list(evalset.labels))
    with pytest.raises(ExportMismatch, match=r"agreement 0.8750 < min_agreement 1") as err:
        verify_quantized(reference, damaged, evalset, QuantTolerance(max_metric_drop=1.0, min_agreement=1.0), True)
    assert "max_metric_drop" not in str(err.value)
    with pytest.raises(ExportMismatch, match=r"accuracy went from 1 to 0.875.*max_metric_drop 0.01"):
        verify_quantized(reference, damaged, evalset, QuantTolerance(min_agreement=0.0), True)


def test_perplexity_is_judged_by_its_relative_rise(lm_evalset):
    evalset = lm_evalset
    predictions = np.where(evalset.target_mask, 7, -1)
    reference = EvalResult("perplexity", 20.0, predictions, int(evalset.target_mask.sum()))
    worse = EvalResult("perplexity", 20.5, predictions, reference.count)  # +2.5 %
    assert verify_quantized(reference, worse, evalset, QuantTolerance(max_metric_drop=0.03), False)["agreement"] == 1
    with pytest.raises(ExportMismatch, match=r"perplexity went from 20 to 20.5: a drop of 0.025 \(relative rise\)"):
        verify_quantized(reference, worse, evalset, QuantTolerance(max_metric_drop=0.02), False)
