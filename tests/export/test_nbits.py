from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from compress.errors import DataError, RecipeError
from compress.eval.runners import OrtRunner
from compress.export.nbits import quantize_weight_only
from compress.export.onnx import export_onnx

RTN4 = {"bits": 4, "method": "rtn", "block_size": 32, "symmetric": True, "accuracy_level": 4, "keep_fp32": [],
        "quantize_embeddings": False, "calibration": None, "external_data": False}


def quantize(source: Path, target: Path, **changes) -> dict:
    return quantize_weight_only(source, target, **{**RTN4, **changes})


def relative_error(source: Path, target: Path, features: dict[str, np.ndarray]) -> float:
    before, after = (logits(path, features) for path in (source, target))
    return float(np.abs(after - before).max() / np.abs(before).max())


def logits(path: Path, features: dict[str, np.ndarray]) -> np.ndarray:
    if "input_ids" in features:
        return OrtRunner(path).logits(features)
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, features)[0]


def ops(path: Path) -> list[onnx.NodeProto]:
    return list(onnx.load(str(path)).graph.node)


def one_matmul(directory: Path, k: int, n: int = 64) -> Path:
    """A graph of one MatMul with a random [k, n] weight."""
    weight = onnx.numpy_helper.from_array(np.random.default_rng(0).standard_normal((k, n)).astype(np.float32), "w")
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("MatMul", ["x", "w"], ["logits"], name="matmul")], "one-matmul",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", k])],
        [onnx.helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, ["batch", n])], [weight])
    path = directory / f"k{k}.onnx"
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)]), str(path))
    return path


@pytest.fixture(scope="module")
def llama_graph(llama_onnx_dir) -> Path:
    return llama_onnx_dir / "model.onnx"


@pytest.fixture(scope="module")
def portable_llama_graph(tiny_causal_lm, tmp_path_factory) -> Path:
    """Unfused: its RMS norms hold ReduceMean, whose axes moved from attribute to input at opset 18."""
    model, _ = tiny_causal_lm
    return export_onnx(model, "causal-lm", tmp_path_factory.mktemp("portable-llama") / "model.onnx", opset=17)


@pytest.mark.parametrize("method", ["rtn", "gptq", "hqq"])
def test_each_method_writes_4bit_matmuls_that_stay_near_fp32(method, llama_graph, lm_evalset, tmp_path):
    target = tmp_path / "model.onnx"
    result = quantize(llama_graph, target, method=method, calibration=[lm_evalset.features])
    matmuls = [node for node in ops(target) if node.op_type == "MatMulNBits"]
    assert len(matmuls) == result["quantized_weights"] == 15  # 7 linear layers x 2 blocks, and lm_head
    assert result["nbits_ops"] == {"MatMulNBits": 15} and result["bytes_after"] < result["bytes_before"]
    assert {node.attribute[-1].name for node in matmuls} == {"accuracy_level"}
    assert all(onnx.helper.get_node_attr_value(node, "accuracy_level") == 4 for node in matmuls)
    assert all(onnx.helper.get_node_attr_value(node, "bits") == 4 for node in matmuls)
    assert result["symmetric"] is (method != "hqq")  # hqq always writes zero points
    assert 0 < relative_error(llama_graph, target, lm_evalset.features) < 0.2


def test_8bit_rtn_runs_on_the_cpu_and_stays_closer_than_4bit(llama_graph, lm_evalset, tmp_path):
    four = quantize(llama_graph, tmp_path / "int4.onnx")
    eight = quantize(llama_graph, tmp_path / "int8.onnx", bits=8)
    assert eight["bits"] == 8 and eight["quantized_weights"] == 15
    assert four["bytes_after"] < eight["bytes_after"] < eight["bytes_before"]
    error_8 = relative_error(llama_graph, tmp_path / "int8.onnx", lm_evalset.features)
    assert error_8 < relative_error(llama_graph, tmp_path / "int4.onnx", lm_evalset.features) / 4


@pytest.mark.parametrize("method", ["gptq", "hqq"])
def test_8bit_needs_rtn(method, llama_graph, lm_evalset, tmp_path):
    with pytest.raises(RecipeError, match=r"^bits: 8-bit weight-only needs method rtn"):
        quantize(llama_graph, tmp_path / "model.onnx", bits=8, method=method, calibration=[lm_evalset.features])


@pytest.mark.parametrize("calibration", [None, []])
def test_gptq_without_calibration_rows_names_the_data(calibration, llama_graph, tmp_path):
    with pytest.raises(DataError, match=r"^data\.calib: ptq weight-only gptq calibrates on rows"):
        quantize(llama_graph, tmp_path / "model.onnx", method="gptq", calibration=calibration)


def test_a_bigger_block_makes_a_smaller_file(tmp_path):
    source = one_matmul(tmp_path, k=256)
    fine, coarse = (quantize(source, tmp_path / f"b{size}.onnx", block_size=size) for size in (32, 128))
    assert coarse["bytes_after"] < fine["bytes_after"] < fine["bytes_before"]
    assert fine["padded_weights"] == coarse["padded_weights"] == 0


@pytest.mark.parametrize("method", ["rtn", "gptq", "hqq"])
def test_a_weight_of_partial_blocks_is_padded_and_runs(method, tmp_path):
    source = one_matmul(tmp_path, k=48)
    x = {"x": np.random.default_rng(1).standard_normal((4, 48)).astype(np.float32)}
    result = quantize(source, tmp_path / "model.onnx", method=method, calibration=[x])
    assert result["padded_weights"] == result["quantized_weights"] == 1
    assert relative_error(source, tmp_path / "model.onnx", x) < 0.25


@pytest.mark.parametrize("method", ["rtn", "gptq", "hqq"])
def test_keep_fp32_leaves_the_named_matmuls_alone(method, llama_graph, lm_evalset, tmp_path):
    result = quantize(llama_graph, tmp_path / "model.onnx", method=method, keep_fp32=["down_proj"],
                      calibration=[lm_evalset.features])
    assert result["kept_fp32_nodes"] == 2 and result["quantized_weights"] == 13
    assert [node.op_type for node in ops(tmp_path / "model.onnx") if "down_proj" in node.name] == ["MatMul"] * 2


def test_embeddings_become_gather_block_quantized_beside_the_tied_lm_head(llama_graph, lm_evalset, tmp_path):
    """The tied embedding is exported twice (the table and its transpose for lm_head): each is quantized."""
    target = tmp_path / "model.onnx"
    result = quantize(llama_graph, target, quantize_embeddings=True)
    assert result["nbits_ops"] == {"GatherBlockQuantized": 1, "MatMulNBits": 15}
    gather = next(node for node in ops(target) if node.op_type == "GatherBlockQuantized")
    assert "embed_tokens" in gather.name and "lm_head" in "".join(n.name for n in ops(target)
                                                                   if n.op_type == "MatMulNBits")
    plain = quantize(llama_graph, tmp_path / "plain.onnx")
    assert result["bytes_after"] < plain["bytes_after"]
    assert relative_error(llama_graph, target, lm_evalset.features) < 0.2


def test_embeddings_of_a_portable_graph_are_converted_to_opset_21(portable_llama_graph, lm_evalset, tmp_path):
    target = tmp_path / "model.onnx"
    result = quantize(portable_llama_graph, target, quantize_embeddings=True)
    assert result["nbits_ops"]["GatherBlockQuantized"] == 1
    assert result["bytes_after"] < quantize(portable_llama_graph, tmp_path / "plain.onnx")["bytes_after"]
    model = onnx.load(str(target))
    assert next(o.version for o in model.opset_import if o.domain == "") == 21
    reduce_mean = next(node for node in model.graph.node if node.op_type == "ReduceMean")
    assert len(reduce_mean.input) == 2  # its axes rewritten as an input, so ORT accepts the opset-21 graph
    assert relative_error(portable_llama_graph, target, lm_evalset.features) < 0.2


def test_embeddings_stay_float_where_they_cannot_be_quantized(llama_graph, classifier_onnx_dir, tmp_path):
    eight = quantize(llama_graph, tmp_path / "int8.onnx", bits=8, quantize_embeddings=True)
    assert eight["embeddings_kept_float"] == "GatherBlockQuantized is 4-bit only"
    assert "GatherBlockQuantized" not in eight["nbits_ops"]
    fused = quantize(classifier_onnx_dir / "model.onnx", tmp_path / "classifier.onnx", quantize_embeddings=True)
    assert "EmbedLayerNormalization" in fused["embeddings_kept_float"] and fused["quantized_weights"] == 6


def test_a_tied_lm_head_kept_in_float_keeps_reading_the_embedding_table(llama_graph, tmp_path):
    result = quantize(llama_graph, tmp_path / "model.onnx", keep_fp32=["lm_head"])
    assert result["untied_weights"] == 0 and result["quantized_weights"] == 14
    assert "Transpose" in {node.op_type for node in ops(tmp_path / "model.onnx") if "lm_head" not in node.name}
