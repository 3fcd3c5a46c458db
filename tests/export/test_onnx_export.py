from __future__ import annotations

import numpy as np
import onnx

from compress.eval.runners import OrtRunner, TorchRunner
from compress.export.onnx import export_onnx
from compress.export.verify import verify_float
from compress.recipe import FloatTolerance


def real_tokens(logits: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
    return np.where(attention_mask[..., None].astype(bool), logits, 0.0)


def test_export_writes_only_the_graph(tiny_classifier, tmp_path):
    model, _ = tiny_classifier
    target = tmp_path / "model.onnx"
    assert export_onnx(model, "sequence-classification", target, opset=17) == target
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]


def test_fused_classifier_matches_torch(tiny_classifier, classifier_onnx_dir, classification_evalset):
    model, _ = tiny_classifier
    features = classification_evalset.features
    graph = classifier_onnx_dir / "model.onnx"
    checked = verify_float(TorchRunner(model).logits(features), OrtRunner(graph).logits(features), FloatTolerance())
    assert checked["rows"] == len(features["input_ids"]) and checked["max_abs_diff"] < 1e-4
    ops = {node.op_type for node in onnx.load(str(graph)).graph.node}
    assert {"Attention", "SkipLayerNormalization"} <= ops


def test_fused_causal_lm_matches_torch_on_real_tokens(tiny_causal_lm, llama_onnx_dir, lm_evalset):
    model, _ = tiny_causal_lm
    features = lm_evalset.features
    reference = TorchRunner(model).logits(features)
    candidate = OrtRunner(llama_onnx_dir / "model.onnx").logits(features)
    mask = features["attention_mask"]
    assert verify_float(real_tokens(reference, mask), real_tokens(candidate, mask), FloatTolerance())


def test_optimum_loads_the_exported_classifier(classifier_onnx_dir, classification_evalset):
    from optimum.onnxruntime import ORTModelForSequenceClassification

    features = classification_evalset.features
    loaded = ORTModelForSequenceClassification.from_pretrained(classifier_onnx_dir)
    theirs = loaded(**features).logits
    np.testing.assert_allclose(theirs, OrtRunner(classifier_onnx_dir / "model.onnx").logits(features), atol=1e-6)


def test_optimum_loads_the_exported_causal_lm_without_cache(tiny_causal_lm, llama_onnx_dir, lm_evalset):
    import torch
    from optimum.onnxruntime import ORTModelForCausalLM

    model, _ = tiny_causal_lm
    assert model.config.use_cache, "the export must leave the torch model's config as it was"
    features = lm_evalset.features
    loaded = ORTModelForCausalLM.from_pretrained(llama_onnx_dir, use_cache=False)  # no past key/value inputs
    theirs = loaded(**{k: torch.from_numpy(v) for k, v in features.items()}).logits.numpy()
    ours = OrtRunner(llama_onnx_dir / "model.onnx").logits(features)
    mask = features["attention_mask"]
    np.testing.assert_allclose(real_tokens(theirs, mask), real_tokens(ours, mask), atol=1e-6)
