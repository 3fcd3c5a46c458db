import copy
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from compress import models
from compress.artifact import GRAPH, GRAPH_DATA, Artifact, read_manifest, sha256_file
from compress.errors import ArtifactError
from compress.kinds import Kind
from compress.recipe import FinetuneStep


def test_save_and_load_round_trip_is_bit_for_bit(tmp_path, tiny_bert_dir):
    loaded = models.load(str(tiny_bert_dir), "sequence-classification", ["neg", "pos"])
    artifact = loaded.artifact().evolve({"kind": "finetune", "config": FinetuneStep().model_dump(), "effect": {}})
    artifact.save(tmp_path / "a")
    again = Artifact.load(tmp_path / "a")
    batch = loaded.tokenizer(["good movie", "the plot was dull and slow"], padding=True, return_tensors="pt")
    with torch.inference_mode():
        assert torch.equal(loaded.model(**batch).logits, again.model(**batch).logits)
    assert again.fingerprint == artifact.fingerprint
    assert again.history == artifact.history and again.label_names == ["neg", "pos"]
    manifest = read_manifest(tmp_path / "a")
    assert manifest["files"]["model.safetensors"] == sha256_file(tmp_path / "a" / "model.safetensors")
    assert manifest["versions"]["torch"].startswith(torch.__version__.split("+")[0])


def test_a_directory_without_manifest_is_not_an_artifact(tmp_path, tiny_bert_dir):
    with pytest.raises(ArtifactError, match="not a compress artifact"):
        Artifact.load(tiny_bert_dir)
    (tmp_path / "compress.json").write_text(json.dumps({"format": "other/9"}))
    with pytest.raises(ArtifactError, match="unknown format 'other/9'"):
        read_manifest(tmp_path)


def test_a_bf16_model_reloads_in_bf16_with_the_same_outputs(tmp_path, tiny_classifier):
    model, tokenizer = tiny_classifier
    half = copy.deepcopy(model).to(torch.bfloat16)
    artifact = Artifact("sequence-classification", half.config, tokenizer, half, kind=Kind(weights="bf16"))
    again = Artifact.load(artifact.save(tmp_path))
    assert again.kind == Kind(weights="bf16") and again.precision == "bf16"
    assert next(again.model.parameters()).dtype == torch.bfloat16
    batch = tokenizer(["good movie", "the plot was dull"], padding=True, return_tensors="pt")
    with torch.inference_mode():
        assert torch.equal(half(**batch).logits, again.model(**batch).logits)


def test_a_graph_with_external_weights_is_saved_hashed_and_reloaded(tmp_path, onnx_classifier_dir,
                                                                   classification_evalset):
    import onnx

    from compress.eval.runners import OrtRunner

    source = tmp_path / "external"
    source.mkdir()
    onnx.save(onnx.load(str(onnx_classifier_dir / GRAPH)), str(source / GRAPH), save_as_external_data=True,
              location=GRAPH_DATA, size_threshold=0)
    artifact = Artifact.load(onnx_classifier_dir)
    artifact = dataclasses.replace(artifact, onnx_path=source / GRAPH, kind=artifact.kind.evolve(external_data=True))
    saved = artifact.save(tmp_path / "stage")
    assert sorted(read_manifest(saved)["files"]) == [GRAPH, GRAPH_DATA]
    again = Artifact.load(saved)
    assert again.kind.external_data and (saved / GRAPH_DATA).stat().st_size > (saved / GRAPH).stat().st_size
    expected = OrtRunner(onnx_classifier_dir / GRAPH).logits(classification_evalset.features)
    assert np.array_equal(OrtRunner(again.onnx_path).logits(classification_evalset.features), expected)
    assert again.fingerprint != Artifact.load(onnx_classifier_dir).fingerprint  # other files, other identity


def test_an_artifact_without_what_its_kind_deploys_is_refused(tmp_path, tiny_classifier):
    model, tokenizer = tiny_classifier
    with pytest.raises(ArtifactError, match="artifact of kind ONNX fp32 holds no ONNX graph"):
        Artifact("sequence-classification", model.config, tokenizer, model, kind=Kind("onnx")).save(tmp_path)


@pytest.fixture
def onnx_classifier_dir(tmp_path, tiny_classifier) -> Path:
    from compress.export.onnx import export_onnx

    model, tokenizer = tiny_classifier
    graph = export_onnx(model, "sequence-classification", tmp_path / "export" / GRAPH, opset=17)
    return Artifact("sequence-classification", model.config, tokenizer, onnx_path=graph,
                    kind=Kind("onnx")).save(tmp_path / "onnx")
