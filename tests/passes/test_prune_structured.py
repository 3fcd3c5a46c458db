"""The prune pass, method structured, on the tiny models: importance and rule allocations, L0 gates, recovery,
reload, the recipe contract, and bad input refused before anything is written."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest
import torch
import yaml
from pydantic import ValidationError
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, BertConfig

from compress.algos.units import heads_per_layer, neurons_per_layer
from compress.artifact import Artifact
from compress.cli import main
from compress.context import Context
from compress.data import build_eval_set, load_task_data
from compress.errors import ModelLoadError, RecipeError
from compress.kinds import Kind
from compress.passes import prune, prune_structured
from compress.pipeline import run_pipeline
from compress.recipe import DataConfig, PruneStep
from compress.recipe_loader import load_recipe

RECOVER = {"max_steps": 3, "batch_size": 16, "lr": 1e-3, "warmup_ratio": 0.0}
CALIB = {"samples": 16}


def deeper_classifier(model, layers=4, heads=4):
    """A seeded random classifier like the tiny one, with more blocks and heads to prune."""
    config = BertConfig(**{**model.config.to_dict(), "num_hidden_layers": layers, "num_attention_heads": heads})
    torch.manual_seed(1)
    return type(model)(config).eval()


@pytest.fixture
def classifier(tiny_classifier) -> Artifact:
    model, tokenizer = tiny_classifier
    model = deeper_classifier(model)
    return Artifact("sequence-classification", model.config, tokenizer, model)


@pytest.fixture
def context(tmp_path, sentiment_files):
    def make(**extra) -> Context:
        sources = {"train": {"path": str(sentiment_files["train"]), "text": "sentence"},
                   "eval": {"path": str(sentiment_files["dev"]), "text": "sentence"}, "max_length": 32}
        cfg = DataConfig.model_validate(sources)
        data = load_task_data(cfg, "sequence-classification")
        return Context(stage_dir=tmp_path, task="sequence-classification", max_length=32, data=data, quiet=True,
                       make_eval_set=lambda tok, split: build_eval_set(data, tok, cfg, split), **extra)

    return make


def logits(model, tokenizer):
    inputs = tokenizer(["a fine film", "dull and long, too long"], padding=True, return_tensors="pt")
    with torch.no_grad():
        return model(**inputs).logits


@pytest.mark.parametrize("importance", ["gradient", "activation", "magnitude"])
def test_global_pruning_removes_the_share_asked_and_recovers_from_the_unpruned_model(classifier, context,
                                                                                     importance):
    untouched = {name: tensor.clone() for name, tensor in classifier.model.state_dict().items()}
    ctx = context(resolve_model={"@input": classifier}.__getitem__)
    step = PruneStep(importance=importance, heads=0.5, ffn=0.5, calibration=CALIB, recover=RECOVER)
    result = prune.run(classifier, step, ctx)
    assert sum(heads_per_layer(result.model)) == 8 and sum(neurons_per_layer(result.model)) == 4 * 32
    effect = result.history[-1]["effect"]
    assert effect["after"]["parameters"] < effect["before"]["parameters"]
    assert effect["recovery"]["steps"] == 3 and effect["recovery"]["distilled_from"] == "@input"
    assert result.kind == Kind(per_layer_shapes=True)
    for name, tensor in classifier.model.state_dict().items():  # the input is the teacher: left as it was
        assert torch.equal(tensor, untouched[name]), name


def test_ffn_widths_keep_a_multiple_of_what_a_quantizer_group_divides(classifier, context):
    result = prune.run(classifier, PruneStep(importance="magnitude", ffn=0.6, ffn_multiple_of=16), context())
    widths = neurons_per_layer(result.model)
    assert all(width % 16 == 0 and 16 <= width < 64 for width in widths)
    plain = prune.run(classifier, PruneStep(importance="magnitude", ffn=0.6), context())
    assert any(width % 16 for width in neurons_per_layer(plain.model))  # what the multiple changed


def test_a_pruned_artifact_reloads_with_plain_from_pretrained(classifier, context, tmp_path):
    step = PruneStep(importance="magnitude", allocation="per_layer", heads=[1, 2, 3, 4], ffn=[8, 16, 24, 64])
    result = prune.run(classifier, step, context())
    result.save(tmp_path / "pruned")
    script = ("import sys, compress, torch\n"
              "from transformers import AutoModelForSequenceClassification as A\n"
              "m = A.from_pretrained(sys.argv[1]).eval()\n"
              "print([l.intermediate.dense.out_features for l in m.bert.encoder.layer])\n"
              "print([l.attention.self.num_attention_heads for l in m.bert.encoder.layer])\n")
    shown = subprocess.run([sys.executable, "-c", script, str(tmp_path / "pruned")], capture_output=True, text=True,
                           check=True).stdout.split("\n")
    assert shown[:2] == ["[8, 16, 24, 64]", "[1, 2, 3, 4]"]
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "pruned").eval()
    assert torch.allclose(logits(reloaded, result.tokenizer), logits(result.model, result.tokenizer), atol=1e-6)
    assert Artifact.load(tmp_path / "pruned").kind.per_layer_shapes


@pytest.mark.parametrize(("settings", "message"), [
    ({"allocation": "uniform", "heads": 0.9}, "heads: block 0 would keep no heads"),
    ({"allocation": "top_k", "heads": 5}, "heads: block 0 has 4, so it cannot keep 5"),
    ({"allocation": "per_layer", "ffn": [8, 8]}, "ffn: allocation per_layer needs one count per block (4)"),
    ({"layers": [1, 9]}, "layers: index 9 is out of range for a 4-block model"),
    ({"layers": [0, 1, 2, 3]}, "layers: removing 4 of 4 blocks leaves none"),
    ({"allocation": "top_k", "ffn": 24, "ffn_multiple_of": 16},
     "ffn: block 0 keeps 24, not a multiple of ffn_multiple_of (16)"),
    ({"ffn": 0.5, "ffn_multiple_of": 128}, "ffn_multiple_of: block 0 has 64 ffn units, fewer than 128"),
])
def test_impossible_targets_are_refused_before_any_work(classifier, context, settings, message, monkeypatch):
    monkeypatch.setattr(prune_structured, "unit_scores", lambda *args: pytest.fail("importance measured before the check"))
    step = PruneStep(calibration=CALIB, **settings)
    with pytest.raises(RecipeError, match=message.replace("(", r"\(").replace(")", r"\)")):
        prune.run(classifier, step, context())


def test_global_ranking_keeps_a_head_per_block_unless_blocks_may_go(classifier, context):
    model = classifier.model
    with torch.no_grad():  # block 2's heads contribute nothing: every one of them ranks last
        model.bert.encoder.layer[2].attention.output.dense.weight.zero_()
        model.bert.encoder.layer[2].attention.self.query.weight.zero_()
    kept = prune.run(classifier, PruneStep(importance="magnitude", heads=0.3), context())
    assert heads_per_layer(kept.model)[2] == 1
    assert kept.history[-1]["effect"]["heads_kept_at_minimum"] == [2]
    dropped = prune.run(classifier, PruneStep(importance="magnitude", heads=0.3, allow_layer_drop=True), context())
    assert len(heads_per_layer(dropped.model)) == 3
    assert dropped.history[-1]["effect"]["layers_removed"] == [2]


def test_layers_by_ratio_go_where_skipping_costs_least(classifier, context):
    # Block 1 becomes the identity: skipping it changes nothing.
    classifier.model.bert.encoder.layer[1].register_forward_hook(lambda module, args, output: (args[0],))
    result = prune.run(classifier, PruneStep(layers=0.25, calibration=CALIB), context())
    assert result.history[-1]["effect"]["layers_removed"] == [1]
    assert result.kind == Kind()  # whole blocks only: every remaining block keeps its shapes


def test_l0_gates_train_toward_the_target_then_remove_exactly_it(classifier, context):
    ctx = context(resolve_model={"@input": classifier}.__getitem__)
    step = PruneStep(importance="l0", heads=0.5, ffn=0.25, l0={"lr": 0.2, "warmup": 0.2, "share": 0.75},
                     recover={**RECOVER, "max_steps": 16, "epochs": 3})
    result = prune.run(classifier, step, ctx)
    assert sum(heads_per_layer(result.model)) == 8 and sum(neurons_per_layer(result.model)) == 4 * 48
    effect = result.history[-1]["effect"]
    record = effect["l0"]
    assert record["gate_steps"] == 12 and record["gate_training"]["steps"] == 12
    assert effect["recovery"]["steps"] == 4  # the rest of the steps train the pruned model
    # The penalty pulled the expected share of open heads down from where the gates started.
    assert record["expected_open_at_start"]["heads"] == pytest.approx(0.9)
    assert record["expected_open"]["heads"] < 0.8
    assert torch.isfinite(logits(result.model, result.tokenizer)).all()


def test_l0_refuses_to_train_its_gates_in_several_processes(classifier, context, monkeypatch):
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    step = PruneStep(importance="l0", heads=0.5, recover=RECOVER)
    with pytest.raises(RecipeError, match="l0 gates train in one process"):
        prune.run(classifier, step, context(resolve_model={"@input": classifier}.__getitem__))


def test_grouped_query_heads_leave_every_key_value_group_evenly(tiny_causal_lm, tmp_path, sentiment_files):
    model, tokenizer = tiny_causal_lm
    lm = Artifact("causal-lm", model.config, tokenizer, copy.deepcopy(model))
    cfg = DataConfig.model_validate({"train": {"path": str(sentiment_files["train"]), "text": "sentence"},
                                     "max_length": 32})
    data = load_task_data(cfg, "causal-lm")
    ctx = Context(stage_dir=tmp_path, task="causal-lm", max_length=32, data=data, quiet=True)
    result = prune.run(lm, PruneStep(allocation="uniform", heads=0.5, ffn=0.5, calibration=CALIB), ctx)
    assert result.kind == Kind(per_layer_shapes=True)
    assert heads_per_layer(result.model) == [2, 2]  # 4 query heads over 2 key-value groups: one left in each
    assert result.model.config.layer_shapes == {"intermediate_size": [32, 32], "num_attention_heads": [2, 2]}
    result.save(tmp_path / "lm")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "lm").eval()
    ids = tokenizer(["the play"], return_tensors="pt")
    assert torch.allclose(reloaded(**ids).logits, result.model(**ids).logits, atol=1e-5)
    assert reloaded.generate(**ids, max_new_tokens=3, do_sample=False).shape[1] == ids["input_ids"].shape[1] + 3
    with pytest.raises(RecipeError, match="multiple of 2"):
        prune.run(lm, PruneStep(allocation="top_k", heads=3, calibration=CALIB), ctx)


def test_a_family_outside_the_table_is_refused_with_the_known_ones(classifier, context):
    classifier.model.config.model_type = "mystery"
    with pytest.raises(ModelLoadError, match="known: bert, roberta, distilbert, gpt2, llama"):
        prune.run(classifier, PruneStep(importance="magnitude", heads=0.5), context())


@pytest.mark.parametrize(("settings", "message"), [
    ({"heads": 1.0}, "heads: allocation global takes a ratio in [0, 1) removed"),
    ({"heads": -0.1}, "heads: allocation global takes a ratio in [0, 1) removed"),
    ({"allocation": "top_k", "heads": 0.5}, "heads: allocation top_k takes a count kept in every block"),
    ({}, "give what to remove"),
    ({"heads": 0.5, "importance": "l0"}, "add a 'recover' block"),
    ({"heads": 0.5, "importance": "l0", "allocation": "uniform", "recover": {}}, "allocation must be global"),
    ({"heads": 0.5, "recover": {"attention_weight": 1.0}}, "recover.attention_weight"),
    ({"layers": 1.5}, "less than 1"),
    ({"layers": [2, 2]}, "list each block once"),
    ({"heads": 0.5, "ffn_multiple_of": 64}, "ffn_multiple_of: rounds the FFN neurons each block keeps; give ffn"),
    ({"heads": 0.5, "sparsity": 0.5}, "sparsity"),
])
def test_recipe_check_names_the_field(settings, message):
    with pytest.raises(ValidationError, match=message.replace("(", r"\(").replace("[", r"\[")
                       .replace(")", r"\)")):
        PruneStep(**settings)


def test_the_step_declares_what_it_reads():
    assert PruneStep(importance="magnitude", heads=0.5).needs_data == ()
    assert PruneStep(heads=0.5).needs_data == ("calib",)
    assert PruneStep(importance="magnitude", heads=0.5, recover={}).needs_data == ("train",)
    assert PruneStep(heads=0.5, recover={}).reads_labels
    assert not PruneStep(heads=0.5, recover={"alpha": 1.0}).reads_labels
    assert PruneStep(layers=[1]).output_kind(Kind()) == Kind()
    assert PruneStep(ffn=0.5).output_kind(Kind()) == Kind(per_layer_shapes=True)


def test_pipeline_prune_export_fuse_verifies_with_per_block_head_counts(tmp_path, tiny_classifier,
                                                                         sentiment_files, capsys):
    model, tokenizer = tiny_classifier
    source = tmp_path / "four-heads"
    deeper_classifier(model).save_pretrained(source)
    tokenizer.save_pretrained(source)
    recipe = {"model": str(source), "task": "sequence-classification",
              "data": {"train": {"path": str(sentiment_files["train"]), "text": "sentence"},
                       "eval": {"path": str(sentiment_files["dev"]), "text": "sentence"}, "max_length": 32},
              "steps": [{"kind": "prune", "importance": "magnitude", "allocation": "per_layer",
                         "heads": [1, 2, 3, 4], "ffn": [16, 16, 32, 48]},
                        {"kind": "export"}, {"kind": "ort-fuse"}],
              "bench": {"enabled": False}}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    run_pipeline(load_recipe(path), tmp_path / "run", quiet=True)
    fused = json.loads((tmp_path / "run" / "02-ort-fuse" / "compress.json").read_text())["history"][-1]["effect"]
    assert fused["fusions"]["Attention"] == 4  # one fused attention per block, each with its own head count
    assert main(["inspect", str(tmp_path / "run" / "00-prune")]) == 0
    assert "after={heads [1, 2, 3, 4], ffn [16, 16, 32, 48]" in capsys.readouterr().out
