from __future__ import annotations

from pathlib import Path

import onnx
import pytest

from compress.artifact import Artifact
from compress.errors import ExportMismatch, NothingToDo
from compress.export.onnx import export_onnx, fuse_for_onnxruntime
from compress.kinds import Kind
from compress.passes import ptq
from compress.recipe import PTQStep

LENIENT = {"max_metric_drop": 1.0, "min_agreement": 0.0}  # random tiny models: judge the mechanics only


def fp32_artifact(model, tokenizer, task: str, directory: Path) -> Artifact:
    graph = export_onnx(model, task, directory / "model.onnx", opset=17)
    fuse_for_onnxruntime(graph, model.config)
    return Artifact(task, model.config, tokenizer, onnx_path=graph, kind=Kind("onnx", runtime="onnxruntime"))


@pytest.fixture(scope="module")
def fp32_classifier(tiny_classifier, tmp_path_factory) -> Artifact:
    return fp32_artifact(*tiny_classifier, "sequence-classification", tmp_path_factory.mktemp("fp32"))


def test_ptq_makes_a_smaller_int8_graph_that_deploys_alone(fp32_classifier, classification_evalset, tmp_path,
                                                           make_context):
    from optimum.onnxruntime import ORTModelForSequenceClassification

    artifact, evalset = fp32_classifier, classification_evalset
    quantized = ptq.run(artifact, PTQStep(verify=LENIENT), make_context(tmp_path, evalset))

    assert quantized.onnx_path == tmp_path / "model.onnx" and quantized.model is None
    assert quantized.kind == Kind("onnx", "int8-dynamic", runtime="onnxruntime") and quantized.precision == "int8"
    ops = {node.op_type for node in onnx.load(str(quantized.onnx_path)).graph.node}
    assert {"DynamicQuantizeLinear", "MatMulInteger"} & ops
    effect = quantized.history[-1]["effect"]
    assert effect["bytes_after"] < effect["bytes_before"] == artifact.onnx_path.stat().st_size
    assert effect["metric"] == "accuracy" and effect["count"] == len(evalset)
    assert {"metric_before", "metric_after", "metric_drop", "agreement", "int8_ops"} <= set(effect)
    assert effect["int8_weights"] >= 12  # at least the 2 x 6 linear layers of the encoder

    saved = quantized.save(tmp_path / "stage")
    assert not (saved / "model.safetensors").exists()
    assert ORTModelForSequenceClassification.from_pretrained(saved)(**evalset.features).logits.shape == (8, 2)


def test_ptq_rejects_a_graph_that_changes_predictions(fp32_classifier, classification_evalset, tmp_path,
                                                      monkeypatch, make_context):
    quantize = ptq.quantize_dynamic_int8

    def quantize_then_negate_logits(src: Path, dst: Path, *args) -> dict:
        result = quantize(src, dst, *args)
        model = onnx.load(str(dst))
        producer = next(node for node in model.graph.node if "logits" in node.output)
        producer.output[list(producer.output).index("logits")] = "logits_before_negation"
        model.graph.node.append(onnx.helper.make_node("Neg", ["logits_before_negation"], ["logits"]))
        onnx.save(model, str(dst))
        return result

    monkeypatch.setattr(ptq, "quantize_dynamic_int8", quantize_then_negate_logits)
    step = PTQStep(verify={"max_metric_drop": 1.0, "min_agreement": 1.0})
    with pytest.raises(ExportMismatch, match=r"agreement 0.0000 < min_agreement 1"):
        ptq.run(fp32_classifier, step, make_context(tmp_path, classification_evalset))


def test_a_ptq_that_would_quantize_nothing_fails(fp32_classifier, classification_evalset, tmp_path, make_context):
    every_node = [node.name for node in onnx.load(str(fp32_classifier.onnx_path)).graph.node if node.name]
    step = PTQStep(keep_fp32=every_node, verify=LENIENT)
    with pytest.raises(NothingToDo, match=r"no weight was quantized \(keep_fp32 .* kept \d+ nodes in fp32\)"):
        ptq.run(fp32_classifier, step, make_context(tmp_path, classification_evalset))


def test_ptq_of_a_portable_graph_stays_portable(tiny_classifier, classification_evalset, tmp_path, make_context):
    model, tokenizer = tiny_classifier
    graph = export_onnx(model, "sequence-classification", tmp_path / "fp32" / "model.onnx", opset=17)
    portable = Artifact("sequence-classification", model.config, tokenizer, onnx_path=graph, kind=Kind("onnx"))
    quantized = ptq.run(portable, PTQStep(verify=LENIENT), make_context(tmp_path, classification_evalset))
    assert quantized.kind == Kind("onnx", "int8-dynamic", runtime="portable")
    assert {node.domain for node in onnx.load(str(quantized.onnx_path)).graph.node} <= {"", "ai.onnx"}


def test_ptq_of_a_causal_lm_is_judged_by_perplexity(tiny_causal_lm, lm_evalset, tmp_path, make_context):
    artifact = fp32_artifact(*tiny_causal_lm, "causal-lm", tmp_path / "fp32")
    effect = ptq.run(artifact, PTQStep(verify=LENIENT), make_context(tmp_path, lm_evalset)).history[-1]["effect"]
    assert effect["metric"] == "perplexity" and effect["count"] == int(lm_evalset.target_mask.sum())
    assert effect["metric_drop"] == pytest.approx(effect["metric_after"] / effect["metric_before"] - 1)
