"""The prune pass, unstructured methods, on the tiny models: exact sparsity, zeros held through recovery and
later training, permanent zeros that reload, per-layer records, and bad input refused before any work."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import yaml
from pydantic import ValidationError
from transformers import AutoModelForSequenceClassification

from compress.algos.sparsity import prunable
from compress.artifact import Artifact
from compress.cli import main
from compress.context import Context
from compress.data import build_eval_set, load_task_data
from compress.errors import RecipeError
from compress.kinds import Kind
from compress.passes import prune
from compress.pipeline import run_pipeline
from compress.recipe import DataConfig, PruneStep
from compress.recipe_loader import load_recipe

RECOVER = {"max_steps": 6, "batch_size": 16, "lr": 5e-3, "warmup_ratio": 0.0, "weight_decay": 0.1}
CALIB = {"samples": 16}
SPARSE = Kind(sparsity="zeros")


@pytest.fixture
def classifier(tiny_classifier) -> Artifact:
    model, tokenizer = tiny_classifier
    model = copy.deepcopy(model)
    return Artifact("sequence-classification", model.config, tokenizer, model)


@pytest.fixture
def lm(tiny_causal_lm) -> Artifact:
    model, tokenizer = tiny_causal_lm
    model = copy.deepcopy(model)
    return Artifact("causal-lm", model.config, tokenizer, model)


def context(tmp_path, files, task="sequence-classification", artifact=None) -> Context:
    sources = {"train": {"path": str(files["train"]), "text": "sentence"},
               "eval": {"path": str(files["dev"]), "text": "sentence"}, "max_length": 32}
    cfg = DataConfig.model_validate(sources)
    data = load_task_data(cfg, task)
    return Context(stage_dir=tmp_path, task=task, max_length=32, data=data, quiet=True,
                   make_eval_set=lambda tok, split: build_eval_set(data, tok, cfg, split),
                   resolve_model={"@input": artifact}.get)


def zeros(model, names) -> dict[str, torch.Tensor]:
    modules = dict(model.named_modules())
    return {name: modules[name].weight.detach() == 0 for name in names}


def assert_layer_counts(result, sparsity):
    for name, layer in result.history[-1]["effect"]["layers"].items():
        assert abs(layer["weights"] - layer["nonzeros"] - sparsity * layer["weights"]) <= 0.5, name


@pytest.mark.parametrize(("settings", "per_layer_exact"), [
    ({"method": "magnitude", "ranking": "per_layer"}, True),
    ({"method": "magnitude", "ranking": "global"}, False),
    ({"method": "magnitude", "schedule": "gradual", "ranking": "per_layer", "recover": RECOVER,
      "gradual": {"every": 2}}, True),
    ({"method": "movement", "variant": "hard", "recover": RECOVER}, True),
    ({"method": "movement", "variant": "soft", "lambda": 1.0, "recover": RECOVER}, False),
    ({"method": "l1", "lambda": 1e-2, "ranking": "per_layer", "recover": RECOVER}, True),
    ({"method": "wanda", "calibration": CALIB}, True),
    ({"method": "sparsegpt", "calibration": CALIB}, True),
])
def test_every_method_reaches_the_target_and_saves_plain_zeros(classifier, tmp_path, sentiment_files, settings,
                                                                per_layer_exact):
    untouched = copy.deepcopy(classifier.model.state_dict())
    step = PruneStep(sparsity=0.6, **settings)
    result = prune.run(classifier, step, context(tmp_path, sentiment_files, artifact=classifier))
    effect = result.history[-1]["effect"]
    assert result.kind == SPARSE
    total = sum(layer["weights"] for layer in effect["layers"].values())
    assert abs(effect["achieved_sparsity"] - 0.6) * total <= 0.5 * len(effect["layers"])  # rounding per layer
    if per_layer_exact:
        assert_layer_counts(result, 0.6)
    assert not any("parametrizations" in key for key in result.model.state_dict())
    found = sum(int(mask.sum()) for mask in zeros(result.model, effect["layers"]).values())
    assert found == sum(layer["weights"] - layer["nonzeros"] for layer in effect["layers"].values())
    assert all(torch.equal(tensor, untouched[name]) for name, tensor in classifier.model.state_dict().items())


def test_recovery_never_regrows_a_pruned_weight(classifier, tmp_path, sentiment_files):
    one_shot = prune.run(classifier, PruneStep(method="magnitude", sparsity=0.5),
                         context(tmp_path, sentiment_files))
    names = list(one_shot.history[-1]["effect"]["layers"])
    recovered = prune.run(classifier, PruneStep(method="magnitude", sparsity=0.5, recover=RECOVER),
                          context(tmp_path, sentiment_files, artifact=classifier))
    assert recovered.history[-1]["effect"]["recovery"]["steps"] == 6
    before, after = zeros(one_shot.model, names), zeros(recovered.model, names)
    for name in names:
        assert torch.equal(before[name], after[name]), name
    moved = [name for name in names
             if not torch.equal(dict(one_shot.model.named_modules())[name].weight,
                                dict(recovered.model.named_modules())[name].weight)]
    assert moved  # the kept weights did train


def test_decoders_prune_with_wanda_sparsegpt_and_two_of_four(lm, tmp_path, sentiment_files):
    ctx = context(tmp_path, sentiment_files, task="causal-lm")
    for method in ("wanda", "sparsegpt", "magnitude"):
        extra = {} if method == "magnitude" else {"calibration": CALIB}
        result = prune.run(lm, PruneStep(method=method, nm=[2, 4], **extra), ctx)
        for name, module in prunable(result.model).items():
            groups = (module.weight != 0).view(module.weight.shape[0], -1, 4).sum(-1)
            assert (groups == 2).all(), (method, name)
        assert result.history[-1]["effect"]["target_sparsity"] == 0.5


def test_sparsity_survives_save_and_reload_and_the_kind_says_so(classifier, tmp_path, sentiment_files):
    result = prune.run(classifier, PruneStep(method="wanda", sparsity=0.5, calibration=CALIB),
                       context(tmp_path, sentiment_files))
    result.save(tmp_path / "sparse")
    reloaded = Artifact.load(tmp_path / "sparse")
    assert reloaded.kind == SPARSE
    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path / "sparse")
    names = list(result.history[-1]["effect"]["layers"])
    for name, mask in zeros(result.model, names).items():
        assert torch.equal(zeros(plain, [name])[name], mask), name


def test_a_later_training_step_holds_the_zeros(tmp_path, tiny_classifier, sentiment_files, capsys):
    model, tokenizer = tiny_classifier
    recipe = {"model": "tiny", "task": "sequence-classification",
              "data": {"train": {"path": str(sentiment_files["train"]), "text": "sentence"},
                       "eval": {"path": str(sentiment_files["dev"]), "text": "sentence"}, "max_length": 32},
              "steps": [{"kind": "prune", "method": "magnitude", "sparsity": 0.5},
                        {"kind": "finetune", "max_steps": 4, "batch_size": 16, "lr": 5e-3},
                        {"kind": "qat", "max_steps": 3, "batch_size": 16, "lr": 5e-3, "calibration": CALIB},
                        {"kind": "export"}],
              "bench": {"enabled": False}}
    model.save_pretrained(tmp_path / "tiny")
    tokenizer.save_pretrained(tmp_path / "tiny")
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    run_pipeline(load_recipe(tmp_path / "recipe.yaml"), tmp_path / "run", quiet=True)
    stages = [Artifact.load(tmp_path / "run" / name) for name in ("00-prune", "01-finetune", "02-qat")]
    names = list(stages[0].history[-1]["effect"]["layers"])
    for stage in stages[1:]:
        assert stage.kind.sparsity == "zeros"
        for name, mask in zeros(stages[0].model, names).items():
            assert torch.equal(zeros(stage.model, [name])[name] | ~mask, torch.ones_like(mask)), (stage, name)
    assert json.loads((tmp_path / "run" / "03-export" / "compress.json").read_text())["kind"]["sparsity"] == "zeros"
    assert main(["inspect", str(tmp_path / "run" / "00-prune")]) == 0
    shown = capsys.readouterr().out
    assert "torch fp32 sparse (zeros)" in shown and "achieved_sparsity=0.5, layers=12 layers, sparsity 48.8% to" in shown


def test_l1_records_l0_and_l1_before_training_and_after_the_threshold(classifier, tmp_path, sentiment_files):
    step = PruneStep(method="l1", sparsity=0.5, ranking="per_layer", **{"lambda": 0.5}, recover=RECOVER)
    effect = prune.run(classifier, step, context(tmp_path, sentiment_files, artifact=classifier)).history[-1][
        "effect"]
    for name, layer in effect["layers"].items():
        assert layer["nonzeros_before"] == layer["weights"] > layer["nonzeros"]
        assert layer["l1"] < effect["l1_after_training"][name] < layer["l1_before"], name


def test_a_pattern_that_matches_nothing_is_refused_naming_it(classifier, tmp_path, sentiment_files):
    with pytest.raises(RecipeError, match=r"prune\.modules: '\*\.mlp\.\*' matches no"):
        prune.run(classifier, PruneStep(method="magnitude", sparsity=0.5, modules=["*.mlp.*"]),
                  context(tmp_path, sentiment_files))


def test_wanda_refuses_modules_outside_the_blocks(classifier, tmp_path, sentiment_files):
    step = PruneStep(method="wanda", sparsity=0.5, modules=["*.word_embeddings"], calibration=CALIB)
    with pytest.raises(RecipeError, match="word_embeddings is not one"):
        prune.run(classifier, step, context(tmp_path, sentiment_files))


@pytest.mark.parametrize(("settings", "message"), [
    ({"method": "magnitude", "sparsity": 1.0}, "sparsity"),
    ({"method": "magnitude", "sparsity": -0.1}, "sparsity"),
    ({"method": "magnitude"}, "sparsity: method magnitude needs the share"),
    ({"method": "wanda", "nm": [4, 4]}, "nm: N:M keeps N of every M weights, so N must be below M (got 4:4)"),
    ({"method": "wanda", "nm": [2, 4], "sparsity": 0.7}, "contradicts nm 2:4"),
    ({"method": "movement", "sparsity": 0.5}, "method movement learns its scores while the model trains"),
    ({"method": "l1", "sparsity": 0.5, "lambda": 0.1}, "method l1 applies its penalty while the model trains"),
    ({"method": "l1", "sparsity": 0.5, "recover": {}}, "lambda: method l1 needs a penalty"),
    ({"method": "magnitude", "sparsity": 0.5, "schedule": "gradual"}, "add a 'recover' block"),
    ({"method": "magnitude", "sparsity": 0.5, "heads": 0.5}, "heads: not a setting of prune method 'magnitude'"),
    ({"method": "wanda", "sparsity": 0.5, "lambda": 0.1}, "lambda: not a setting of prune method 'wanda'"),
    ({"method": "magnitude", "sparsity": 0.5, "modules": []}, "modules"),
])
def test_recipe_check_names_the_field(settings, message):
    with pytest.raises(ValidationError, match=message.replace("(", r"\(").replace(")", r"\)")):
        PruneStep(**settings)


def test_the_step_declares_what_it_reads_and_makes():
    assert PruneStep(method="wanda", sparsity=0.5).needs_data == ("calib",)
    assert PruneStep(method="magnitude", sparsity=0.5).needs_data == ()
    assert PruneStep(method="movement", sparsity=0.5, recover={}).needs_data == ("train",)
    assert PruneStep(method="magnitude", sparsity=0.5).output_kind(Kind(per_layer_shapes=True)) == Kind(
        per_layer_shapes=True, sparsity="zeros")


@pytest.mark.parametrize(("step", "data", "message"), [
    ({"kind": "prune", "method": "wanda", "sparsity": 0.5}, {"eval": "dev"}, "needs calibration rows"),
    ({"kind": "prune", "method": "movement", "sparsity": 0.5, "recover": {}}, {"eval": "dev"}, "needs data.train"),
])
def test_missing_data_exits_2_before_anything_is_written(tmp_path, sentiment_files, step, data, message, capsys):
    recipe = {"model": "minilm-l6", "task": "sequence-classification",
              "data": {split: {"path": str(sentiment_files[name]), "text": "sentence", "label": "label"}
                       for split, name in data.items()},
              "steps": [step]}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["run", str(tmp_path / "recipe.yaml"), "--out", str(tmp_path / "run")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_pattern_that_matches_nothing_exits_2_and_writes_no_stage(tmp_path, tiny_classifier, sentiment_files,
                                                                     capsys):
    model, tokenizer = tiny_classifier
    model.save_pretrained(tmp_path / "tiny")
    tokenizer.save_pretrained(tmp_path / "tiny")
    recipe = {"model": "tiny", "task": "sequence-classification",
              "data": {"train": {"path": str(sentiment_files["train"]), "text": "sentence"}, "max_length": 32},
              "steps": [{"kind": "prune", "method": "magnitude", "sparsity": 0.5, "modules": ["*.mlp.*"]}],
              "bench": {"enabled": False}}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["run", str(tmp_path / "recipe.yaml"), "--out", str(tmp_path / "run")]) == 2
    error = capsys.readouterr().err
    assert "prune.modules: '*.mlp.*' matches no Linear or Embedding module" in error and "Traceback" not in error
    assert not (tmp_path / "run" / "00-prune").exists()
