from __future__ import annotations

import numpy as np
import onnx
import pytest

from compress.artifact import Artifact
from compress.errors import RecipeError
from compress.eval.metrics import evaluate
from compress.eval.runners import TorchRunner
from compress.kinds import Kind
from compress.passes import export, quantize
from compress.plan import plan_stages
from compress.recipe import ExportStep, QuantizeStep

LENIENT = {"max_metric_drop": 1.0, "min_agreement": 0.0}  # random tiny models: judge the mechanics only


@pytest.fixture
def lm_artifact(tiny_causal_lm) -> Artifact:
    model, tokenizer = tiny_causal_lm
    return Artifact("causal-lm", model.config, tokenizer, model=model)


def test_quantize_makes_an_int4_torch_artifact_that_reloads_and_evaluates_identically(lm_artifact, lm_evalset,
                                                                                       tmp_path, make_context):
    step = QuantizeStep(group_size=16, verify=LENIENT)
    quantized = quantize.run(lm_artifact, step, make_context(tmp_path / "stage", lm_evalset))

    assert quantized.kind == Kind("torch", "int4-weight-only") and quantized.model is not lm_artifact.model
    effect = quantized.history[-1]["effect"]
    assert {key: effect[key] for key in ("method", "bits", "group_size", "symmetric", "quantized_layers")} == \
        {"method": "rtn", "bits": 4, "group_size": 16, "symmetric": True, "quantized_layers": 14}
    assert effect["bytes_after"] < effect["bytes_before"]
    fp32 = evaluate(TorchRunner(lm_artifact.model), lm_evalset, progress=False)
    assert effect["metric"] == "perplexity" and effect["metric_before"] == fp32.value != effect["metric_after"]

    saved = quantized.save(tmp_path / "saved")
    assert sorted(path.name for path in saved.iterdir() if "model" in path.name or "quant" in path.name) == \
        ["model.safetensors", "quantization.json"]
    reloaded = Artifact.load(saved)
    features = lm_evalset.features
    assert np.array_equal(TorchRunner(reloaded.model).logits(features), TorchRunner(quantized.model).logits(features))
    assert evaluate(TorchRunner(reloaded.model), lm_evalset, progress=False).value == effect["metric_after"]


def test_gptq_calibrates_on_the_calibration_rows(lm_artifact, lm_evalset, tmp_path, make_context):
    ctx = make_context(tmp_path, lm_evalset)
    asked = []

    def calibration(tokenizer, samples, batch_size, purpose):
        asked.append((samples, batch_size))
        ids = lm_evalset.features["input_ids"]
        return [{"input_ids": ids[:4], "attention_mask": np.ones_like(ids[:4])}]

    ctx.calibration = calibration
    step = QuantizeStep(method="gptq", bits=8, group_size=32, symmetric=False, verify=LENIENT)
    quantized = quantize.run(lm_artifact, step, ctx)
    assert asked == [(128, 8)] and quantized.kind.weights == "int8-weight-only"
    assert quantized.model.model.layers[0].mlp.down_proj.zero_points.shape == (32, 2)


def test_a_group_size_that_does_not_divide_fails_before_any_work(lm_artifact, lm_evalset, tmp_path, make_context):
    stage = tmp_path / "stage"
    with pytest.raises(RecipeError, match=r"^quantize.group_size: 128 does not divide") as error:
        quantize.run(lm_artifact, QuantizeStep(group_size=128), make_context(stage, lm_evalset))
    assert error.value.exit_code == 2 and not stage.exists()


def test_an_already_quantized_model_is_refused_by_the_step_contract():
    with pytest.raises(ValueError, match=r"steps\[1\] \(quantize\) would receive torch int4 weight-only from "
                                         r"00-quantize: quantize works on a float torch model"):
        plan_stages([QuantizeStep(), QuantizeStep()])


def test_the_exported_quantized_model_holds_matmulnbits_and_passes_verification(lm_artifact, lm_evalset, tmp_path,
                                                                                make_context):
    quantized = quantize.run(lm_artifact, QuantizeStep(group_size=16, verify=LENIENT),
                             make_context(tmp_path / "quantize", lm_evalset))
    exported = export.run(quantized, ExportStep(verify_quantized={"max_metric_drop": 1e-4, "min_agreement": 1.0}),
                          make_context(tmp_path / "export", lm_evalset))

    assert exported.kind == Kind("onnx", "int4-matmulnbits", runtime="onnxruntime")
    ops = [node.op_type for node in onnx.load(str(exported.onnx_path)).graph.node]
    assert ops.count("MatMulNBits") == 14
    effect = exported.history[-1]["effect"]
    assert effect["agreement"] == 1.0 and abs(effect["metric_drop"]) < 1e-5
