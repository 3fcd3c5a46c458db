"""Tiny artifacts (torch and ONNX) and graphs used by the eval tests, built once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from compress.artifact import Artifact
from compress.kinds import Kind


def _export_classifier(model, path: Path) -> Path:
    import torch

    names = ["input_ids", "attention_mask", "token_type_ids"]
    example = {name: torch.ones(2, 8, dtype=torch.long) for name in names}
    torch.onnx.export(
        model, (), str(path), kwargs=example, input_names=names, output_names=["logits"],
        dynamic_axes={**{name: {0: "batch", 1: "sequence"} for name in names}, "logits": {0: "batch"}},
        opset_version=17, dynamo=False,
    )
    return path


@pytest.fixture(scope="session")
def bert_torch_artifact(tiny_classifier, tmp_path_factory) -> Path:
    model, tokenizer = tiny_classifier
    directory = tmp_path_factory.mktemp("bert-torch")
    return Artifact("sequence-classification", model.config, tokenizer, model=model, source="tiny").save(directory)


@pytest.fixture(scope="session")
def bert_onnx_artifact(tiny_classifier, tmp_path_factory) -> Path:
    model, tokenizer = tiny_classifier
    graph = _export_classifier(model, tmp_path_factory.mktemp("bert-export") / "model.onnx")
    directory = tmp_path_factory.mktemp("bert-onnx")
    return Artifact("sequence-classification", model.config, tokenizer, onnx_path=graph, kind=Kind("onnx"),
                    source="tiny").save(directory)


@pytest.fixture(scope="session")
def llama_onnx_dirs(tiny_causal_lm, tmp_path_factory) -> dict[str, Path]:
    """Graphs exported by optimum without and with past key/value inputs."""
    from optimum.exporters.onnx import onnx_export_from_model

    model, _ = tiny_causal_lm
    use_cache = model.config.use_cache
    directories = {}
    try:
        for task in ("text-generation", "text-generation-with-past"):
            directories[task] = tmp_path_factory.mktemp(task)
            onnx_export_from_model(model, directories[task], task=task, do_validation=False)
    finally:  # optimum switches the cache off in the live config; the model is shared by the whole session
        model.config.use_cache = use_cache
    return directories


@pytest.fixture(scope="session")
def llama_artifacts(tiny_causal_lm, llama_onnx_dirs, tmp_path_factory) -> dict[str, Path]:
    """The tiny Llama as torch, and as ONNX graphs without and with the KV cache."""
    model, tokenizer = tiny_causal_lm
    artifacts = {"torch": Artifact("causal-lm", model.config, tokenizer, model=model, source="tiny")}
    for name, task in (("onnx", "text-generation"), ("onnx-kv", "text-generation-with-past")):
        artifacts[name] = Artifact("causal-lm", model.config, tokenizer, onnx_path=llama_onnx_dirs[task] / "model.onnx",
                                   kind=Kind("onnx"), source="tiny")
    return {name: artifact.save(tmp_path_factory.mktemp(f"llama-{name}")) for name, artifact in artifacts.items()}
