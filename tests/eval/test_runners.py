from __future__ import annotations

import numpy as np
import pytest

from compress.eval.runners import OrtRunner, TorchRunner, load_runner


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
