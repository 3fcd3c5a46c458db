from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from compress.eval.runners import (
    NO_CACHE,
    OpenVinoRunner,
    OrtRunner,
    TorchRunner,
    greedy_tokens,
    load_runner,
    session_options,
)
from compress.eval.targets import TARGETS
from compress.settings import FloatTolerance

SST2_DEV = Path(__file__).resolve().parents[2] / "pipelines" / "data" / "sst2-dev.tsv"


@pytest.fixture(autouse=True)
def restore_torch_threads():
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_torch_and_onnx_classification_logits_agree(tiny_classifier, bert_onnx_artifact, classification_evalset):
    import torch

    model, _ = tiny_classifier
    features = classification_evalset.features
    torch_logits = TorchRunner(model, threads=1).logits(features)
    assert torch.get_num_threads() == 1
    onnx_logits = OrtRunner(bert_onnx_artifact / "model.onnx", threads=1).logits(features)
    assert torch_logits.dtype == onnx_logits.dtype == np.float32
    assert torch_logits.shape == (len(classification_evalset), 2)
    np.testing.assert_allclose(onnx_logits, torch_logits, atol=1e-4, rtol=0)


def test_torch_runner_passes_only_what_forward_accepts(tiny_causal_lm, lm_evalset):
    model, tokenizer = tiny_causal_lm
    features = dict(lm_evalset.features, token_type_ids=np.zeros_like(lm_evalset.features["input_ids"]))
    logits = TorchRunner(model).logits(features)
    assert logits.dtype == np.float32
    assert logits.shape == (*lm_evalset.features["input_ids"].shape, len(tokenizer))


@pytest.mark.parametrize("task", ["text-generation", "text-generation-with-past"])
def test_onnx_lm_derives_position_ids_and_matches_torch(tiny_causal_lm, llama_onnx_dirs, lm_evalset, task):
    model, _ = tiny_causal_lm
    runner = OrtRunner(llama_onnx_dirs[task] / "model.onnx")
    assert "position_ids" in {spec.name for spec in runner.inputs}
    assert "position_ids" not in lm_evalset.features
    onnx_logits = runner.logits(lm_evalset.features)
    torch_logits = TorchRunner(model).logits(lm_evalset.features)
    # Padding positions carry no meaning, so only real tokens are compared.
    real = lm_evalset.features["attention_mask"].astype(bool)
    np.testing.assert_allclose(onnx_logits[real], torch_logits[real], atol=1e-4, rtol=0)


def test_runners_say_why_they_cannot_generate(tiny_classifier, tiny_causal_lm, llama_onnx_dirs, lm_evalset):
    without_cache = OrtRunner(llama_onnx_dirs["text-generation"] / "model.onnx")
    assert without_cache.cannot_generate == NO_CACHE == "no KV cache in the graph"
    assert TorchRunner(tiny_classifier[0]).cannot_generate == "not a generative model"
    assert TorchRunner(tiny_causal_lm[0]).cannot_generate is None
    assert OrtRunner(llama_onnx_dirs["text-generation-with-past"] / "model.onnx").cannot_generate is None
    with pytest.raises(ValueError, match="cannot generate: no KV cache in the graph"):
        next(greedy_tokens(without_cache, lm_evalset.features["input_ids"][:1, :4], new_tokens=2))


def test_each_onnx_decode_step_grows_the_cache_by_one_position(llama_onnx_dirs, lm_evalset):
    runner = OrtRunner(llama_onnx_dirs["text-generation-with-past"] / "model.onnx")
    input_ids = lm_evalset.real_token_inputs(batch_size=2, seq_len=5)["input_ids"]
    tokens, cache = runner.prefill(input_ids)
    assert tokens.shape == (2,)
    assert sorted(cache) == [f"past_key_values.{layer}.{part}" for layer in (0, 1) for part in ("key", "value")]
    assert {value.shape for value in cache.values()} == {(2, 2, 5, 8)}  # [batch, kv heads, positions, head dim]
    tokens, cache = runner.decode(tokens, cache)
    assert {value.shape for value in cache.values()} == {(2, 2, 6, 8)}


def test_onnx_runner_names_a_missing_input(bert_onnx_artifact, classification_evalset):
    features = {k: v for k, v in classification_evalset.features.items() if k != "token_type_ids"}
    with pytest.raises(KeyError, match="token_type_ids"):
        OrtRunner(bert_onnx_artifact / "model.onnx").logits(features)


def test_load_runner_follows_the_manifest(bert_torch_artifact, bert_onnx_artifact, classification_evalset):
    torch_runner = load_runner(bert_torch_artifact, threads=1)
    onnx_runner = load_runner(bert_onnx_artifact, threads=1)
    assert (torch_runner.format, onnx_runner.format) == ("torch", "onnx")
    features = classification_evalset.features
    np.testing.assert_allclose(onnx_runner.logits(features), torch_runner.logits(features), atol=1e-4, rtol=0)


def test_load_runner_rebuilds_a_quantized_torch_model(tiny_classifier, classification_evalset, tmp_path):
    import copy

    from compress.algos.fake_quant import quantize_linears
    from compress.artifact import Artifact
    from compress.kinds import Kind

    model, tokenizer = tiny_classifier
    quantized = copy.deepcopy(model).eval()
    quantize_linears(quantized, ["classifier", "bert.pooler.dense"], ranges={"classifier": (-5.0, 5.0),
                                                                            "bert.pooler.dense": (-5.0, 5.0)})
    saved = Artifact("sequence-classification", model.config, tokenizer, model=quantized,
                     kind=Kind(weights="fake-quant")).save(tmp_path / "fake-quant")
    features = classification_evalset.features
    expected = TorchRunner(quantized).logits(features)
    assert not np.allclose(expected, TorchRunner(model).logits(features), atol=1e-6)  # quantization shows
    np.testing.assert_array_equal(load_runner(saved, threads=1).logits(features), expected)


def test_every_session_flushes_denormals_and_runs_sequentially_with_the_given_threads():
    import onnxruntime as ort

    options = session_options(threads=3)
    assert (options.intra_op_num_threads, options.inter_op_num_threads) == (3, 1)
    assert options.execution_mode == ort.ExecutionMode.ORT_SEQUENTIAL
    assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    assert options.get_session_config_entry("session.set_denormal_as_zero") == "1"


def test_runners_report_their_runtime_settings(tiny_classifier, bert_onnx_artifact):
    import onnxruntime as ort
    import torch

    onnx_runtime = OrtRunner(bert_onnx_artifact / "model.onnx", threads=1).runtime()
    assert onnx_runtime == {"name": "onnxruntime", "version": ort.__version__,
                            "execution_provider": "CPUExecutionProvider", "intra_op_threads": 1,
                            "inter_op_threads": 1, "denormal_as_zero": True}
    assert OrtRunner(bert_onnx_artifact / "model.onnx", denormal_as_zero=False).runtime()["denormal_as_zero"] is False
    torch_runtime = TorchRunner(tiny_classifier[0], threads=1).runtime()
    assert torch_runtime == {"name": "torch", "version": torch.__version__, "device": "cpu", "device_name": None,
                             "autocast": None, "threads": 1, "interop_threads": torch.get_num_interop_threads()}
    assert TorchRunner(tiny_classifier[0], autocast="bf16").runtime()["autocast"] == "bf16"


def test_openvino_reports_what_it_applied_not_what_was_asked(bert_onnx_artifact):
    import openvino as ov

    runtime = OpenVinoRunner(bert_onnx_artifact / "model.onnx", threads=1, precision="fp32").runtime()
    assert runtime == {"name": "openvino", "version": ov.__version__, "device": "CPU", "precision": "f32",
                       "threads": 1, "streams": 1, "performance_hint": "LATENCY", "denormals_as_zero": True}


def test_openvino_f32_matches_onnx_runtime_on_a_classifier(bert_onnx_artifact, classification_evalset):
    features = classification_evalset.features
    expected = OrtRunner(bert_onnx_artifact / "model.onnx", threads=1).logits(features)
    logits = OpenVinoRunner(bert_onnx_artifact / "model.onnx", threads=1, precision="fp32").logits(features)
    assert logits.dtype == np.float32
    np.testing.assert_allclose(logits, expected, atol=1e-4, rtol=0)


@pytest.mark.skipif(TARGETS["openvino-bf16"].unavailable() is not None, reason="this CPU has no bf16 units")
def test_a_bf16_hint_changes_the_numbers_which_is_why_it_is_its_own_row(bert_onnx_artifact, classification_evalset):
    features = classification_evalset.features
    f32 = OpenVinoRunner(bert_onnx_artifact / "model.onnx", threads=1, precision="fp32")
    bf16 = OpenVinoRunner(bert_onnx_artifact / "model.onnx", threads=1, precision="bf16")
    assert bf16.runtime()["precision"] == "bf16"
    difference = np.abs(bf16.logits(features) - f32.logits(features)).max()
    assert 1e-6 < difference < 0.1  # bf16 keeps 8 bits of mantissa: different, but close


def test_openvino_generates_the_same_tokens_with_the_cache(llama_onnx_dirs, lm_evalset):
    graph = llama_onnx_dirs["text-generation-with-past"] / "model.onnx"
    input_ids = lm_evalset.real_token_inputs(batch_size=2, seq_len=5)["input_ids"]
    expected = [tokens.tolist() for tokens in greedy_tokens(OrtRunner(graph), input_ids, 4)]
    assert [tokens.tolist() for tokens in greedy_tokens(OpenVinoRunner(graph), input_ids, 4)] == expected


def test_a_torch_runner_under_bf16_autocast_stays_close_to_fp32(tiny_classifier, classification_evalset):
    model, _ = tiny_classifier
    features = classification_evalset.features
    fp32 = TorchRunner(model).logits(features)
    bf16 = TorchRunner(model, autocast="bf16").logits(features)
    assert bf16.dtype == np.float32
    assert 0 < np.abs(bf16 - fp32).max() < 0.1


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("precision", ["as-stored", "bf16", "fp16"])
def test_torch_on_cuda_runs_each_precision_close_to_the_cpu(tiny_classifier, classification_evalset, precision):
    import copy

    model, _ = tiny_classifier
    features = classification_evalset.features
    expected = TorchRunner(model).logits(features)
    on_gpu = TorchRunner(copy.deepcopy(model).to("cuda"), autocast=None if precision == "as-stored" else precision)
    assert on_gpu.runtime()["device"].startswith("cuda")
    np.testing.assert_allclose(on_gpu.logits(features), expected, atol=0.1 if on_gpu.autocast else 1e-3, rtol=0)


# ORT sets denormals-as-zero on the calling thread for the first session of a process only, so each setting
# is measured in a process of its own.
FRESH_PROCESS_LOGITS = """
import sys
import numpy as np
from compress.eval.runners import OrtRunner
graph, features, out, flush = sys.argv[1:]
np.save(out, OrtRunner(graph, threads=1, denormal_as_zero=flush == "1").logits(dict(np.load(features))))
"""


def logits_in_fresh_process(graph: Path, features: dict[str, np.ndarray], denormal_as_zero: bool,
                            scratch: Path) -> np.ndarray:
    np.savez(scratch / "features.npz", **features)
    out = scratch / f"logits-{int(denormal_as_zero)}.npy"
    subprocess.run([sys.executable, "-c", FRESH_PROCESS_LOGITS, str(graph), str(scratch / "features.npz"), str(out),
                    str(int(denormal_as_zero))], check=True)
    return np.load(out)


def assert_flushing_denormals_stays_within_export_tolerance(graph: Path, features: dict[str, np.ndarray],
                                                            scratch: Path) -> None:
    flushed = logits_in_fresh_process(graph, features, True, scratch)
    kept = logits_in_fresh_process(graph, features, False, scratch)
    tolerance = FloatTolerance()
    # |flushed - kept| <= atol + rtol * |kept|, the check an export must pass
    np.testing.assert_allclose(flushed, kept, atol=tolerance.atol, rtol=tolerance.rtol)


def test_flushing_denormals_keeps_tiny_classifier_logits(bert_onnx_artifact, classification_evalset, tmp_path):
    assert_flushing_denormals_stays_within_export_tolerance(bert_onnx_artifact / "model.onnx",
                                                            classification_evalset.features, tmp_path)


def test_flushing_denormals_keeps_tiny_llama_logits(llama_onnx_dirs, lm_evalset, tmp_path):
    assert_flushing_denormals_stays_within_export_tolerance(llama_onnx_dirs["text-generation"] / "model.onnx",
                                                            lm_evalset.features, tmp_path)


@pytest.mark.slow
def test_flushing_denormals_keeps_minilm_logits_on_padded_sentences(tmp_path):
    from compress import models
    from compress.export.onnx import export_onnx

    loaded = models.load("minilm-l6", "sequence-classification", ["negative", "positive"])
    graph = export_onnx(loaded.model, "sequence-classification", tmp_path / "model.onnx", opset=17)
    with open(SST2_DEV) as rows:
        sentences = [row["sentence"] for row in csv.DictReader(rows, delimiter="\t")][:16]
    tokens = loaded.tokenizer(sentences, padding="max_length", max_length=128, truncation=True, return_tensors="np")
    features = {name: values.astype(np.int64) for name, values in tokens.items()}
    assert (features["attention_mask"] == 0).any(), "the point is padded rows"
    assert_flushing_denormals_stays_within_export_tolerance(graph, features, tmp_path)
