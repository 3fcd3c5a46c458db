from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from compress.artifact import Artifact
from compress.eval.metrics import evaluate
from compress.eval.runners import TorchRunner
from compress.kinds import Kind

WORKER = [sys.executable, "-m", "compress.eval.worker"]
# Runs the worker as `python -m` would, then fails if that pulled in torch.
NO_TORCH_WORKER = [sys.executable, "-c", """
import runpy, sys
runpy.run_module("compress.eval.worker", run_name="__main__")
assert "torch" not in sys.modules, "the ONNX worker imported torch"
assert "transformers" not in sys.modules, "the ONNX worker imported transformers"
"""]
# A worker whose model loading prints, from Python and straight to file descriptor 1 as C code would.
CHATTY_WORKER = [sys.executable, "-c", """
import os
from compress.eval import worker
load_runner = worker.load_runner
def chatty_load_runner(*args):
    print("python chatter")
    os.write(1, b"C chatter\\n")
    return load_runner(*args)
worker.load_runner = chatty_load_runner
worker.main()
"""]
MEASURE = [
    {"op": "latency", "inputs": "fixed", "warmup": 1, "runs": 4},
    {"op": "latency", "inputs": "padded", "warmup": 0, "runs": 2},
    {"op": "latency", "inputs": "real", "warmup": 1, "runs": 3},
    {"op": "rss"},
    {"op": "metric", "batch_size": 3},
]


def converse(command: list[str], artifact_dir: Path, evalset, scratch: Path, requests: list[dict],
             target: str = "torch") -> list[dict]:
    """Sends a load and `requests` down the worker's stdin at once, then the end of input; returns its replies."""
    evalset.save(scratch / "evalset.npz")
    load = {"op": "load", "artifact_dir": str(artifact_dir), "evalset": str(scratch / "evalset.npz"), "threads": 1,
            "batch_size": 2, "seq_len": 16, "real_length_samples": 2, "target": target}
    stdin = "".join(json.dumps(request) + "\n" for request in [load, *requests])
    done = subprocess.run(command, input=stdin, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines()]


def check_measurements(replies: list[dict], metric_name: str) -> dict:
    fixed, padded, real, rss, metric = replies
    assert len(fixed["timings_ms"]) == 4 and len(padded["timings_ms"]) == 2
    assert len(real["timings_ms"]) == 4  # 3 runs rounded up to whole cycles through the 2 rows
    assert all(t > 0 for t in fixed["timings_ms"] + padded["timings_ms"] + real["timings_ms"])
    assert rss["peak_rss_mb"] > 10
    assert metric["name"] == metric_name
    return metric


@pytest.fixture(scope="module")
def torch_replies(bert_torch_artifact, classification_evalset, tmp_path_factory) -> list[dict]:
    return converse(WORKER, bert_torch_artifact, classification_evalset, tmp_path_factory.mktemp("worker-torch"),
                    [*MEASURE, {"op": "exit"}])


def test_torch_worker_answers_every_request(torch_replies, classification_evalset):
    load, *measurements = torch_replies
    assert load["runtime"]["name"] == "torch"
    assert load["runtime"]["threads"] == 1
    assert set(load["runtime"]) == {"name", "version", "device", "device_name", "autocast", "threads",
                                    "interop_threads"}
    metric = check_measurements(measurements, "accuracy")
    assert metric["rows"]["correct"] == [int(c) for c in np.asarray(metric["rows"]["correct"])]
    assert len(metric["rows"]["correct"]) == len(classification_evalset)
    assert metric["value"] == pytest.approx(np.mean(metric["rows"]["correct"]))


def test_onnx_worker_stays_free_of_torch_and_agrees(torch_replies, bert_onnx_artifact, classification_evalset,
                                                     tmp_path):
    load, *measurements = converse(NO_TORCH_WORKER, bert_onnx_artifact, classification_evalset, tmp_path, MEASURE)
    assert load["runtime"] == {"name": "onnxruntime", "version": load["runtime"]["version"],
                               "execution_provider": "CPUExecutionProvider", "intra_op_threads": 1,
                               "inter_op_threads": 1, "denormal_as_zero": True}
    metric = check_measurements(measurements, "accuracy")
    assert metric["rows"] == torch_replies[-1]["rows"]


def test_an_openvino_worker_measures_without_torch(torch_replies, bert_onnx_artifact, classification_evalset,
                                                  tmp_path):
    load, *measurements = converse(NO_TORCH_WORKER, bert_onnx_artifact, classification_evalset, tmp_path, MEASURE,
                                   target="openvino")
    assert load["runtime"]["name"] == "openvino" and load["runtime"]["precision"] == "f32"
    assert check_measurements(measurements, "accuracy")["rows"] == torch_replies[-1]["rows"]


def test_a_graph_the_runtime_cannot_read_is_a_reply_naming_the_ops(bert_int8_fused_artifact, classification_evalset,
                                                                   tmp_path):
    (load,) = converse(WORKER, bert_int8_fused_artifact, classification_evalset, tmp_path, [], target="openvino")
    assert load == {"error": "No conversion rule found for operations: com.microsoft.QAttention, "
                             "com.microsoft.QEmbedLayerNormalization"}


def test_onnx_lm_worker_reports_the_torch_perplexity_per_window(tiny_causal_lm, llama_onnx_dirs, lm_evalset,
                                                                tmp_path):
    model, tokenizer = tiny_causal_lm
    graph = llama_onnx_dirs["text-generation-with-past"] / "model.onnx"
    artifact = Artifact("causal-lm", model.config, tokenizer, onnx_path=graph, kind=Kind("onnx")).save(tmp_path / "a")
    _, *measurements = converse(WORKER, artifact, lm_evalset, tmp_path, MEASURE)
    metric = check_measurements(measurements, "perplexity")
    expected = evaluate(TorchRunner(model), lm_evalset, progress=False)
    assert metric["value"] == pytest.approx(expected.value, rel=1e-5)
    assert metric["rows"]["tokens"] == expected.rows["tokens"].tolist()
    np.testing.assert_allclose(metric["rows"]["nll"], expected.rows["nll"], rtol=1e-5)


def test_onnx_lm_worker_times_generation_with_the_cache_free_of_torch(llama_artifacts, lm_evalset, tmp_path):
    generate = {"op": "generate", "new_tokens": 3, "warmup": 1, "runs": 2}
    load, timings = converse(NO_TORCH_WORKER, llama_artifacts["onnx-kv"], lm_evalset, tmp_path, [generate])
    assert load["cannot_generate"] is None
    assert set(timings) == {"ttft_ms", "per_token_ms"}
    assert all(len(values) == 2 and min(values) > 0 for values in timings.values())


def test_a_graph_without_cache_says_so_and_refuses_to_generate(llama_artifacts, lm_evalset, tmp_path):
    lm_evalset.save(tmp_path / "evalset.npz")
    requests = [{"op": "load", "artifact_dir": str(llama_artifacts["onnx"]), "evalset": str(tmp_path / "evalset.npz"),
                 "threads": 1, "batch_size": 1, "seq_len": 4, "real_length_samples": 0},
                {"op": "generate", "new_tokens": 2, "warmup": 0, "runs": 1}]
    done = subprocess.run(WORKER, input="".join(json.dumps(r) + "\n" for r in requests), capture_output=True,
                          text=True, check=False)
    assert json.loads(done.stdout)["cannot_generate"] == "no KV cache in the graph"
    assert done.returncode != 0
    assert "cannot generate: no KV cache in the graph" in done.stderr


def test_chatter_on_stdout_goes_to_stderr_and_leaves_the_replies_intact(bert_onnx_artifact,
                                                                         classification_evalset, tmp_path):
    load, rss = converse(CHATTY_WORKER, bert_onnx_artifact, classification_evalset, tmp_path, [{"op": "rss"}])
    assert load["runtime"]["name"] == "onnxruntime"
    assert rss["peak_rss_mb"] > 10


def test_a_request_before_load_ends_the_worker_with_the_reason():
    done = subprocess.run(WORKER, input='{"op": "rss"}\n', capture_output=True, text=True, check=False)
    assert done.returncode != 0
    assert "'rss' before 'load'" in done.stderr
    assert done.stdout == ""
