from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import onnx
import pytest
from datasets import Features, Value

from compress.artifact import Artifact
from compress.context import Context
from compress.data import TaskData
from compress.errors import DataError, ExportMismatch, NothingToDo
from compress.evalset import EvalSet
from compress.export.onnx import export_onnx
from compress.kinds import Kind
from compress.passes import ptq
from compress.recipe import PTQStep
from compress.sysinfo import has_vnni, machine_info

TEXT = Features({"text": Value("string")})
LENIENT = {"max_metric_drop": 1.0, "min_agreement": 0.0}  # random tiny models: judge the mechanics only


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
    assert effect["quantized_weights"] >= 12  # at least the 2 x 6 linear layers of the encoder

    saved = quantized.save(tmp_path / "stage")
    assert not (saved / "model.safetensors").exists()
    assert ORTModelForSequenceClassification.from_pretrained(saved)(**evalset.features).logits.shape == (8, 2)


def test_ptq_rejects_a_graph_that_changes_predictions(fp32_classifier, classification_evalset, tmp_path,
                                                      monkeypatch, make_context):
    quantize = ptq.quantize_dynamic_int8

    def quantize_then_negate_logits(src: Path, dst: Path, *args, **kwargs) -> dict:
        result = quantize(src, dst, *args, **kwargs)
        model = onnx.load(str(dst))
        producer = next(node for node in model.graph.node if "logits" in node.output)
        producer.output[list(producer.output).index("logits")] = "logits_before_negation"
        model.graph.node.append(onnx.helper.make_node("Neg", ["logits_before_negation"], ["logits"]))
        onnx.save(model, str(dst))
        return result

    monkeypatch.setattr(ptq, "quantize_dynamic_int8", quantize_then_negate_logits)
    step = PTQStep(verify={"max_metric_drop": 1.0, "min_agreement": 1.0})
    # The divergence finder names where the graphs part: the logits the extra node negated.
    with pytest.raises(ExportMismatch, match=r"agreement 0.0000 < min_agreement 1; first value off by more than the "
                                             r"quantization tolerance: logits \(node "):
        ptq.run(fp32_classifier, step, make_context(tmp_path, classification_evalset))


def test_a_ptq_that_would_quantize_nothing_fails(fp32_classifier, classification_evalset, tmp_path, make_context):
    every_node = [node.name for node in onnx.load(str(fp32_classifier.onnx_path)).graph.node if node.name]
    step = PTQStep(keep_fp32=every_node, verify=LENIENT)
    with pytest.raises(NothingToDo, match=r"no weight was quantized \(keep_fp32 .* kept \d+ nodes in float\)"):
        ptq.run(fp32_classifier, step, make_context(tmp_path, classification_evalset))


def test_ptq_of_a_portable_graph_stays_portable(tiny_classifier, classification_evalset, tmp_path, make_context):
    model, tokenizer = tiny_classifier
    graph = export_onnx(model, "sequence-classification", tmp_path / "fp32" / "model.onnx", opset=17)
    portable = Artifact("sequence-classification", model.config, tokenizer, onnx_path=graph, kind=Kind("onnx"))
    quantized = ptq.run(portable, PTQStep(verify=LENIENT), make_context(tmp_path, classification_evalset))
    assert quantized.kind == Kind("onnx", "int8-dynamic", runtime="portable")
    assert {node.domain for node in onnx.load(str(quantized.onnx_path)).graph.node} <= {"", "ai.onnx"}


def test_ptq_of_a_causal_lm_is_judged_by_perplexity(fp32_lm, lm_evalset, tmp_path, make_context):
    effect = ptq.run(fp32_lm, PTQStep(verify=LENIENT), make_context(tmp_path, lm_evalset)).history[-1]["effect"]
    assert effect["metric"] == "perplexity" and effect["count"] == int(lm_evalset.target_mask.sum())
    assert effect["metric_drop"] == pytest.approx(effect["metric_after"] / effect["metric_before"] - 1)


def calibrating_context(stage_dir: Path, evalset: EvalSet, calib_texts: list[str]) -> Context:
    """Every split is `evalset`; calibration rows come from `calib_texts` (the training table)."""
    from datasets import Dataset

    stage_dir.mkdir(exist_ok=True)
    data = TaskData(evalset.task, train=Dataset.from_dict({"text": calib_texts}, features=TEXT), eval=None,
                    label_names=None, fingerprint="test")
    return Context(stage_dir=stage_dir, task=evalset.task, data=data, quiet=True,
                   make_eval_set=lambda tokenizer, split: evalset)


def portable_artifact(model, tokenizer, task: str, directory: Path) -> Artifact:
    graph = export_onnx(model, task, directory / "model.onnx", opset=17)
    return Artifact(task, model.config, tokenizer, onnx_path=graph, kind=Kind("onnx"))


@pytest.fixture(scope="module")
def sabotaged(tiny_classifier, sentiment_files, tmp_path_factory) -> tuple[Artifact, EvalSet, list[str]]:
    """The tiny classifier, trained a little on the sentiment rows (a random one's outputs differ between rows by
    less than int8 noise), then given one channel of the pooler's input 1e4 times larger, which its weights
    compensate so the float model computes the same: a per-tensor int8 range over that input rounds every other
    channel to zero. Labels are the float model's own predictions, so the float graph scores 1.0."""
    import torch

    model, tokenizer = copy.deepcopy(tiny_classifier[0]), tiny_classifier[1]
    rows = [line.split("\t") for line in sentiment_files["train"].read_text().splitlines()[1:]]
    texts = [text for text, _ in rows]
    features = {k: v.astype(np.int64) for k, v in tokenizer(texts, padding=True, return_tensors="np").items()}
    inputs = {k: torch.from_numpy(v) for k, v in features.items()}
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    targets = torch.tensor([label == "positive" for _, label in rows]).long()
    model.train()
    for _ in range(30):
        optimizer.zero_grad()
        model(**inputs, labels=targets).loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        norm = model.bert.encoder.layer[-1].output.LayerNorm
        norm.weight[0] *= 1e4
        norm.bias[0] *= 1e4
        model.bert.pooler.dense.weight[:, 0] /= 1e4
        labels = model(**inputs).logits.argmax(-1).numpy()
    evalset = EvalSet("sequence-classification", features, tokenizer.pad_token_id, labels)
    artifact = portable_artifact(model, tokenizer, "sequence-classification", tmp_path_factory.mktemp("sabotaged"))
    return artifact, evalset, texts


POOLER = "/bert/pooler/dense/Gemm"


def test_static_ptq_calibrates_on_what_there_is_and_records_its_choices(tiny_classifier, classification_evalset,
                                                                        text_file, tmp_path, caplog):
    artifact = portable_artifact(*tiny_classifier, "sequence-classification", tmp_path / "fp32")
    ctx = calibrating_context(tmp_path, classification_evalset, text_file.read_text().splitlines()[:8])
    quantized = ptq.run(artifact, PTQStep(mode="static", verify=LENIENT), ctx)

    assert quantized.kind == Kind("onnx", "int8-qdq", runtime="portable")
    effect = quantized.history[-1]["effect"]
    assert effect["calibration"] == {"method": "minmax", "rows": 8}
    assert "ptq static: 256 calibration rows asked for, 8 available; using them all" in caplog.text
    assert effect["auto"] == ["weight_type", "activation_type", "reduce_range"]
    assert effect["weight_type"] == "int8" and effect["activation_type"] == "uint8"  # an x86 CPU
    assert effect["reduce_range"] is not has_vnni() and effect["chosen_for"] == machine_info()["isa"]
    assert effect["quantized_weights"] == 17 and effect["bytes_after"] < effect["bytes_before"]
    assert "sensitivity" not in effect and "fallback" not in effect


def test_static_ptq_without_calibration_rows_names_data_calib(tiny_classifier, classification_evalset, tmp_path,
                                                               monkeypatch):
    artifact = portable_artifact(*tiny_classifier, "sequence-classification", tmp_path / "fp32")
    ctx = calibrating_context(tmp_path, classification_evalset, ["unused"])
    monkeypatch.setattr("compress.loaders.calibration_batches", lambda *args: [])
    with pytest.raises(DataError, match=r"data.calib: ptq static calibrates on rows, and data.calib \(by default "
                                        r"data.train\) holds none"):
        ptq.run(artifact, PTQStep(mode="static", verify=LENIENT), ctx)


def test_static_ptq_of_a_causal_lm_is_judged_by_perplexity(tiny_causal_lm, lm_evalset, text_file, tmp_path):
    artifact = portable_artifact(*tiny_causal_lm, "causal-lm", tmp_path / "fp32")
    ctx = calibrating_context(tmp_path, lm_evalset, text_file.read_text().splitlines())
    step = PTQStep(mode="static", calibration={"samples": 4, "method": "entropy"}, verify=LENIENT)
    effect = ptq.run(artifact, step, ctx).history[-1]["effect"]
    assert effect["metric"] == "perplexity" and effect["calibration"] == {"method": "entropy", "rows": 4}
    assert effect["quantized_weights"] == 16 and 0 < abs(effect["metric_drop"]) < 0.05


def test_fallback_keeps_the_sabotaged_layer_in_float_and_meets_the_budget(sabotaged, tmp_path, monkeypatch):
    import onnxruntime.quantization

    artifact, evalset, texts = sabotaged
    plain = ptq.run(artifact, PTQStep(mode="static", verify=LENIENT),
                    calibrating_context(tmp_path / "plain", evalset, texts)).history[-1]["effect"]
    assert plain["metric_before"] == 1.0 and plain["metric_drop"] > 0.3  # int8 wipes the pooler's input

    calibrators = []
    create = onnxruntime.quantization.create_calibrator
    monkeypatch.setattr(onnxruntime.quantization, "create_calibrator",
                        lambda *args, **kwargs: calibrators.append(args) or create(*args, **kwargs))
    step = PTQStep(mode="static", fallback={"max_drop": 0.02}, verify={"max_metric_drop": 0.02})
    effect = ptq.run(artifact, step, calibrating_context(tmp_path / "fallback", evalset, texts)).history[-1]["effect"]

    assert len(calibrators) == 1  # ~20 trials, one calibration
    ranking = effect["sensitivity"]
    assert len(ranking) == 17 and ranking[0]["node"] == POOLER and ranking[0]["op"] == "Gemm"
    assert ranking[0]["metric_drop"] > 0.3 and ranking[0]["score"] > 100 * ranking[1]["score"]
    fallback = effect["fallback"]
    assert [row["node"] for row in fallback["kept_float"]] == [POOLER]
    assert [trial["kept_float"] for trial in fallback["trials"]] == [0, 1]
    assert fallback["trials"][0]["drop"] == pytest.approx(plain["metric_drop"])
    assert fallback["validation_drop"] <= 0.02 and effect["metric_drop"] <= 0.02
    assert effect["quantized_weights"] == 16  # all but the pooler's


def test_dynamic_ptq_ranks_every_layer_it_quantizes(fp32_classifier, classification_evalset, tmp_path,
                                                    make_context):
    step = PTQStep(sensitivity=True, verify=LENIENT)
    effect = ptq.run(fp32_classifier, step, make_context(tmp_path, classification_evalset)).history[-1]["effect"]
    ranking = effect["sensitivity"]
    ops = sorted(row["op"] for row in ranking)
    assert ops == ["Attention"] * 2 + ["EmbedLayerNormalization"] + ["Gemm"] * 2 + ["MatMul"] * 6
    scores = [row["score"] for row in ranking]
    assert scores == sorted(scores, reverse=True) and min(scores) >= 0 < max(scores)
    assert {"node", "op", "score", "metric_drop"} == set(ranking[0]) and "fallback" not in effect
