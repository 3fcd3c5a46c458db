from __future__ import annotations

import json
import sys
import time

import numpy as np
import psutil
import pytest

from compress.errors import BenchError
from compress.eval import workers
from compress.eval.bench import BenchStage, Variant, on_targets, run_bench
from compress.eval.report import write_results
from compress.eval.size import deployed_files, disk_size
from compress.eval.targets import TARGETS, Target
from compress.eval.workers import WorkerProcess
from compress.kinds import Kind
from compress.settings import BenchConfig

ROW_KEYS = {"name", "format", "precision", "target", "parent", "runtime", "metric", "metric_delta",
            "metric_delta_ci95", "metric_change_rel", "metric_change_rel_ci95", "latency_ms", "latency_padded_ms",
            "latency_real_ms", "batch_size", "seq_len", "speedup_vs_baseline", "speedup_vs_parent", "size_bytes",
            "size_zipped_bytes", "roofline", "peak_rss_mb", "metric_rows", "throughput_per_s"}
LATENCY_KEYS = {"p50", "p90", "mean", "rounds", "spread"}
CONFIG = BenchConfig(batch_size=2, seq_len=16, threads=1, warmup=1, runs=10, rounds=3, real_length_samples=2)
NAMES = ["fp32-torch", "fp32-onnx", "copy-onnx"]
LM_CONFIG = BenchConfig(batch_size=1, seq_len=8, threads=1, warmup=1, runs=10, rounds=3, real_length_samples=0,
                        new_tokens=3, generation_runs=4)


def children() -> set[int]:
    return {child.pid for child in psutil.Process().children(recursive=True)}


def recorded_bench(variants: list[Variant], evalset, config: BenchConfig) -> dict:
    """One run, with every request the parent sent, in order, and the children left after."""
    sent: list[tuple[str, dict]] = []
    send = WorkerProcess.send

    def recording_send(worker: WorkerProcess, request: dict) -> None:
        sent.append((worker.name, dict(request)))
        send(worker, request)

    before = children()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(WorkerProcess, "send", recording_send)
        results = run_bench(variants, evalset, config, baseline=variants[0].name, quiet=True)
    return {"results": results, "sent": sent, "children_left": children() - before, "evalset": evalset}


@pytest.fixture(scope="module")
def bench(bert_torch_artifact, bert_onnx_artifact, classification_evalset) -> dict:
    variants = [Variant("fp32-torch", bert_torch_artifact, "torch", "fp32"),
                Variant("fp32-onnx", bert_onnx_artifact, "onnx", "fp32"),
                Variant("copy-onnx", bert_onnx_artifact, "onnx", "fp32", parent="fp32-onnx")]
    return recorded_bench(variants, classification_evalset, CONFIG)


@pytest.fixture(scope="module")
def lm_bench(llama_artifacts, lm_evalset) -> dict:
    variants = [Variant("torch", llama_artifacts["torch"], "torch", "fp32"),
                Variant("onnx", llama_artifacts["onnx"], "onnx", "fp32"),
                Variant("onnx-kv", llama_artifacts["onnx-kv"], "onnx", "fp32")]
    return recorded_bench(variants, lm_evalset, LM_CONFIG)


def test_results_have_the_documented_shape(bench):
    results = bench["results"]
    assert set(results) == {"format", "baseline", "data", "machine", "versions", "bench", "rows"}
    assert results["format"] == "compress-results/2"
    assert results["data"] == {"fingerprint": bench["evalset"].fingerprint(), "eval_rows": len(bench["evalset"])}
    assert results["baseline"] == "fp32-torch"
    assert (results["bench"]["runs"], results["bench"]["rounds"]) == (10, 3)
    assert [row["name"] for row in results["rows"]] == NAMES
    for row in results["rows"]:
        assert set(row) == ROW_KEYS
        assert (row["batch_size"], row["seq_len"]) == (2, 16)
        for column in ("latency_ms", "latency_padded_ms", "latency_real_ms"):
            assert set(row[column]) == LATENCY_KEYS
            assert len(row[column]["rounds"]) == 3
            assert row[column]["spread"] >= 0


def test_speedups_are_ratios_of_fixed_length_p50s(bench):
    torch_row, onnx_row, copy_row = bench["results"]["rows"]
    p50 = {row["name"]: row["latency_ms"]["p50"] for row in bench["results"]["rows"]}
    assert torch_row["speedup_vs_baseline"] == 1.0
    assert onnx_row["speedup_vs_baseline"] == pytest.approx(p50["fp32-torch"] / p50["fp32-onnx"])
    assert copy_row["speedup_vs_baseline"] == pytest.approx(p50["fp32-torch"] / p50["copy-onnx"])
    assert (torch_row["parent"], torch_row["speedup_vs_parent"]) == (None, None)
    assert onnx_row["speedup_vs_parent"] is None
    assert copy_row["parent"] == "fp32-onnx"
    assert copy_row["speedup_vs_parent"] == pytest.approx(p50["fp32-onnx"] / p50["copy-onnx"])


def test_metric_change_is_paired_against_the_baseline(bench):
    torch_row, onnx_row, _ = bench["results"]["rows"]
    assert torch_row["metric"]["name"] == "accuracy"
    assert (torch_row["metric_delta"], torch_row["metric_delta_ci95"]) == (0.0, [0.0, 0.0])
    # The tiny graph predicts what the torch model predicts on every row: no change, and no doubt about it.
    assert onnx_row["metric"]["value"] == torch_row["metric"]["value"]
    assert (onnx_row["metric_delta"], onnx_row["metric_delta_ci95"]) == (0.0, [0.0, 0.0])
    assert (onnx_row["metric_change_rel"], onnx_row["metric_change_rel_ci95"]) == (None, None)
    # Each eval row's outcome is kept, so another run on the same rows can be compared paired (compress gate).
    assert len(torch_row["metric_rows"]["correct"]) == len(bench["evalset"])
    assert np.mean(torch_row["metric_rows"]["correct"]) == torch_row["metric"]["value"]


def test_rows_carry_runtime_settings_size_and_memory(bench, bert_torch_artifact, bert_onnx_artifact):
    torch_row, onnx_row, _ = bench["results"]["rows"]
    assert torch_row["runtime"]["name"] == "torch" and torch_row["runtime"]["threads"] == 1
    assert onnx_row["runtime"]["name"] == "onnxruntime"
    assert (onnx_row["runtime"]["intra_op_threads"], onnx_row["runtime"]["denormal_as_zero"]) == (1, True)
    torch_files = {path.name for path in deployed_files(bert_torch_artifact, "torch")}
    onnx_files = {path.name for path in deployed_files(bert_onnx_artifact, "onnx")}
    assert "model.safetensors" in torch_files and "model.onnx" not in torch_files
    assert "model.onnx" in onnx_files and "model.safetensors" not in onnx_files and "compress.json" not in onnx_files
    assert {k: torch_row[k] for k in ("size_bytes", "size_zipped_bytes")} == disk_size(
        deployed_files(bert_torch_artifact, "torch"))
    assert 0 < onnx_row["size_zipped_bytes"] < onnx_row["size_bytes"]
    assert onnx_row["size_bytes"] > (bert_onnx_artifact / "model.onnx").stat().st_size
    assert all(row["peak_rss_mb"] > 10 for row in bench["results"]["rows"])


def test_variants_are_timed_in_interleaved_rounds(bench):
    sent = bench["sent"]
    ops = [(name, request["op"]) for name, request in sent]
    assert ops[:3] == [(name, "load") for name in NAMES]
    assert ops[-6:] == [(name, "metric") for name in NAMES] + [(name, "exit") for name in NAMES]
    latency = [(name, request["inputs"], request["runs"]) for name, request in sent if request["op"] == "latency"]
    expected = [(name, kind, runs) for runs in (4, 3, 3) for kind in ("fixed", "padded", "real") for name in NAMES]
    assert latency == expected
    rss_at = [index for index, (_, op) in enumerate(ops) if op == "rss"]
    assert rss_at == list(range(3 + len(expected), 6 + len(expected)))  # after all timing, before any metric


def test_all_workers_end_with_the_bench(bench):
    assert bench["children_left"] == set()


def test_report_shows_the_rows_and_how_they_were_measured(bench, tmp_path):
    results = bench["results"]
    write_results(results, tmp_path, notes=["tiny random model", "second note"], command="compress bench demo.yaml")
    assert json.loads((tmp_path / "results.json").read_text()) == json.loads(json.dumps(results))
    report = (tmp_path / "report.md").read_text()
    assert "| Variant | From | Runtime | Precision | accuracy (Δ vs baseline, 95 % CI) |" in report
    assert "| copy-onnx | fp32-onnx | onnxruntime CPU, 1 thread | fp32 |" in report
    assert "3 interleaved rounds" in report and "batch 2 × 16 real tokens" in report
    assert "- tiny random model\n- second note\n" in report
    assert "compress bench demo.yaml" in report


def test_lm_variants_that_can_generate_are_timed_per_token_and_the_others_say_why_not(lm_bench):
    torch_row, onnx_row, kv_row = lm_bench["results"]["rows"]
    for row in (torch_row, kv_row):
        assert set(row) == ROW_KEYS | {"ttft_ms", "per_token_ms", "cannot_generate"}
        assert row["cannot_generate"] is None
        for column in ("ttft_ms", "per_token_ms"):
            assert set(row[column]) == LATENCY_KEYS and len(row[column]["rounds"]) == 3 and row[column]["p50"] > 0
    assert (onnx_row["ttft_ms"], onnx_row["per_token_ms"]) == (None, None)
    assert onnx_row["cannot_generate"] == "no KV cache in the graph"
    # The empty cache leaves the perplexity of the graph with cache inputs as it is without them.
    assert kv_row["metric"]["value"] == pytest.approx(onnx_row["metric"]["value"], rel=1e-5)


def test_generations_are_interleaved_after_each_rounds_forward_passes(lm_bench):
    ops = [(name, request["op"], request.get("inputs") or request.get("runs")) for name, request in lm_bench["sent"]
           if request["op"] in ("latency", "generate")]
    forward = [(name, "latency", kind) for kind in ("fixed", "padded") for name in ("torch", "onnx", "onnx-kv")]
    assert ops == [*forward, ("torch", "generate", 2), ("onnx-kv", "generate", 2),
                   *forward, ("torch", "generate", 1), ("onnx-kv", "generate", 1),
                   *forward, ("torch", "generate", 1), ("onnx-kv", "generate", 1)]
    generate = next(request for _, request in lm_bench["sent"] if request["op"] == "generate")
    assert generate == {"op": "generate", "new_tokens": 3, "warmup": 1, "runs": 2}
    assert lm_bench["children_left"] == set()


def test_lm_report_shows_the_generation_columns(lm_bench, tmp_path):
    write_results(lm_bench["results"], tmp_path)
    report = (tmp_path / "report.md").read_text()
    assert "| real-length p50 ms | first token ms | ms/token | Size MiB |" in report
    assert "| - | no KV cache in the graph | - |" in report
    assert "then 3 new tokens" in report


def test_a_dead_worker_raises_with_its_stderr_and_takes_the_others_down(bert_onnx_artifact, classification_evalset,
                                                                         tmp_path):
    not_an_artifact = tmp_path / "empty"
    not_an_artifact.mkdir()
    variants = [Variant("fine", bert_onnx_artifact, "onnx", "fp32"), Variant("broken", not_an_artifact, "onnx", "fp32")]
    before = children()
    with pytest.raises(BenchError, match="not a compress artifact") as failure:
        run_bench(variants, classification_evalset, CONFIG, baseline="fine", quiet=True)
    assert "bench worker for 'broken' failed" in str(failure.value)
    assert children() - before == set()


def test_a_worker_that_does_not_answer_is_stopped(bert_onnx_artifact, classification_evalset, monkeypatch):
    monkeypatch.setattr(workers, "WORKER_COMMAND", (sys.executable, "-c", "import time; time.sleep(60)"))
    impatient = CONFIG.model_copy(update={"timeout_s": 1})
    variants = [Variant("a", bert_onnx_artifact, "onnx", "fp32"), Variant("b", bert_onnx_artifact, "onnx", "fp32")]
    before, started = children(), time.monotonic()
    with pytest.raises(BenchError, match=r"bench worker for 'a' did not answer within 1 s \(bench.timeout_s\); "
                                         r"stopped it"):
        run_bench(variants, classification_evalset, impatient, baseline="a", quiet=True)
    assert time.monotonic() - started < 5
    assert children() - before == set()


@pytest.mark.parametrize(("baseline", "parent", "message"), [
    ("b", None, "baseline 'b' is not among"),
    ("a", "a", "parent 'a' is not another"),
    ("a", "missing", "parent 'missing' is not another"),
    ("a", "torch", "deploys on torch, not onnx"),
])
def test_inconsistent_variants_are_refused_before_running(bert_onnx_artifact, bert_torch_artifact,
                                                          classification_evalset, baseline, parent, message):
    variants = [Variant("a", bert_onnx_artifact, "onnx", "fp32", parent=parent),
                Variant("torch", bert_torch_artifact, "torch", "fp32")]
    before = children()
    with pytest.raises(ValueError, match=message):
        run_bench(variants, classification_evalset, CONFIG, baseline=baseline, quiet=True)
    assert children() == before


@pytest.fixture(scope="module")
def targets_bench(bert_torch_artifact, bert_onnx_artifact, bert_int8_fused_artifact, classification_evalset) -> dict:
    stages = [BenchStage("00-torch", bert_torch_artifact, Kind(), None),
              BenchStage("01-onnx", bert_onnx_artifact, Kind("onnx"), None),
              BenchStage("02-int8", bert_int8_fused_artifact, Kind("onnx", "int8-dynamic", runtime="onnxruntime"),
                         "01-onnx")]
    variants = on_targets(stages, [TARGETS["onnxruntime"], TARGETS["openvino"]])
    return recorded_bench(variants, classification_evalset, CONFIG)


def test_each_stage_runs_on_every_listed_target_of_its_format(targets_bench):
    rows = {row["name"]: row for row in targets_bench["results"]["rows"]}
    assert list(rows) == ["00-torch", "01-onnx", "01-onnx@openvino", "02-int8", "02-int8@openvino"]
    assert {name: row["target"] for name, row in rows.items()} == {
        "00-torch": "torch", "01-onnx": "onnxruntime", "01-onnx@openvino": "openvino", "02-int8": "onnxruntime",
        "02-int8@openvino": "openvino"}
    assert rows["01-onnx@openvino"]["runtime"]["precision"] == "f32"
    assert rows["02-int8"]["parent"] == "01-onnx"
    assert rows["01-onnx@openvino"]["metric"]["value"] == rows["01-onnx"]["metric"]["value"]


def test_a_graph_a_runtime_cannot_load_is_a_row_with_the_reason_and_never_timed(targets_bench, tmp_path):
    row = next(row for row in targets_bench["results"]["rows"] if row["name"] == "02-int8@openvino")
    assert row["not_run"] == ("No conversion rule found for operations: com.microsoft.QAttention, "
                              "com.microsoft.QEmbedLayerNormalization")
    assert "latency_ms" not in row and row["size_bytes"] > 0
    timed = {name for name, request in targets_bench["sent"] if request["op"] == "latency"}
    assert "02-int8@openvino" not in timed and "01-onnx@openvino" in timed
    assert targets_bench["children_left"] == set()
    write_results(targets_bench["results"], tmp_path)
    report = (tmp_path / "report.md").read_text()
    assert "| 02-int8@openvino | - | openvino CPU | int8 | not run: No conversion rule found" in report
    assert "openvino CPU, f32, 1 thread" in report


def test_each_row_sits_on_the_roofline_of_the_unit_its_precision_computes_on(targets_bench, tmp_path):
    rows = {row["name"]: row for row in targets_bench["results"]["rows"]}
    lines = {name: row["roofline"] for name, row in rows.items() if "not_run" not in row}
    assert lines["00-torch"]["flops"] == lines["01-onnx"]["flops"] == lines["01-onnx@openvino"]["flops"] > 0
    assert lines["02-int8"]["flops"] == lines["01-onnx"]["flops"]  # int8 does the same products, in fewer bytes
    assert lines["02-int8"]["bytes"] < lines["01-onnx"]["bytes"]
    assert [lines[name]["compute"] for name in ("00-torch", "01-onnx", "02-int8")] == ["fp32", "fp32", "int8"]
    for line in lines.values():
        floor = max(line["flops"] / line["peak_flops"], line["bytes"] / line["bandwidth"]) * 1000
        assert line["floor_ms"] == pytest.approx(floor) and line["x_floor"] > 1
    write_results(targets_bench["results"], tmp_path)
    assert "- 02-int8: " in (tmp_path / "report.md").read_text().split("## Roofline")[1]


def test_a_target_this_machine_lacks_is_a_row_that_says_so(bert_torch_artifact, bert_onnx_artifact,
                                                           classification_evalset, monkeypatch):
    monkeypatch.setattr(Target, "unavailable", lambda self: "no CUDA device" if self.device == "cuda" else None)
    stages = [BenchStage("torch", bert_torch_artifact, Kind(), None),
              BenchStage("onnx", bert_onnx_artifact, Kind("onnx"), None)]
    variants = on_targets(stages, [TARGETS["torch"], TARGETS["torch-cuda-bf16"]])
    assert [(v.name, v.not_run) for v in variants] == [("torch", None), ("torch@torch-cuda-bf16", "no CUDA device"),
                                                       ("onnx", None)]
    results = run_bench(variants, classification_evalset, CONFIG, baseline="torch", quiet=True)
    assert results["rows"][1]["not_run"] == "no CUDA device"
    with pytest.raises(BenchError, match="the baseline 'torch@torch-cuda-bf16' cannot run here: no CUDA device"):
        run_bench(variants, classification_evalset, CONFIG, baseline="torch@torch-cuda-bf16", quiet=True)


def test_a_precision_hint_applies_to_float_weights_only():
    assert TARGETS["torch-bf16"].rejects(Kind("torch", "fake-quant")) == (
        "a bf16 hint applies to float weights; these are fake-quant")
    assert TARGETS["torch-bf16"].rejects(Kind()) is None
    assert TARGETS["openvino"].rejects(Kind()) == "runs onnx artifacts, not torch"


@pytest.mark.parametrize(("target", "stored", "computes"), [
    ("onnxruntime", "fp32", "fp32"), ("onnxruntime", "int4", "int8"), ("openvino", "int8", "int8"),
    ("openvino-bf16", "fp32", "bf16"), ("openvino-bf16", "int8", "int8"), ("torch", "int8", "fp32"),
    ("torch-bf16", "fp32", "bf16"), ("torch-cuda-fp16", "fp32", "fp16"), ("onnxruntime", "fp16", "fp16"),
])
def test_a_hint_lowers_float_products_and_integer_graphs_compute_in_int8(target, stored, computes):
    assert TARGETS[target].computes(stored) == computes


def test_lists_of_batch_sizes_and_lengths_time_every_shape_in_the_same_rounds(bert_onnx_artifact,
                                                                             classification_evalset, tmp_path):
    config = CONFIG.model_copy(update={"batch_size": [2, 4], "seq_len": [16, 8]})
    assert config.shapes == [(2, 16), (2, 8), (4, 16), (4, 8)] and (config.batch, config.seq) == (2, 16)
    recorded = recorded_bench([Variant("onnx", bert_onnx_artifact, "onnx", "fp32")], classification_evalset, config)
    (row,) = recorded["results"]["rows"]
    assert [(s["batch_size"], s["seq_len"]) for s in row["latency_by_shape"]] == config.shapes
    assert row["latency_by_shape"][0]["p50"] == row["latency_ms"]["p50"]  # the main shape is the table's
    assert (row["batch_size"], row["seq_len"]) == (2, 16)
    for shape in row["latency_by_shape"]:
        assert shape["throughput_per_s"] == pytest.approx(shape["batch_size"] * 1000 / shape["p50"])
    timed = [request["inputs"] for _, request in recorded["sent"] if request["op"] == "latency"]
    assert timed.count("fixed 4x8") == 3  # once in each of the 3 rounds, beside the main inputs
    write_results(recorded["results"], tmp_path)
    assert "| Variant | 2 × 16 | 2 × 8 | 4 × 16 | 4 × 8 |" in (tmp_path / "report.md").read_text()


def test_a_shape_list_must_hold_distinct_values():
    with pytest.raises(ValueError, match="a list needs at least one value, each once"):
        BenchConfig(batch_size=[1, 1])
    with pytest.raises(ValueError, match="a list needs at least one value, each once"):
        BenchConfig(seq_len=[])
