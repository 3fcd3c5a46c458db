from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnxruntime.quantization import load_tensors_data

from compress.errors import ArtifactError
from compress.eval.runners import OrtRunner
from compress.evalset import EvalSet
from compress.export.onnx import export_onnx
from compress.export.static import StaticInt8

EIGHT_BIT = (onnx.TensorProto.INT8, onnx.TensorProto.UINT8)


def calibration_batches(evalset: EvalSet) -> list[dict[str, np.ndarray]]:
    """Two batches of the eval rows, with a key no graph takes (calibration rows may carry labels)."""
    return [{**features, "labels": np.zeros(4, dtype=np.int64)} for _, features in evalset.batches(4)]


@pytest.fixture(scope="module")
def portable_classifier(tiny_classifier, tmp_path_factory) -> Path:
    return export_onnx(tiny_classifier[0], "sequence-classification",
                       tmp_path_factory.mktemp("portable-classifier") / "model.onnx", opset=17)


@pytest.fixture(scope="module")
def portable_lm(tiny_causal_lm, tmp_path_factory) -> Path:
    return export_onnx(tiny_causal_lm[0], "causal-lm", tmp_path_factory.mktemp("portable-lm") / "model.onnx",
                       opset=17)


def quantized_inputs(path: Path) -> dict[str, bool]:
    """Each weight-holding node's name -> whether a DequantizeLinear feeds its weight."""
    graph = onnx.load(str(path)).graph
    dequantized = {output for node in graph.node if node.op_type == "DequantizeLinear" for output in node.output}
    weight_at = {"MatMul": 1, "Gemm": 1, "Gather": 0}
    return {node.name: node.input[weight_at[node.op_type]] in dequantized for node in graph.node
            if node.op_type in weight_at}


def test_classifier_becomes_a_qdq_graph_with_int8_linears_and_embeddings(portable_classifier,
                                                                         classification_evalset, tmp_path):
    batches = calibration_batches(classification_evalset)
    quantizer = StaticInt8(portable_classifier, tmp_path, batches)
    result = quantizer.quantize(tmp_path / "int8.onnx")

    assert result["calibration"] == {"method": "minmax", "rows": 8}
    assert result["qdq_ops"]["QuantizeLinear"] > 0 and result["qdq_ops"]["DequantizeLinear"] > 0
    assert result["bytes_after"] < result["bytes_before"] == portable_classifier.stat().st_size
    graph = onnx.load(str(tmp_path / "int8.onnx")).graph
    assert {node.domain for node in graph.node} <= {"", "ai.onnx"}  # still portable
    eight_bit = {w.name for w in graph.initializer if w.data_type in EIGHT_BIT and len(w.dims) >= 2}
    assert "bert.embeddings.word_embeddings.weight_quantized" in eight_bit
    assert result["quantized_weights"] == len(eight_bit) == 2 * 6 + 2 + 3  # linears, pooler + head, 3 tables
    features = {k: v for k, v in batches[0].items() if k != "labels"}
    fp32, int8 = OrtRunner(portable_classifier).logits(features), OrtRunner(tmp_path / "int8.onnx").logits(features)
    assert 0 < np.abs(fp32 - int8).max() < 0.05 * np.abs(fp32).max()  # changed, but close


@pytest.mark.parametrize("method", ["minmax", "percentile", "entropy"])
def test_every_calibration_method_chooses_its_own_ranges(method, portable_lm, lm_evalset, tmp_path):
    quantizer = StaticInt8(portable_lm, tmp_path, calibration_batches(lm_evalset), method=method,
                           percentile=99.0)
    result = quantizer.quantize(tmp_path / "int8.onnx")
    assert result["quantized_weights"] == 2 * 7 + 2  # 7 linears a layer, lm_head, the embedding table
    assert load_tensors_data(tmp_path / "ranges.json").calibration_method.name.lower() == method
    assert all(quantized_inputs(tmp_path / "int8.onnx")[node] for node in quantizer.layers)


def test_percentile_clips_ranges_minmax_keeps(portable_lm, lm_evalset, tmp_path):
    batches = calibration_batches(lm_evalset)
    widths = {}
    for method in ("minmax", "percentile"):
        (tmp_path / method).mkdir()
        StaticInt8(portable_lm, tmp_path / method, batches, method=method, percentile=90.0)
        ranges = load_tensors_data(tmp_path / method / "ranges.json")
        widths[method] = {name: float(np.max(ranges[name].range_value[1] - ranges[name].range_value[0]))
                          for name in ranges}
    narrower = [name for name in widths["minmax"] if widths["percentile"][name] < widths["minmax"][name]]
    assert len(narrower) > 0.9 * len(widths["minmax"])


def test_keep_fp32_and_float_nodes_stay_float(portable_lm, lm_evalset, tmp_path):
    quantizer = StaticInt8(portable_lm, tmp_path, calibration_batches(lm_evalset), keep_fp32=["down_proj"])
    q_proj = "/model/layers.0/self_attn/q_proj/MatMul"
    result = quantizer.quantize(tmp_path / "int8.onnx", float_nodes=[q_proj])
    assert result["kept_fp32_nodes"] == 2 and result["quantized_weights"] == 16 - 2 - 1
    quantized = quantized_inputs(tmp_path / "int8.onnx")
    weights = set(quantizer.layers) | {name for name in quantized if "down_proj" in name}
    assert {name for name in weights if not quantized[name]} == {
        q_proj, "/model/layers.0/mlp/down_proj/MatMul", "/model/layers.1/mlp/down_proj/MatMul"}


def test_embeddings_stay_float_when_asked(portable_lm, lm_evalset, tmp_path):
    quantizer = StaticInt8(portable_lm, tmp_path, calibration_batches(lm_evalset), quantize_embeddings=False)
    quantizer.quantize(tmp_path / "int8.onnx")
    assert "/model/embed_tokens/Gather" not in quantizer.layers
    assert not quantized_inputs(tmp_path / "int8.onnx")["/model/embed_tokens/Gather"]


def test_a_graph_fused_for_onnxruntime_is_refused(classifier_onnx_dir, classification_evalset, tmp_path):
    with pytest.raises(ArtifactError, match=r"fused for ONNX Runtime \(Attention, EmbedLayerNormalization\).*"
                                            r"quantize the portable graph"):
        StaticInt8(classifier_onnx_dir / "model.onnx", tmp_path, calibration_batches(classification_evalset))


def test_signed_activations_need_signed_weights():
    from pydantic import ValidationError

    from compress.recipe import PTQStep

    with pytest.raises(ValidationError, match="activation_type int8 with weight_type uint8"):
        PTQStep(mode="static", weight_type="uint8", activation_type="int8")


def test_static_on_a_fused_graph_is_refused_by_the_recipe_check():
    from compress.plan import plan_stages
    from compress.recipe import ExportStep, OrtFuseStep, PTQStep

    with pytest.raises(ValueError, match=r"steps\[2\] \(ptq\) .*static QDQ cannot reach the weights inside"):
        plan_stages([ExportStep(), OrtFuseStep(), PTQStep(mode="static")])


def test_failed_preprocessing_is_typed_and_leaves_nothing_in_the_working_directory(portable_classifier, tmp_path,
                                                                                  monkeypatch):
    import onnxruntime.quantization

    from compress.errors import BackendError

    def fail_like_onnxruntime(src, dst, **options):  # it dumps its partial graph into the working directory
        Path("sym_shape_infer_temp.onnx").write_bytes(b"partial")
        raise Exception("Incomplete symbolic shape inference")  # noqa: TRY002 -- what ONNX Runtime raises

    monkeypatch.setattr(onnxruntime.quantization, "quant_pre_process", fail_like_onnxruntime)
    workdir, scratch = tmp_path / "cwd", tmp_path / "scratch"
    workdir.mkdir(), scratch.mkdir()
    monkeypatch.chdir(workdir)
    with pytest.raises(BackendError, match=r"pre-processing failed on this graph \(Incomplete symbolic shape"):
        StaticInt8(portable_classifier, scratch, [])
    assert not list(workdir.iterdir()) and Path.cwd() == workdir


def test_a_graph_named_relative_to_the_working_directory_is_found(portable_classifier, classification_evalset,
                                                                   tmp_path, monkeypatch):
    monkeypatch.chdir(portable_classifier.parent)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    quantizer = StaticInt8(Path(portable_classifier.name), scratch, calibration_batches(classification_evalset))
    assert quantizer.graph.is_file() and quantizer.graph.parent == scratch
