from __future__ import annotations

from pathlib import Path

import onnx
import pytest

from compress.artifact import Artifact
from compress.context import Context
from compress.errors import ExportMismatch
from compress.evalset import EvalSet
from compress.export.onnx import export_onnx, optimize_onnx
from compress.passes import ptq
from compress.recipe import Recipe

LENIENT = {"max_metric_drop": 1.0, "min_agreement": 0.0}  # random tiny models: judge the mechanics only


def context(task: str, stage_dir: Path, evalset: EvalSet, **verify) -> Context:
    recipe = Recipe.model_validate({"model": "tiny", "task": task, "data": {"eval": {"path": "unused.tsv"}},
                                    "steps": [{"kind": "export"}, {"kind": "ptq", "verify": verify}]})
    return Context(recipe=recipe, stage_dir=stage_dir, make_eval_set=lambda tokenizer: evalset, quiet=True)


def fp32_artifact(model, tokenizer, task: str, directory: Path) -> Artifact:
    graph = export_onnx(model, task, directory / "model.onnx", opset=17)
    optimize_onnx(graph, model.config)
    return Artifact(task, model.config, tokenizer, model, onnx_path=graph, source="tiny")


@pytest.fixture(scope="module")
def fp32_classifier(tiny_classifier, tmp_path_factory) -> Artifact:
    return fp32_artifact(*tiny_classifier, "sequence-classification", tmp_path_factory.mktemp("fp32"))


def test_ptq_makes_a_smaller_int8_graph_that_deploys_alone(fp32_classifier, classification_evalset, tmp_path):
    from optimum.onnxruntime import ORTModelForSequenceClassification

    artifact, evalset = fp32_classifier, classification_evalset
    ctx = context("sequence-classification", tmp_path, evalset, **LENIENT)
    quantized = ptq.run(artifact, ctx.recipe.steps[1], ctx)

    assert quantized.onnx_path == tmp_path / "model.onnx" and quantized.model is None
    assert quantized.precision == "int8"
    ops = {node.op_type for node in onnx.load(str(quantized.onnx_path)).graph.node}
    assert {"DynamicQuantizeLinear", "MatMulInteger"} & ops
    effect = quantized.history[-1]["effect"]
    assert effect["bytes_after"] < effect["bytes_before"] == artifact.onnx_path.stat().st_size
    assert effect["metric"] == "accuracy" and effect["count"] == len(evalset)
    assert {"metric_before", "metric_after", "metric_drop", "agreement", "int8_ops"} <= set(effect)

    quantized.save(tmp_path)
    assert not (tmp_path / "model.safetensors").exists()
    assert ORTModelForSequenceClassification.from_pretrained(tmp_path)(**evalset.features).logits.shape == (8, 2)


def test_ptq_rejects_a_graph_that_changes_predictions(fp32_classifier, classification_evalset, tmp_path,
                                                      monkeypatch):
    quantize = ptq.quantize_dynamic_int8

    def quantize_then_negate_logits(src: Path, dst: Path, per_channel: bool, reduce_range: bool,
                                    keep_fp32: list[str] = ()) -> dict:
        result = quantize(src, dst, per_channel, reduce_range, keep_fp32)
        model = onnx.load(str(dst))
        producer = next(node for node in model.graph.node if "logits" in node.output)
        producer.output[list(producer.output).index("logits")] = "logits_before_negation"
        model.graph.node.append(onnx.helper.make_node("Neg", ["logits_before_negation"], ["logits"]))
        onnx.save(model, str(dst))
        return result

    monkeypatch.setattr(ptq, "quantize_dynamic_int8", quantize_then_negate_logits)
    artifact, evalset = fp32_classifier, classification_evalset
    ctx = context("sequence-classification", tmp_path, evalset, max_metric_drop=1.0, min_agreement=1.0)
    with pytest.raises(ExportMismatch, match=r"agreement 0.0000 < min_agreement 1"):
        ptq.run(artifact, ctx.recipe.steps[1], ctx)


def test_ptq_of_a_causal_lm_is_judged_by_perplexity(tiny_causal_lm, lm_evalset, tmp_path):
    artifact = fp32_artifact(*tiny_causal_lm, "causal-lm", tmp_path / "fp32")
    ctx = context("causal-lm", tmp_path, lm_evalset, **LENIENT)
    effect = ptq.run(artifact, ctx.recipe.steps[1], ctx).history[-1]["effect"]
    assert effect["metric"] == "perplexity" and effect["count"] == int(lm_evalset.target_mask.sum())
    assert effect["metric_drop"] == pytest.approx(effect["metric_after"] / effect["metric_before"] - 1)
