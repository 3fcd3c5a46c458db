from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from compress.artifact import Artifact
from compress.errors import ExportMismatch
from compress.eval.runners import OrtRunner
from compress.kinds import Kind
from compress.passes import export
from compress.recipe import ExportStep


@pytest.fixture(scope="module")
def torch_classifier(tiny_classifier) -> Artifact:
    model, tokenizer = tiny_classifier
    return Artifact("sequence-classification", model.config, tokenizer, model, source="tiny")


def test_export_writes_a_portable_verified_graph(torch_classifier, classification_evalset, tmp_path, make_context):
    from optimum.onnxruntime import ORTModelForSequenceClassification

    artifact, evalset = torch_classifier, classification_evalset
    exported = export.run(artifact, ExportStep(), make_context(tmp_path, evalset))

    assert exported.onnx_path == tmp_path / "model.onnx" and exported.model is None
    assert exported.kind == Kind("onnx", "fp32", runtime="portable")
    assert {node.domain for node in onnx.load(str(exported.onnx_path)).graph.node} <= {"", "ai.onnx"}
    effect = exported.history[-1]["effect"]
    assert effect["rows"] == len(evalset) and effect["max_abs_diff"] < 1e-4
    assert effect["onnx_bytes"] == exported.onnx_path.stat().st_size and effect["seconds"] > 0

    saved = exported.save(tmp_path / "stage")
    assert not (saved / "model.safetensors").exists()
    loaded = ORTModelForSequenceClassification.from_pretrained(saved)
    np.testing.assert_allclose(loaded(**evalset.features).logits, OrtRunner(saved / "model.onnx").logits(evalset.features),
                               atol=1e-6)


def test_export_of_a_causal_lm_loads_in_optimum_without_cache(tiny_causal_lm, lm_evalset, tmp_path, make_context):
    import torch
    from optimum.onnxruntime import ORTModelForCausalLM

    model, tokenizer = tiny_causal_lm
    exported = export.run(Artifact("causal-lm", model.config, tokenizer, model), ExportStep(verify={"samples": 4}),
                          make_context(tmp_path, lm_evalset))
    assert exported.history[-1]["effect"]["rows"] == 4 and exported.kind.runtime == "portable"

    saved = exported.save(tmp_path / "stage")
    loaded = ORTModelForCausalLM.from_pretrained(saved, use_cache=False)
    prompt = torch.from_numpy(lm_evalset.features["input_ids"][:1, :3])
    assert loaded.generate(prompt, max_new_tokens=2, do_sample=False).shape == (1, 5)


def test_a_graph_that_drifts_from_torch_fails_the_export(torch_classifier, classification_evalset, tmp_path,
                                                         monkeypatch, make_context):
    real_export = export.export_onnx

    def export_then_damage(model, task, path: Path, opset: int, kv_cache: bool) -> Path:
        graph = real_export(model, task, path, opset, kv_cache=kv_cache)
        damaged = onnx.load(str(graph))
        for weight in damaged.graph.initializer:
            if len(weight.dims) == 2 and weight.data_type == onnx.TensorProto.FLOAT:
                weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight) * 1.1, weight.name))
        onnx.save(damaged, str(graph))
        return graph

    monkeypatch.setattr(export, "export_onnx", export_then_damage)
    with pytest.raises(ExportMismatch, match=r"logits of eval rows 0-3: .*allowed \(atol 0.0001 \+ rtol 0.001"):
        export.run(torch_classifier, ExportStep(), make_context(tmp_path, classification_evalset))
