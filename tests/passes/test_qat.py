"""The qat pass on the tiny classifier: calibration, training with and without distillation, resume, and the
recipe contract around it."""

from __future__ import annotations

import copy
import logging

import numpy as np
import pytest
import torch
import yaml
from pydantic import ValidationError
from torch import nn

from compress.algos.fake_quant import FakeQuantLinear, input_ranges, quantize_linears
from compress.algos.fake_quant_embedding import FakeQuantEmbedding
from compress.artifact import Artifact
from compress.context import Context
from compress.data import build_eval_set, load_task_data
from compress.errors import DataError, RecipeError
from compress.eval.runners import OpenVinoRunner, OrtRunner, TorchRunner
from compress.kinds import Kind
from compress.passes import qat
from compress.pipeline import run_pipeline
from compress.plan import plan_stages
from compress.recipe import DataConfig, ExportStep, PTQStep, QATStep
from compress.recipe_loader import load_recipe
from compress.train import TrainingRun

SHORT = {"max_steps": 4, "batch_size": 16, "lr": 1e-3, "warmup_ratio": 0.0, "calibration": {"samples": 16}}


@pytest.fixture
def classifier(tiny_classifier) -> Artifact:
    model, tokenizer = tiny_classifier
    return Artifact("sequence-classification", model.config, tokenizer, model)


@pytest.fixture
def context(tmp_path, sentiment_files, classifier):
    def make(calib_rows: int | None = None, **extra) -> Context:
        sources = {"train": {"path": str(sentiment_files["train"]), "text": "sentence"},
                   "eval": {"path": str(sentiment_files["dev"]), "text": "sentence"}, "max_length": 32}
        if calib_rows is not None:
            sources["calib"] = {"path": str(sentiment_files["dev"]), "text": "sentence", "limit": calib_rows}
        cfg = DataConfig.model_validate(sources)
        data = load_task_data(cfg, "sequence-classification")
        return Context(stage_dir=tmp_path, task="sequence-classification", max_length=32, data=data, quiet=True,
                       make_eval_set=lambda tok, split: build_eval_set(data, tok, cfg, split), **extra)

    return make


def quantized(model) -> dict[str, FakeQuantLinear]:
    return {name: module for name, module in model.named_modules() if isinstance(module, FakeQuantLinear)}


def test_qat_trains_fake_quant_layers_distilled_from_its_input(classifier, context):
    float_state = {name: tensor.clone() for name, tensor in classifier.model.state_dict().items()}
    ctx = context(resolve_model={"@input": classifier}.__getitem__)
    step = QATStep(**{**SHORT, "calibration": {"samples": 32}}, keep_fp32=["pooler"])
    result = qat.run(classifier, step, ctx)

    assert result.kind == Kind(weights="fake-quant")
    layers = quantized(result.model)
    assert len(layers) == 13 and "bert.pooler.dense" not in layers  # 2 blocks x 6, and the classifier
    effect = result.history[-1]["effect"]
    assert (effect["quantized_linears"], effect["kept_fp32"], effect["calibration_rows"]) == (13, 1, 32)
    assert effect["steps"] == 4 and effect["distilled_from"] == "@input"
    # The activation scales start at the calibration range and are then learned.
    recalibrated = copy.deepcopy(classifier.model)
    quantize_linears(recalibrated, list(layers), ranges=input_ranges(
        recalibrated, list(layers), ctx.calibration(classifier.tokenizer, step.calibration.samples)))
    moved = [(layers[name].input_scale - quantized(recalibrated)[name].input_scale).abs().item() for name in layers]
    assert min(moved) > 0
    assert all(torch.equal(float_state[name], tensor) for name, tensor in classifier.model.state_dict().items())
    assert not quantized(classifier.model)  # the input, the teacher, stays float


def test_embedding_tables_are_quantized_per_row_and_frozen_ones_learned_around(classifier, context):
    step = QATStep(**SHORT, embedding_bits=4, freeze_embeddings=True)
    result = qat.run(classifier, step, context(resolve_model={"@input": classifier}.__getitem__))

    embeddings = result.model.bert.embeddings
    assert [type(table) for table in (embeddings.word_embeddings, embeddings.position_embeddings)] == [
        FakeQuantEmbedding, FakeQuantEmbedding]
    assert type(embeddings.token_type_embeddings) is nn.Embedding
    assert result.history[-1]["effect"]["quantized_embeddings"] == {
        "bert.embeddings.word_embeddings": "int4 per row", "bert.embeddings.position_embeddings": "int4 per row"}
    assert torch.equal(embeddings.word_embeddings.weight, classifier.model.bert.embeddings.word_embeddings.weight)
    assert embeddings.word_embeddings.codes().abs().max() == 7


def test_without_a_teacher_it_trains_on_the_labels_alone(classifier, context):
    step = QATStep(**SHORT, distill_from="none")
    result = qat.run(classifier, step, context())  # no model references: a teacher would fail to resolve
    assert result.history[-1]["effect"]["distilled_from"] == "none"
    assert result.history[-1]["effect"]["final_loss"] > 0


def test_a_resumed_qat_run_ends_where_an_uninterrupted_one_does(classifier, context, tmp_path, monkeypatch):
    step = QATStep(**SHORT, distill_from="none", checkpoint_every=2)
    whole = qat.run(classifier, step, context()).model.state_dict()

    real_step, calls = TrainingRun.optimizer_step, []

    def crash_at_step_three(self, group):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        real_step(self, group)

    monkeypatch.setattr(TrainingRun, "optimizer_step", crash_at_step_three)
    ctx = context(checkpoint_dir=tmp_path / "checkpoints")
    with pytest.raises(KeyboardInterrupt):
        qat.run(classifier, step, ctx)
    monkeypatch.setattr(TrainingRun, "optimizer_step", real_step)
    resumed = qat.run(classifier, step, ctx)
    assert resumed.history[-1]["effect"]["resumed_from_step"] == 2
    state = resumed.model.state_dict()
    assert any(name.endswith("input_scale") for name in state)
    assert all(torch.allclose(state[name], whole[name], atol=1e-6) for name in whole)


def test_calibration_rows_fewer_than_asked_warn_and_none_is_an_error(classifier, context, caplog):
    step = QATStep(max_steps=1, batch_size=16, distill_from="none", calibration={"samples": 256})
    with caplog.at_level(logging.WARNING, logger="compress"):
        result = qat.run(classifier, step, context(calib_rows=10))
    assert "qat: 256 calibration rows asked for, 10 available; using them all" in caplog.text
    assert result.history[-1]["effect"]["calibration_rows"] == 10

    ctx = context()
    ctx.data.train = None  # and no data.calib
    with pytest.raises(DataError, match="data.calib"):
        qat.run(classifier, step, ctx)


def test_an_already_fake_quant_model_and_other_calibration_methods_are_refused(classifier, context):
    model = copy.deepcopy(classifier.model)
    quantize_linears(model, ["classifier"])
    fake_quant = Artifact("sequence-classification", model.config, classifier.tokenizer, model,
                          kind=Kind(weights="fake-quant"))
    with pytest.raises(RecipeError, match="qat: qat needs float weights, not fake-quant"):
        qat.run(fake_quant, QATStep(), context())
    with pytest.raises(ValidationError, match="calibration.method: .*min/max"):
        QATStep(calibration={"method": "entropy"})
    with pytest.raises(ValidationError, match="attention_weight: attention maps need eager"):
        QATStep(attention_weight=1.0)


def test_the_recipe_contract_places_qat_on_float_torch_models_only():
    kinds = [stage.kind for stage in plan_stages([QATStep(), ExportStep()])]
    assert kinds[1:] == [Kind(weights="fake-quant"), Kind("onnx", "int8-qdq")]
    with pytest.raises(ValueError, match=r"steps\[2\] \(qat\) .*qat works on a torch model"):
        plan_stages([ExportStep(), PTQStep(), QATStep()])
    with pytest.raises(ValueError, match=r"steps\[1\] \(qat\) .*needs float weights, not fake-quant"):
        plan_stages([QATStep(), QATStep()])


def test_a_qat_recipe_saves_reloads_and_exports_a_verified_qdq_graph(tmp_path, tiny_bert_dir, sentiment_files,
                                                                     classification_evalset):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "model": str(tiny_bert_dir), "task": "sequence-classification",
        "data": {"train": {"path": str(sentiment_files["train"]), "text": "sentence"},
                 "eval": {"path": str(sentiment_files["dev"]), "text": "sentence"}, "max_length": 32},
        "steps": [{"kind": "qat", **SHORT, "max_steps": 2,
                   "embedding_bits": {"word_embeddings": 3, "position": 4}}, {"kind": "export"}],
        "bench": {"enabled": False}}))
    run_pipeline(load_recipe(recipe), tmp_path / "run", quiet=True)

    trained = Artifact.load(tmp_path / "run" / "00-qat")
    assert len(quantized(trained.model)) == 14 and type(trained.model.classifier) is not nn.Linear
    assert trained.model.bert.embeddings.word_embeddings.bits == 3
    exported = Artifact.load(tmp_path / "run" / "01-export")
    assert exported.kind == Kind("onnx", "int8-qdq")
    effect = exported.history[-1]["effect"]
    assert effect["agreement"] == 1.0
    features = classification_evalset.features
    expected = TorchRunner(trained.model).logits(features)
    for runner in (OrtRunner, OpenVinoRunner):  # the table lookups are default-domain ops both runtimes run
        assert np.abs(runner(exported.onnx_path).logits(features) - expected).max() < 1e-4 * np.abs(expected).max()
