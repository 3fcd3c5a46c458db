from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from compress.artifact import Artifact
from compress.eval.metrics import evaluate
from compress.eval.runners import TorchRunner

# Runs the worker as `python -m` would, then fails if that pulled in torch.
NO_TORCH_LAUNCHER = """
import runpy, sys
sys.argv = ["worker", *sys.argv[1:]]
runpy.run_module("compress.eval.worker", run_name="__main__")
assert "torch" not in sys.modules, "the ONNX worker imported torch"
assert "transformers" not in sys.modules, "the ONNX worker imported transformers"
"""


def write_request(tmp_path: Path, artifact_dir: Path, evalset, real_length_samples: int) -> tuple[Path, Path]:
    evalset_path = tmp_path / "evalset.npz"
    evalset.save(evalset_path)
    request = {
        "artifact_dir": str(artifact_dir), "evalset": str(evalset_path), "threads": 1, "batch_size": 2,
        "seq_len": 16, "warmup": 1, "runs": 10, "real_length_samples": real_length_samples, "metric_batch_size": 3,
    }
    request_path = tmp_path / "request.json"
    request_path.write_text(json.dumps(request))
    return request_path, tmp_path / "result.json"


def check_contract(result: dict) -> None:
    assert set(result) == {"metric", "latency_ms", "latency_real_ms", "peak_rss_mb"}
    assert result["latency_ms"]["p50"] <= result["latency_ms"]["p90"]
    assert result["peak_rss_mb"] > 10


@pytest.fixture(scope="module")
def torch_result(bert_torch_artifact, classification_evalset, tmp_path_factory) -> dict:
    request, result = write_request(tmp_path_factory.mktemp("worker-torch"), bert_torch_artifact,
                                    classification_evalset, real_length_samples=3)
    subprocess.run([sys.executable, "-m", "compress.eval.worker", str(request), str(result)], check=True)
    return json.loads(result.read_text())


def test_torch_worker_writes_the_contract(torch_result):
    check_contract(torch_result)
    assert torch_result["metric"]["name"] == "accuracy"
    assert 0.0 <= torch_result["metric"]["value"] <= 1.0
    assert set(torch_result["latency_real_ms"]) == {"p50", "p90", "mean"}


def test_onnx_worker_stays_free_of_torch_and_agrees(torch_result, bert_onnx_artifact, classification_evalset,
                                                     tmp_path):
    request, result = write_request(tmp_path, bert_onnx_artifact, classification_evalset, real_length_samples=0)
    done = subprocess.run([sys.executable, "-c", NO_TORCH_LAUNCHER, str(request), str(result)],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    onnx_result = json.loads(result.read_text())
    check_contract(onnx_result)
    assert onnx_result["latency_real_ms"] is None
    assert onnx_result["metric"]["value"] == pytest.approx(torch_result["metric"]["value"])


def test_onnx_lm_worker_reports_the_torch_perplexity(tiny_causal_lm, llama_onnx_dirs, lm_evalset, tmp_path):
    model, tokenizer = tiny_causal_lm
    graph = llama_onnx_dirs["text-generation-with-past"] / "model.onnx"
    artifact = Artifact("causal-lm", model.config, tokenizer, onnx_path=graph).save(tmp_path / "artifact")
    request, result = write_request(tmp_path, artifact, lm_evalset, real_length_samples=2)
    subprocess.run([sys.executable, "-m", "compress.eval.worker", str(request), str(result)], check=True)
    onnx_result = json.loads(result.read_text())
    check_contract(onnx_result)
    expected = evaluate(TorchRunner(model), lm_evalset, progress=False)
    assert onnx_result["metric"] == {"name": "perplexity", "value": pytest.approx(expected.value, rel=1e-5)}
