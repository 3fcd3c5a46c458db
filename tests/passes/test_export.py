from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from compress.artifact import Artifact
from compress.context import Context
from compress.errors import ExportMismatch
from compress.eval.runners import OrtRunner
from compress.evalset import EvalSet
from compress.passes import export
from compress.recipe import Recipe


def context(task: str, stage_dir: Path, evalset: EvalSet, **export_step) -> Context:
    recipe = Recipe.model_validate({"model": "tiny", "task": task, "data": {"eval": {"path": "unused.tsv"}},
                                    "steps": [{"kind": "export", **export_step}]})
    return Context(recipe=recipe, stage_dir=stage_dir, make_eval_set=lambda tokenizer: evalset, quiet=True)


@pytest.fixture(scope="module")
def torch_classifier(tiny_classifier) -> Artifact:
    model, tokenizer = tiny_classifier
    return Artifact("sequence-classification", model.config, tokenizer, model, source="tiny")


def test_export_verifies_the_graph_and_keeps_the_torch_model(torch_classifier, classification_evalset, tmp_path):
    from optimum.onnxruntime import ORTModelForSequenceClassification

    artifact, evalset = torch_classifier, classification_evalset
    ctx = context("sequence-classification", tmp_path, evalset)
    exported = export.run(artifact, ctx.recipe.steps[0], ctx)

    assert exported.onnx_path == tmp_path / "model.onnx" and exported.model is artifact.model
    assert exported.precision == "fp32" and exported.format == "onnx"
    effect = exported.history[-1]["effect"]
    assert effect["rows"] == len(evalset) and effect["max_abs_diff"] < 1e-4
    assert effect["onnx_bytes"] == exported.onnx_path.stat().st_size
    assert effect["fusions"]["Attention"] == 2 and effect["seconds"] > 0

    exported.save(tmp_path)
    assert {"model.safetensors", "model.onnx"} <= {p.name for p in tmp_path.iterdir()}
    assert [p.name for p in tmp_path.rglob("*.onnx*")] == ["model.onnx"]
    loaded = ORTModelForSequenceClassification.from_pretrained(tmp_path)
    np.testing.assert_allclose(loaded(**evalset.features).logits, OrtRunner(exported.onnx_path).logits(evalset.features),
                               atol=1e-6)


def test_export_of_a_causal_lm_loads_in_optimum_without_cache(tiny_causal_lm, lm_evalset, tmp_path):
    import torch
    from optimum.onnxruntime import ORTModelForCausalLM

    model, tokenizer = tiny_causal_lm
    features = lm_evalset.features
    ctx = context("causal-lm", tmp_path, lm_evalset, verify={"samples": 4})
    exported = export.run(Artifact("causal-lm", model.config, tokenizer, model), ctx.recipe.steps[0], ctx)
    assert exported.history[-1]["effect"]["rows"] == 4
    assert "SimplifiedLayerNormalization" in exported.history[-1]["effect"]["fusions"]

    exported.save(tmp_path)
    loaded = ORTModelForCausalLM.from_pretrained(tmp_path, use_cache=False)
    generated = loaded.generate(torch.from_numpy(features["input_ids"][:1, :3]), max_new_tokens=2, do_sample=False)
    assert generated.shape == (1, 5)


def test_a_graph_that_drifts_from_torch_fails_the_export(torch_classifier, classification_evalset, tmp_path,
                                                         monkeypatch):
    def optimize_then_damage(path: Path, config) -> dict[str, int]:
        model = onnx.load(str(path))
        for weight in model.graph.initializer:
            if len(weight.dims) == 2 and weight.data_type == onnx.TensorProto.FLOAT:
                weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight) * 1.1, weight.name))
        onnx.save(model, str(path))
        return {}

    monkeypatch.setattr(export, "optimize_onnx", optimize_then_damage)
    artifact, evalset = torch_classifier, classification_evalset
    ctx = context("sequence-classification", tmp_path, evalset)
    with pytest.raises(ExportMismatch, match=r"logits of eval rows 0-3: .*allowed \(atol 0.0001 \+ rtol 0.001"):
        export.run(artifact, ctx.recipe.steps[0], ctx)
