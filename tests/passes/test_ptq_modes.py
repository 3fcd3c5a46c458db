"""ptq modes weight-only and fp16 through the pass, on the tiny models' fused fp32 graphs."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest

from compress.errors import DataError, NothingToDo
from compress.kinds import Kind
from compress.passes import ptq
from compress.recipe import PTQStep

LENIENT = {"max_metric_drop": 1.0, "min_agreement": 0.0}  # random tiny models: judge the mechanics only


@pytest.fixture
def lm_context(make_context, lm_evalset, tmp_path):
    """Calibration rows for gptq: the eval rows, as one batch (the tiny models have no other data)."""
    context = make_context(tmp_path, lm_evalset)
    context.calibration = lambda *args: [lm_evalset.features]
    return context


def op_types(path: Path) -> list[str]:
    return [node.op_type for node in onnx.load(str(path)).graph.node]


@pytest.mark.parametrize("method", ["rtn", "gptq", "hqq"])
def test_weight_only_makes_an_int4_matmulnbits_lm_judged_by_perplexity(method, fp32_lm, lm_context):
    step = PTQStep(mode="weight-only", method=method, verify=LENIENT)
    quantized = ptq.run(fp32_lm, step, lm_context)

    assert quantized.kind == Kind("onnx", "int4-matmulnbits", runtime="onnxruntime") and quantized.precision == "int4"
    assert op_types(quantized.onnx_path).count("MatMulNBits") == 15
    assert op_types(quantized.onnx_path).count("GatherBlockQuantized") == 1  # quantize_embeddings: on by default
    effect = quantized.history[-1]["effect"]
    assert effect["method"] == method and effect["bits"] == 4 and effect["block_size"] == 32
    assert effect["quantized_weights"] == 16 and effect["untied_weights"] == 1  # lm_head, tied to the embedding
    assert effect["bytes_after"] < effect["bytes_before"] and effect["metric"] == "perplexity"
    assert 0 < abs(effect["metric_drop"]) < 0.05  # 4-bit noise moves perplexity, a little


def test_8bit_weight_only_of_a_classifier(fp32_classifier, classification_evalset, make_context, tmp_path):
    step = PTQStep(mode="weight-only", bits=8, block_size=16, verify=LENIENT)
    quantized = ptq.run(fp32_classifier, step, make_context(tmp_path, classification_evalset))
    assert quantized.kind == Kind("onnx", "int8-matmulnbits", runtime="onnxruntime")
    effect = quantized.history[-1]["effect"]
    assert effect["nbits_ops"] == {"MatMulNBits": 6} and effect["block_size"] == 16
    assert effect["embeddings_kept_float"] == "GatherBlockQuantized is 4-bit only"
    assert effect["metric"] == "accuracy" and effect["agreement"] == 1.0


def test_weight_only_that_would_quantize_nothing_fails(fp32_lm, lm_context):
    every_node = [node.name for node in onnx.load(str(fp32_lm.onnx_path)).graph.node if node.name]
    with pytest.raises(NothingToDo, match=r"no weight was quantized"):
        ptq.run(fp32_lm, PTQStep(mode="weight-only", keep_fp32=every_node, verify=LENIENT), lm_context)


def test_gptq_without_calibration_rows_fails_naming_the_data(fp32_lm, lm_context):
    lm_context.calibration = lambda *args: []
    with pytest.raises(DataError, match=r"^data\.calib: ptq weight-only gptq calibrates on rows"):
        ptq.run(fp32_lm, PTQStep(mode="weight-only", method="gptq", verify=LENIENT), lm_context)


@pytest.mark.parametrize("artifact, evalset", [("fp32_classifier", "classification_evalset"),
                                               ("fp32_lm", "lm_evalset")])
def test_fp16_halves_the_graph_and_keeps_the_metric(artifact, evalset, request, make_context, tmp_path):
    artifact, evalset = request.getfixturevalue(artifact), request.getfixturevalue(evalset)
    quantized = ptq.run(artifact, PTQStep(mode="fp16", verify=LENIENT), make_context(tmp_path, evalset))
    assert quantized.kind == Kind("onnx", "fp16", runtime="onnxruntime") and quantized.precision == "fp16"
    effect = quantized.history[-1]["effect"]
    assert effect["bytes_after"] < 0.56 * effect["bytes_before"] and effect["fp16_initializers"] > 0
    assert effect["agreement"] == 1.0 and abs(effect["metric_drop"]) < 1e-3
