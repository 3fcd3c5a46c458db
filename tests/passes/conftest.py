"""A context for running one pass on the tiny models, with a given eval set for every split."""

from __future__ import annotations

from pathlib import Path

import pytest

from compress.artifact import Artifact
from compress.context import Context
from compress.evalset import EvalSet
from compress.export.onnx import export_onnx, fuse_for_onnxruntime
from compress.kinds import Kind


@pytest.fixture
def make_context():
    def make(stage_dir: Path, evalset: EvalSet) -> Context:
        return Context(stage_dir=stage_dir, task=evalset.task, make_eval_set=lambda tokenizer, split: evalset,
                       quiet=True)

    return make


def fused_artifact(model, tokenizer, task: str, directory: Path) -> Artifact:
    graph = export_onnx(model, task, directory / "model.onnx", opset=17)
    fuse_for_onnxruntime(graph, model.config)
    return Artifact(task, model.config, tokenizer, onnx_path=graph, kind=Kind("onnx", runtime="onnxruntime"))


@pytest.fixture(scope="module")
def fp32_classifier(tiny_classifier, tmp_path_factory) -> Artifact:
    """The tiny classifier as an ONNX Runtime-fused fp32 graph."""
    return fused_artifact(*tiny_classifier, "sequence-classification", tmp_path_factory.mktemp("classifier"))


@pytest.fixture(scope="module")
def fp32_lm(tiny_causal_lm, tmp_path_factory) -> Artifact:
    """The tiny Llama as an ONNX Runtime-fused fp32 graph."""
    return fused_artifact(*tiny_causal_lm, "causal-lm", tmp_path_factory.mktemp("lm"))
