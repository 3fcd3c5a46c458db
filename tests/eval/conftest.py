"""Tiny artifacts (torch and ONNX) and eval sets shared by the eval tests, built once per session."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from compress.artifact import Artifact
from compress.evalset import EvalSet

SENTENCES = [
    "good movie and a great plot",
    "awful film",
    "the actor was not very fun but the story was",
    "dull slow scene",
    "i love this really fast story",
    "bad",
    "quite a good film",
    "hate the plot and the actor and the scene",
]


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
def bert_classifier(tiny_bert_dir):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=2).eval()
    return model, AutoTokenizer.from_pretrained(tiny_bert_dir)


@pytest.fixture(scope="session")
def classification_evalset(bert_classifier) -> EvalSet:
    _, tokenizer = bert_classifier
    features = dict(tokenizer(SENTENCES, padding=True, return_tensors="np"))
    labels = np.array([1, 0, 1, 0, 1, 0, 1, 0])
    return EvalSet("sequence-classification", features, tokenizer.pad_token_id, labels)


@pytest.fixture(scope="session")
def bert_torch_artifact(bert_classifier, tmp_path_factory) -> Path:
    model, tokenizer = bert_classifier
    directory = tmp_path_factory.mktemp("bert-torch")
    return Artifact("sequence-classification", model.config, tokenizer, model=model, source="tiny").save(directory)


@pytest.fixture(scope="session")
def bert_onnx_artifact(bert_classifier, tmp_path_factory) -> Path:
    model, tokenizer = bert_classifier
    graph = _export_classifier(model, tmp_path_factory.mktemp("bert-export") / "model.onnx")
    directory = tmp_path_factory.mktemp("bert-onnx")
    return Artifact("sequence-classification", model.config, tokenizer, onnx_path=graph, source="tiny").save(directory)


@pytest.fixture(scope="session")
def llama(tiny_llama_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval(), AutoTokenizer.from_pretrained(tiny_llama_dir)


@pytest.fixture(scope="session")
def lm_evalset(llama) -> EvalSet:
    """Right-padded windows of different lengths; every real token but the first is scored."""
    _, tokenizer = llama
    features = dict(tokenizer(SENTENCES, padding=True, return_tensors="np"))
    target_mask = features["attention_mask"].astype(bool)
    target_mask[:, 0] = False
    return EvalSet("causal-lm", features, tokenizer.pad_token_id, target_mask=target_mask)


@pytest.fixture(scope="session")
def llama_onnx_dirs(llama, tmp_path_factory) -> dict[str, Path]:
    """Graphs exported by optimum without and with past key/value inputs."""
    from optimum.exporters.onnx import onnx_export_from_model

    model, _ = llama
    directories = {}
    for task in ("text-generation", "text-generation-with-past"):
        directories[task] = tmp_path_factory.mktemp(task)
        onnx_export_from_model(model, directories[task], task=task, do_validation=False)
    return directories
