"""The distill pass on the tiny models, from recipes (through the pipeline) and from Python."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

from compress.algos.kd import logit_kd
from compress.algos.students import select_layers
from compress.artifact import Artifact
from compress.context import Context
from compress.data import build_eval_set, load_task_data
from compress.errors import RecipeError
from compress.kinds import Kind
from compress.passes import distill
from compress.pipeline import run_pipeline
from compress.recipe import DataConfig, DistillStep
from compress.recipe_loader import load_recipe

TEACHER = {"kind": "finetune", "epochs": 6, "batch_size": 16, "lr": 5e-3, "warmup_ratio": 0.0}
DISTILL = {"kind": "distill", "student": {"layers": [1]}, "epochs": 6, "batch_size": 16, "lr": 5e-3,
           "warmup_ratio": 0.0}


@pytest.fixture
def classification_recipe(tmp_path, tiny_bert_dir, sentiment_files):
    def write(*steps: dict) -> str:
        path = tmp_path / "recipe.yaml"
        path.write_text(yaml.safe_dump({
            "model": str(tiny_bert_dir), "task": "sequence-classification",
            "data": {"train": {"path": str(sentiment_files["train"]), "text": "sentence"},
                     "eval": {"path": str(sentiment_files["dev"]), "text": "sentence"}, "max_length": 32},
            "steps": list(steps), "bench": {"enabled": False}}))
        return path

    return write


def test_a_one_layer_student_learns_from_its_two_layer_teacher(tmp_path, classification_recipe):
    step = {**DISTILL, "alpha": 0.5, "hidden_weight": 1.0, "attention_weight": 1.0, "relation_weight": 1.0}
    out = tmp_path / "run"
    run_pipeline(load_recipe(classification_recipe(TEACHER, step)), out, quiet=True)

    student = Artifact.load(out / "01-distill")
    assert student.model.config.num_hidden_layers == 1 and student.kind.format == "torch"
    assert not [name for name in student.model.state_dict() if "distill_loss" in name]  # projections dropped
    effect = student.history[-1]["effect"]
    assert effect["student"] == {"layers_of_teacher": [1]} and effect["layer_map"] == [[0, 0], [1, 2]]
    assert effect["evals"][-1]["accuracy"] >= 0.85  # the mood words give the label away
    manifest = json.loads((out / "manifest.json").read_text())
    assert [s["input"] for s in manifest["stages"]] == ["base", "00-finetune"]


def test_a_narrower_student_distils_through_projections(tmp_path, classification_recipe):
    step = {**DISTILL, "student": {"num_layers": 1, "hidden_size": 16, "num_heads": 2, "intermediate_size": 32},
            "alpha": 1.0, "hidden_weight": 1.0, "relation_weight": 1.0}
    out = tmp_path / "run"
    run_pipeline(load_recipe(classification_recipe(TEACHER, step)), out, quiet=True)
    student = Artifact.load(out / "01-distill")
    assert (student.config.hidden_size, student.config.num_hidden_layers) == (16, 1)
    assert student.history[-1]["effect"]["student"]["init"] == "teacher"


def test_token_level_distillation_of_a_causal_lm(tmp_path, tiny_causal_lm, text_file):
    teacher_model, tokenizer = tiny_causal_lm
    cfg = DataConfig.model_validate({"train": {"path": str(text_file)}, "eval": {"path": str(text_file)},
                                     "max_length": 32, "max_eval_tokens": 512})
    data = load_task_data(cfg, "causal-lm")
    teacher = Artifact("causal-lm", teacher_model.config, tokenizer, teacher_model)
    ctx = Context(stage_dir=tmp_path, task="causal-lm", max_length=32, data=data, quiet=True,
                  make_eval_set=lambda tok, split: build_eval_set(data, tok, cfg, split),
                  resolve_model={"@input": teacher}.__getitem__)
    evals = build_eval_set(data, tokenizer, cfg, "validation")
    batch = {k: torch.from_numpy(v) for k, v in evals.features.items()}
    mask = torch.from_numpy(evals.features["attention_mask"]).bool()

    def gap(model) -> float:  # KL(teacher || student) per real token: what token-level KD minimises
        with torch.no_grad():
            return logit_kd(model(**batch).logits, teacher_model(**batch).logits, 1.0, mask).item()

    untrained = gap(select_layers(teacher_model, [1]))
    step = DistillStep(student={"layers": [1]}, alpha=1.0, temperature=1.0, epochs=4, batch_size=8, lr=3e-3,
                       warmup_ratio=0.0)
    before = {name: tensor.clone() for name, tensor in teacher_model.state_dict().items()}
    student = distill.run(teacher, step, ctx)
    assert gap(student.model) < untrained / 2
    assert student.model.config.num_hidden_layers == 1 and teacher_model.config.num_hidden_layers == 2
    after = teacher_model.state_dict()  # the teacher (a shared fixture) is untouched
    assert all(torch.equal(before[name], after[name]) for name in before)
    assert all(p.requires_grad for p in teacher_model.parameters())


@pytest.mark.parametrize(("step", "message"), [
    # Checked against the base model's depth before any work (compress/depths.py).
    ({"student": {"layers": [1, 5]}}, r"steps\[0\].student.layers: block 5 does not exist: the teacher has 2 blocks"),
    ({"layer_map": [[0, 0], [1, 9]]}, r"distill.layer_map: .*9"),
])
def test_settings_the_teacher_cannot_meet_fail_the_stage_with_one_line(tmp_path, classification_recipe, step,
                                                                      message):
    out = tmp_path / "run"
    with pytest.raises(RecipeError, match=message):
        run_pipeline(load_recipe(classification_recipe({**DISTILL, **step, "max_steps": 1})), out, quiet=True)
    assert not (out / "00-distill").exists() and not (out / ".00-distill.partial").exists()


def test_a_teacher_with_another_vocabulary_is_refused(tmp_path, classification_recipe, tiny_llama_dir):
    recipe = classification_recipe({**DISTILL, "teacher": str(tiny_llama_dir), "max_steps": 1})
    with pytest.raises(RecipeError, match="distill.teacher: .* has another vocabulary"):
        run_pipeline(load_recipe(recipe), tmp_path / "run", quiet=True)




def _classification_context(tmp_path, sentiment_files, **train_source):
    cfg = DataConfig.model_validate({"train": {"path": str(sentiment_files["train"]), "text": "sentence",
                                               **train_source},
                                     "eval": {"path": str(sentiment_files["dev"]), "text": "sentence"},
                                     "max_length": 32})
    data = load_task_data(cfg, "sequence-classification")
    return data, lambda tok, split: build_eval_set(data, tok, cfg, split)


def test_cached_teacher_logits_train_the_same_student(tmp_path, tiny_classifier, sentiment_files):
    model, tokenizer = tiny_classifier
    teacher = Artifact("sequence-classification", model.config, tokenizer, model)
    data, evals = _classification_context(tmp_path, sentiment_files)
    students = {}
    for cached in (False, True):
        ctx = Context(stage_dir=tmp_path / f"stage-{cached}", task="sequence-classification", max_length=32,
                      data=data, make_eval_set=evals, resolve_model={"@input": teacher}.__getitem__, quiet=True,
                      checkpoint_dir=tmp_path / f"checkpoints-{cached}")
        step = DistillStep(student={"layers": [1]}, cache_teacher=cached, epochs=3, batch_size=16, lr=5e-3)
        students[cached] = distill.run(teacher, step, ctx).model.state_dict()
    assert all(torch.allclose(students[False][k], students[True][k], atol=1e-6) for k in students[False])
    kept = load_file(tmp_path / "checkpoints-True" / "teacher-logits-0.safetensors")
    assert len(kept) == 180 and next(iter(kept.values())).shape == (2,)  # every training row, once


def test_unlabelled_text_distils_with_alpha_one(tmp_path, tiny_classifier, sentiment_files):
    model, tokenizer = tiny_classifier
    teacher = Artifact("sequence-classification", model.config, tokenizer, model)
    unlabelled = tmp_path / "unlabelled.tsv"
    unlabelled.write_text(sentiment_files["train"].read_text().replace("\tlabel", "\tmood"))
    data, evals = _classification_context(tmp_path, {"train": unlabelled, "dev": sentiment_files["dev"]}, label=None)
    ctx = Context(stage_dir=tmp_path, task="sequence-classification", max_length=32, data=data, quiet=True,
                  make_eval_set=evals, resolve_model={"@input": teacher}.__getitem__)
    student = distill.run(teacher, DistillStep(student={"layers": [1]}, alpha=1.0, max_steps=3, batch_size=16), ctx)
    assert student.history[-1]["effect"]["steps"] == 3 and student.history[-1]["effect"]["evals"] == []


def test_cache_teacher_is_refused_where_it_cannot_work(tmp_path):
    with pytest.raises(ValueError, match="cache_teacher keeps the teacher's logits only"):
        DistillStep(cache_teacher=True, hidden_weight=1.0)
    recipe = tmp_path / "lm.yaml"
    recipe.write_text(yaml.safe_dump({"model": "smollm2-135m", "task": "causal-lm",
                                      "data": {"train": {"path": "x.txt"}},
                                      "steps": [{"kind": "distill", "alpha": 1.0, "cache_teacher": True}]}))
    with pytest.raises(RecipeError, match=r"steps\[0\].cache_teacher: a causal LM's logits"):
        load_recipe(recipe)


@pytest.mark.gpu
def test_distillation_on_cuda_in_bf16(tmp_path, tiny_classifier, sentiment_files):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    model, tokenizer = tiny_classifier
    teacher = Artifact("sequence-classification", model.config, tokenizer, model)
    data, evals = _classification_context(tmp_path, sentiment_files)
    ctx = Context(stage_dir=tmp_path, task="sequence-classification", max_length=32, data=data, quiet=True,
                  make_eval_set=evals, resolve_model={"@input": teacher}.__getitem__, device="cuda")
    step = DistillStep(student={"layers": [1]}, hidden_weight=1.0, attention_weight=1.0, precision="bf16",
                       max_steps=4, batch_size=16)
    student = distill.run(teacher, step, ctx)
    assert next(student.model.parameters()).device.type == "cuda"
    assert student.history[-1]["effect"]["precision"] == "bf16"


def test_gradient_checkpointing_trains_and_is_switched_off_after(tmp_path, tiny_classifier, sentiment_files):
    model, tokenizer = tiny_classifier
    teacher = Artifact("sequence-classification", model.config, tokenizer, model)
    data, evals = _classification_context(tmp_path, sentiment_files)
    ctx = Context(stage_dir=tmp_path, task="sequence-classification", max_length=32, data=data, quiet=True,
                  make_eval_set=evals, resolve_model={"@input": teacher}.__getitem__)
    step = DistillStep(student={"layers": [1]}, gradient_checkpointing=True, hidden_weight=1.0, max_steps=3,
                       batch_size=16)
    student = distill.run(teacher, step, ctx)
    assert not student.model.is_gradient_checkpointing
    assert student.history[-1]["effect"]["steps"] == 3


def test_the_recover_block_shares_the_loss_and_names_its_teacher():
    from compress.recipe import _model_refs
    from compress.settings import RecoverSettings

    recover = RecoverSettings(epochs=2, hidden_weight=1.0)
    assert (recover.distill_from, recover.alpha, recover.temperature) == ("@input", 0.5, 2.0)
    assert _model_refs(recover) == {"distill_from": "@input"}
    assert _model_refs(RecoverSettings(distill_from="none")) == {}
    with pytest.raises(ValueError, match="temperature"):
        RecoverSettings(temperature=0)


def test_a_student_taken_from_a_sparse_teacher_keeps_its_zeros(tmp_path, tiny_classifier, sentiment_files):
    model, tokenizer = tiny_classifier
    sparse = copy.deepcopy(model)
    with torch.no_grad():
        for module in sparse.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight[:, ::2] = 0  # every other input column
    teacher = Artifact("sequence-classification", sparse.config, tokenizer, sparse, kind=Kind(sparsity="zeros"))
    data, evals = _classification_context(tmp_path, sentiment_files)
    ctx = Context(stage_dir=tmp_path, task="sequence-classification", max_length=32, data=data, quiet=True,
                  make_eval_set=evals, resolve_model={"@input": teacher}.__getitem__)
    step = DistillStep(student={"layers": [1]}, max_steps=4, batch_size=16, lr=5e-2)
    student = distill.run(teacher, step, ctx)
    assert student.kind.sparsity == "zeros"
    blocks = [m for name, m in student.model.named_modules() if isinstance(m, torch.nn.Linear) and ".layer." in name]
    assert blocks and all((module.weight[:, ::2] == 0).all() and (module.weight[:, 1::2] != 0).all()
                          for module in blocks)
