from __future__ import annotations

import onnx
import pytest
from onnx import numpy_helper

from compress.artifact import Artifact
from compress.errors import ExportMismatch, NothingToDo
from compress.kinds import Kind
from compress.passes import export, ort_fuse
from compress.recipe import ExportStep, OrtFuseStep


@pytest.fixture(scope="module")
def portable(tiny_classifier, classification_evalset, tmp_path_factory) -> Artifact:
    from compress.context import Context

    model, tokenizer = tiny_classifier
    ctx = Context(stage_dir=tmp_path_factory.mktemp("portable"), task="sequence-classification", quiet=True,
                  make_eval_set=lambda tok, split: classification_evalset)
    return export.run(Artifact("sequence-classification", model.config, tokenizer, model), ExportStep(), ctx)


def test_fusing_rewrites_into_onnxruntime_ops_and_verifies(portable, classification_evalset, tmp_path, make_context):
    fused = ort_fuse.run(portable, OrtFuseStep(), make_context(tmp_path, classification_evalset))
    assert fused.kind == Kind("onnx", "fp32", runtime="onnxruntime")
    effect = fused.history[-1]["effect"]
    assert effect["fusions"]["Attention"] == 2 and effect["max_abs_diff"] < 1e-4
    ops = {(node.domain, node.op_type) for node in onnx.load(str(fused.onnx_path)).graph.node}
    assert ("com.microsoft", "Attention") in ops
    assert portable.onnx_path.read_bytes() != fused.onnx_path.read_bytes()  # the input stage is left alone
    assert {node.domain for node in onnx.load(str(portable.onnx_path)).graph.node} <= {"", "ai.onnx"}


def test_a_fusion_that_changes_the_outputs_fails(portable, classification_evalset, tmp_path, monkeypatch,
                                                 make_context):
    real_fuse = ort_fuse.fuse_for_onnxruntime

    def fuse_then_damage(path, config):
        fusions = real_fuse(path, config)
        graph = onnx.load(str(path))
        bias = next(w for w in graph.graph.initializer if "classifier" in w.name and len(w.dims) == 1)
        bias.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(bias) + 1.0, bias.name))
        onnx.save(graph, str(path))
        return fusions

    monkeypatch.setattr(ort_fuse, "fuse_for_onnxruntime", fuse_then_damage)
    with pytest.raises(ExportMismatch, match="logits of eval rows 0-3"):
        ort_fuse.run(portable, OrtFuseStep(), make_context(tmp_path, classification_evalset))


def test_a_graph_with_nothing_to_fuse_is_refused(portable, classification_evalset, tmp_path, monkeypatch,
                                                 make_context):
    monkeypatch.setattr(ort_fuse, "fuse_for_onnxruntime", lambda path, config: {})
    with pytest.raises(NothingToDo, match="found no attention, layer-norm or GELU pattern"):
        ort_fuse.run(portable, OrtFuseStep(), make_context(tmp_path, classification_evalset))
