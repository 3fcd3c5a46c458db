"""The tiny models' exported (fused fp32) graphs, built once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from compress.export.onnx import export_onnx, fuse_for_onnxruntime


def exported_dir(model, tokenizer, task: str, directory: Path) -> Path:
    """What optimum's ORTModel classes load: config, tokenizer and the fused graph."""
    fuse_for_onnxruntime(export_onnx(model, task, directory / "model.onnx", opset=17), model.config)
    model.config.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def classifier_onnx_dir(tiny_classifier, tmp_path_factory) -> Path:
    return exported_dir(*tiny_classifier, "sequence-classification", tmp_path_factory.mktemp("classifier-onnx"))


@pytest.fixture(scope="session")
def llama_onnx_dir(tiny_causal_lm, tmp_path_factory) -> Path:
    return exported_dir(*tiny_causal_lm, "causal-lm", tmp_path_factory.mktemp("llama-onnx"))
