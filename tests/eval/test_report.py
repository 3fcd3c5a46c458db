from __future__ import annotations

import json

from compress.eval.report import write_results

TORCH = {"name": "torch", "version": "2.13.0", "device": "cpu", "device_name": None, "autocast": None, "threads": 2,
         "interop_threads": 1}
ORT = {"name": "onnxruntime", "version": "1.32.0", "execution_provider": "CPUExecutionProvider",
       "intra_op_threads": 2, "inter_op_threads": 1, "denormal_as_zero": True}


def latency(p50: float) -> dict:
    return {"p50": p50, "p90": p50 * 1.5, "mean": p50, "rounds": [p50 * 0.99, p50, p50 * 1.02], "spread": 0.03}


def perplexity_results() -> dict:
    def row(name: str, parent: str | None, runtime: dict, value: float, p50: float, rel: float | None) -> dict:
        return {
            "name": name, "format": "onnx" if runtime is ORT else "torch", "precision": "int8" if parent else "fp32",
            "parent": parent, "runtime": runtime, "metric": {"name": "perplexity", "value": value},
            "metric_delta": value - 12.5, "metric_delta_ci95": [value - 12.6, value - 12.4],
            "metric_change_rel": rel, "metric_change_rel_ci95": [rel - 0.004, rel + 0.006],
            "latency_ms": latency(p50), "latency_padded_ms": latency(p50 * 1.4), "latency_real_ms": None,
            "batch_size": 1, "seq_len": 256, "speedup_vs_baseline": 40.0 / p50,
            "speedup_vs_parent": None if parent is None else 20.0 / p50, "size_bytes": 3 * (1 << 20),
            "size_zipped_bytes": 2.5 * (1 << 20), "peak_rss_mb": 512.4,
        }

    return {
        "baseline": "fp32-torch",
        "machine": {"cpu": "Test CPU 9000", "arch": "x86_64", "isa": ["avx2", "avx512_vnni"], "cores": 2,
                    "python": "3.11.7", "os": "Linux"},
        "versions": {"torch": "2.13.0", "onnxruntime": "1.32.0"},
        "bench": {"enabled": True, "baseline": None, "batch_size": 1, "seq_len": 256, "threads": 2, "warmup": 10,
                  "runs": 100, "rounds": 3, "real_length_samples": 0, "timeout_s": 900},
        "rows": [row("fp32-torch", None, TORCH, 12.5, 40.0, 0.0), row("fp32-onnx", None, ORT, 12.5, 20.0, 0.0),
                 row("int8-onnx", "fp32-onnx", ORT, 12.75, 10.0, 0.02)],
    }


def test_report_lists_machine_method_rows_notes_and_versions(tmp_path):
    results = perplexity_results()
    write_results(results, tmp_path, notes=["int8 needs VNNI to pay off"])
    report = (tmp_path / "report.md").read_text()
    assert report.startswith("# Benchmark report\n")
    assert "Reproduce with" not in report
    assert "Test CPU 9000 (x86_64), 2 cores, benchmarked with 2 threads" in report
    assert "avx2, avx512_vnni" in report
    assert "3 interleaved rounds" in report and "100 timed runs per variant" in report
    assert "batch 1 × 256 real tokens" in report
    assert "ratios of fixed-length p50s taken in this one interleaved run" in report
    assert ("| fp32-torch | - | torch cpu, 2 threads | fp32 | 12.50 (baseline) | 40.00 ±3.0% | 1.00x | - | 56.00 | - "
            "| 3.0 | 2.5 | 512 |") in report
    assert ("| int8-onnx | fp32-onnx | onnxruntime CPU, 2 threads | int8 | 12.75 (+2.00%, +1.60% to +2.60%) "
            "| 10.00 ±3.0% | 4.00x | 2.00x | 14.00 | - | 3.0 | 2.5 | 512 |") in report
    assert "## Notes\n\n- int8 needs VNNI to pay off\n" in report
    assert "- onnxruntime 1.32.0" in report
    assert json.loads((tmp_path / "results.json").read_text()) == results


def test_generation_columns_show_the_p50s_or_why_a_variant_cannot_generate(tmp_path):
    results = perplexity_results()
    results["bench"].update(new_tokens=32, generation_runs=10)
    torch_row, onnx_row, int8_row = results["rows"]
    torch_row.update(ttft_ms=latency(45.0), per_token_ms=latency(4.5), cannot_generate=None)
    onnx_row.update(ttft_ms=None, per_token_ms=None, cannot_generate="no KV cache in the graph")
    int8_row.update(ttft_ms=latency(12.0), per_token_ms=latency(1.25), cannot_generate=None)
    write_results(results, tmp_path)
    report = (tmp_path / "report.md").read_text()
    assert "| real-length p50 ms | first token ms | ms/token | Size MiB | Zipped MiB | Peak RSS MiB |" in report
    assert "|---|---|---|---|" + "|".join(["---:"] * 11) + "|" in report
    assert "| 56.00 | - | 45.00 | 4.50 | 3.0 |" in report
    assert "| 28.00 | - | no KV cache in the graph | - | 3.0 |" in report
    assert "| 14.00 | - | 12.00 | 1.25 | 3.0 |" in report
    assert ("a prompt of 256 real tokens, then 32 new tokens" in report
            and "the mean of the 31 steps after it" in report and "over 10 timed generations" in report)


def test_a_bench_without_generation_has_no_generation_columns(tmp_path):
    write_results(perplexity_results(), tmp_path)
    report = (tmp_path / "report.md").read_text()
    assert "first token" not in report and "ms/token" not in report and "Generation" not in report


def test_accuracy_shows_percent_with_the_change_in_points(tmp_path):
    results = perplexity_results()
    results["rows"] = results["rows"][:2]
    for row, (value, delta, interval) in zip(results["rows"], [(0.9, 0.0, [0.0, 0.0]),
                                                              (0.885, -0.015, [-0.025, -0.006])]):
        row.update(metric={"name": "accuracy", "value": value}, metric_delta=delta, metric_delta_ci95=interval,
                   metric_change_rel=None, metric_change_rel_ci95=None)
    write_results(results, tmp_path)
    report = (tmp_path / "report.md").read_text()
    assert "| accuracy (Δ vs baseline, 95 % CI) |" in report
    assert "| fp32-torch | - | torch cpu, 2 threads | fp32 | 90.00% (baseline) |" in report
    assert "| fp32-onnx | - | onnxruntime CPU, 2 threads | fp32 | 88.50% (-1.50 pt, -2.50 to -0.60) |" in report


def test_the_machine_section_names_the_gpus_when_there_are_some(tmp_path):
    results = perplexity_results()
    write_results(results, tmp_path)
    assert "- GPU:" not in (tmp_path / "report.md").read_text()
    results["machine"]["gpus"] = ["NVIDIA H200"]
    write_results(results, tmp_path)
    assert "- GPU: NVIDIA H200\n" in (tmp_path / "report.md").read_text()


def test_rewrite_replaces_files_and_leaves_no_temporaries(tmp_path):
    results = perplexity_results()
    write_results(results, tmp_path, notes=["first"])
    write_results(results, tmp_path, notes=["second"])
    assert "- second" in (tmp_path / "report.md").read_text()
    assert "- first" not in (tmp_path / "report.md").read_text()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["report.html", "report.md", "results.json"]
    assert "<li>second</li>" in (tmp_path / "report.html").read_text()


def test_a_row_slower_than_the_row_it_came_from_is_flagged_not_shown_as_a_gain(tmp_path):
    results = perplexity_results()
    write_results(results, tmp_path)
    assert ("## Gains are real?\n\nEach row against the row it was made from on the same runtime ('From'), from "
            "this benchmark's own measurements:\n\n- every row with a 'From' is at least as fast") in (tmp_path / "report.md").read_text()
    results["rows"][2]["latency_ms"] = latency(30.0)  # int8-onnx now slower than its fp32-onnx at 20 ms
    write_results(results, tmp_path)
    assert ("- **int8-onnx is 1.50x slower than fp32-onnx, the row it was made from on the same runtime"
            in (tmp_path / "report.md").read_text())
    assert "<strong>int8-onnx is 1.50x slower" in (tmp_path / "report.html").read_text()


def test_sparsity_shows_each_block_by_layer_and_the_layers_outside_blocks(tmp_path):
    results = perplexity_results()
    results["sparsity"] = {"00-prune": {"achieved": 0.5, "target": 0.5, "layers": {
        "model.layers.0.self_attn.q_proj": 0.5, "model.layers.0.mlp.down_proj": 0.25,
        "model.layers.1.self_attn.q_proj": 0.75, "model.embed_tokens": 0.5}}}
    write_results(results, tmp_path)
    report = (tmp_path / "report.md").read_text()
    assert "## Sparsity of 00-prune\n\n50.00% of the pruned weights are zero (target 50.00%)." in report
    assert "| Block | self_attn.q_proj | mlp.down_proj |\n|---|---:|---:|\n| 0 | 50.0% | 25.0% |\n| 1 | 75.0% | - |" \
        in report
    assert "- model.embed_tokens: 50.0%" in report
