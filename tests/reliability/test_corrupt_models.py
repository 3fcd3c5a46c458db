"""Model directories that are broken, or do not belong together: each is refused in one line naming it, never
loaded half-right (random layers standing in for missing weights), and no code of theirs runs unless asked."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import yaml

from compress import models
from compress.cli import main
from compress.errors import ModelLoadError

LABELS = ["negative", "positive"]


def _edit_config(**changes):
    def edit(directory: Path) -> None:
        config = json.loads((directory / "config.json").read_text())
        (directory / "config.json").write_text(json.dumps({**config, **changes}))
    return edit


def _cut_weights(keep: float):
    def cut(directory: Path) -> None:
        weights = directory / "model.safetensors"
        data = weights.read_bytes()
        weights.write_bytes(data[:keep if isinstance(keep, int) else int(len(data) * keep)])
    return cut


def _random_weights(directory: Path) -> None:
    (directory / "model.safetensors").write_bytes(os.urandom(4096))


def _no_weights(directory: Path) -> None:
    (directory / "model.safetensors").unlink()


def _no_tokenizer(directory: Path) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        (directory / name).unlink(missing_ok=True)


def _bad_json(directory: Path) -> None:
    (directory / "config.json").write_text('{"model_type": "bert", ')


CORRUPT = {
    "weights missing": (_no_weights, "model.safetensors"),
    "weights cut in half": (_cut_weights(0.5), "not a whole safetensors file"),
    "weights cut inside the header": (_cut_weights(20), "not a whole safetensors file"),
    "weights are random bytes": (_random_weights, "not a whole safetensors file"),
    "config is not JSON": (_bad_json, "not a valid JSON file"),
    "config wider than the weights": (_edit_config(hidden_size=64, intermediate_size=128),
                                      "config.json in .* does not match its weights: size mismatch"),
    "config with more layers than the weights": (_edit_config(num_hidden_layers=4),
                                                 r"not in the checkpoint \(first: bert.encoder.layer.2"),
    "config with fewer layers than the weights": (_edit_config(num_hidden_layers=1),
                                                  "weights the config has no place for .*layer.1"),
    "config with a larger vocabulary": (_edit_config(vocab_size=500), "size mismatch"),
    "no tokenizer": (_no_tokenizer, "no usable tokenizer"),
}


@pytest.fixture
def model_copy(tmp_path, tiny_bert_dir):
    def copy(mutate) -> Path:
        directory = tmp_path / "model"
        shutil.copytree(tiny_bert_dir, directory)
        mutate(directory)
        return directory
    return copy


@pytest.mark.parametrize("case", CORRUPT)
def test_a_corrupt_model_directory_is_refused_in_one_line_naming_it(case, model_copy):
    mutate, expected = CORRUPT[case]
    directory = model_copy(mutate)
    with pytest.raises(ModelLoadError, match=expected) as refused:
        models.load(str(directory), "sequence-classification", LABELS)
    message = str(refused.value)
    assert str(directory) in message and "\n" not in message


def test_a_tokenizer_of_another_model_is_refused(model_copy, tiny_llama_dir):
    def swap(directory: Path) -> None:
        _no_tokenizer(directory)
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            if (tiny_llama_dir / name).is_file():
                shutil.copy(tiny_llama_dir / name, directory / name)

    with pytest.raises(ModelLoadError, match=r"tokenizer .* has \d+ tokens but the model embeds only \d+"):
        models.load(str(model_copy(swap)), "sequence-classification", LABELS)


def test_pickle_only_weights_are_refused_unless_the_recipe_allows_them(model_copy):
    import torch
    from safetensors.torch import load_file

    def pickle_only(directory: Path) -> None:
        torch.save(load_file(directory / "model.safetensors"), directory / "pytorch_model.bin")
        _no_weights(directory)

    directory = model_copy(pickle_only)
    with pytest.raises(ModelLoadError, match=r"only pickle weights \(pytorch_model.bin\).*allow_pickle: true"):
        models.load(str(directory), "sequence-classification", LABELS)
    assert models.load(str(directory), "sequence-classification", LABELS, allow_pickle=True).model is not None


def test_a_models_own_code_never_runs_unless_trusted(model_copy, tmp_path):
    ran = tmp_path / "the model's code ran"

    def custom(directory: Path) -> None:
        _edit_config(model_type="house-bert", auto_map={
            "AutoConfig": "house.HouseConfig", "AutoModelForSequenceClassification": "house.HouseModel"})(directory)
        (directory / "house.py").write_text(f"open({str(ran)!r}, 'w').close()\n")

    with pytest.raises(ModelLoadError, match="trust_remote_code: true"):
        models.load(str(model_copy(custom)), "sequence-classification", LABELS)
    assert not ran.exists()


def test_the_run_command_refuses_a_corrupt_model_in_one_line_with_exit_2(model_copy, sentiment_files, tmp_path,
                                                                         capsys):
    directory = model_copy(_cut_weights(0.5))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "model": str(directory), "task": "sequence-classification",
        "data": {"train": {"path": str(sentiment_files["train"]), "text": "sentence"},
                 "eval": {"path": str(sentiment_files["dev"]), "text": "sentence"}},
        "steps": [{"kind": "export"}]}))
    assert main(["-q", "run", str(recipe), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a whole safetensors file" in err[0] and str(directory) in err[0]
    assert not any((tmp_path / "out").glob("[0-9b]*")), "a stage was written from a corrupt model"
