import json

import pytest
import torch

from compress import models
from compress.artifact import Artifact, read_manifest, sha256_file
from compress.errors import ArtifactError
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
