from __future__ import annotations

import json

import pytest

from compress.eval.bench import Variant, run_bench
from compress.eval.report import write_results
from compress.recipe import BenchConfig

ROW_KEYS = {"name", "format", "precision", "metric", "latency_ms", "latency_real_ms", "batch_size", "seq_len",
            "threads", "size_bytes", "peak_rss_mb", "speedup_p50", "metric_delta"}
CONFIG = BenchConfig(batch_size=2, seq_len=16, threads=1, warmup=1, runs=10, real_length_samples=2)


def test_bench_compares_variants_and_reports(bert_torch_artifact, bert_onnx_artifact, classification_evalset,
                                             tmp_path):
    variants = [Variant("fp32-torch", bert_torch_artifact, "torch", "fp32"),
                Variant("fp32-onnx", bert_onnx_artifact, "onnx", "fp32")]
    results = run_bench(variants, classification_evalset, CONFIG, baseline="fp32-torch",
                        quiet=True)

    assert set(results) == {"baseline", "machine", "versions", "bench", "rows"}
    assert results["baseline"] == "fp32-torch"
    assert results["bench"]["runs"] == 10
    baseline, onnx = results["rows"]
    assert set(baseline) == set(onnx) == ROW_KEYS
    assert baseline["speedup_p50"] == 1.0
    assert baseline["metric_delta"] == 0.0
    assert onnx["speedup_p50"] == pytest.approx(baseline["latency_ms"]["p50"] / onnx["latency_ms"]["p50"])
    assert onnx["metric_delta"] == pytest.approx(0.0)
    assert baseline["size_bytes"] == (bert_torch_artifact / "model.safetensors").stat().st_size
    assert onnx["size_bytes"] == (bert_onnx_artifact / "model.onnx").stat().st_size
    assert (onnx["format"], onnx["threads"], onnx["seq_len"]) == ("onnx", 1, 16)

    out = tmp_path / "report"
    write_results(results, out, notes=["tiny random model", "second note"], command="compress bench demo.yaml")
    assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(results))
    report = (out / "report.md").read_text()
    assert "| Variant | Format | Precision | accuracy (vs baseline) |" in report
    assert "| fp32-onnx | onnx | fp32 |" in report
    assert "- tiny random model\n- second note\n" in report
    assert "compress bench demo.yaml" in report


def test_failed_worker_raises_with_its_stderr(classification_evalset, tmp_path):
    not_an_artifact = tmp_path / "empty"
    not_an_artifact.mkdir()
    variants = [Variant("broken", not_an_artifact, "onnx", "fp32")]
    with pytest.raises(RuntimeError, match="not a compress artifact"):
        run_bench(variants, classification_evalset, CONFIG, baseline="broken", quiet=True)


def test_unknown_baseline_is_refused_before_running(bert_onnx_artifact, classification_evalset):
    with pytest.raises(ValueError, match="baseline"):
        run_bench([Variant("a", bert_onnx_artifact, "onnx", "fp32")], classification_evalset, CONFIG, baseline="b",
                  quiet=True)
