from __future__ import annotations

import json

from compress.eval.report import write_results


def perplexity_results() -> dict:
    def row(name: str, fmt: str, value: float, p50: float, real: dict | None) -> dict:
        return {
            "name": name, "format": fmt, "precision": "int8" if fmt == "onnx" else "fp32",
            "metric": {"name": "perplexity", "value": value}, "latency_ms": {"p50": p50, "p90": p50 * 1.5, "mean": p50},
            "latency_real_ms": real, "batch_size": 1, "seq_len": 256, "threads": 2, "size_bytes": 3 * (1 << 20),
            "peak_rss_mb": 512.4, "speedup_p50": 40.0 / p50, "metric_delta": value - 12.5,
        }

    return {
        "baseline": "fp32-torch",
        "machine": {"cpu": "Test CPU 9000", "arch": "x86_64", "isa": ["avx2", "avx512_vnni"], "cores": 2,
                    "python": "3.11.7", "os": "Linux"},
        "versions": {"torch": "2.13.0", "onnxruntime": "1.32.0"},
        "bench": {"enabled": True, "batch_size": 1, "seq_len": 256, "threads": 2, "warmup": 10, "runs": 100,
                  "real_length_samples": 0},
        "rows": [row("fp32-torch", "torch", 12.5, 40.0, None), row("int8-onnx", "onnx", 12.75, 10.0, None)],
    }


def test_report_lists_machine_rows_notes_and_versions(tmp_path):
    results = perplexity_results()
    write_results(results, tmp_path, notes=["int8 needs VNNI to pay off"])
    report = (tmp_path / "report.md").read_text()
    assert report.startswith("# Benchmark report\n")
    assert "Reproduce with" not in report
    assert "Test CPU 9000 (x86_64), 2 cores, benchmarked with 2 threads" in report
    assert "avx2, avx512_vnni" in report
    assert "| int8-onnx | onnx | int8 | 12.75 (+2.00%) | 10.00 | 15.00 | 4.00x | - | 3.0 | 512 |" in report
    assert "## Notes\n\n- int8 needs VNNI to pay off\n" in report
    assert "- onnxruntime 1.32.0" in report
    assert json.loads((tmp_path / "results.json").read_text()) == results


def test_rewrite_replaces_files_and_leaves_no_temporaries(tmp_path):
    results = perplexity_results()
    write_results(results, tmp_path, notes=["first"])
    write_results(results, tmp_path, notes=["second"])
    assert "- second" in (tmp_path / "report.md").read_text()
    assert "- first" not in (tmp_path / "report.md").read_text()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["report.md", "results.json"]
