"""The README's example of writing a pass that trains with a teacher, run for real on the tiny models.

A real pass lives in compress/passes/<kind>.py with its step class in compress/recipe.py; this one is written
inline so the example stays next to its proof.
"""

from __future__ import annotations

import copy
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F

from compress.artifact import Artifact, step_record
from compress.context import Context
from compress.data import build_eval_set, load_task_data
from compress.kinds import Kind
from compress.recipe import DataConfig, ModelRef, Step
from compress.settings import TrainSettings
from compress.train import Callback, scores_on, train


class SoftenStep(TrainSettings, Step):
    """Train the input model towards a teacher's soft labels (logit distillation, alpha = 1)."""

    kind: Literal["soften"] = "soften"
    compresses: ClassVar[bool] = False
    needs_data: ClassVar[tuple[str, ...]] = ("train",)
    teacher: ModelRef = "@input"  # resolved by the pipeline, content hash in the stage key
    temperature: float = 2.0

    def output_kind(self, given: Kind) -> Kind:
        return given


class FrozenBias(Callback):
    """A callback composes with the loss: here it holds the classifier bias where it started."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.start = model.classifier.bias.detach().clone()

    def on_step_end(self, state, model) -> None:
        with torch.no_grad():
            model.classifier.bias.copy_(self.start)


def run(artifact: Artifact, step: SoftenStep, ctx: Context) -> Artifact:
    teacher = ctx.model(step.teacher).model.eval().requires_grad_(False)
    student, t = artifact.model, step.temperature

    def distill_loss(model, batch):
        logits = model(**batch).logits
        with torch.no_grad():
            target = teacher(**batch).logits
        return F.kl_div(F.log_softmax(logits / t, -1), F.softmax(target / t, -1), reduction="batchmean") * t * t

    summary = train(student, ctx.train_loader(artifact.tokenizer, step.batch_size), step, seed=ctx.seed,
                    loss_fn=distill_loss, callbacks=[FrozenBias(student)],
                    evaluate=scores_on(ctx.validation_set(artifact.tokenizer)), desc="soften", quiet=ctx.quiet)
    return artifact.evolve(step_record(step, **summary), model=student.eval())


def test_a_pass_that_trains_with_a_teacher(tmp_path, tiny_classifier, sentiment_files):
    teacher_model, tokenizer = tiny_classifier
    teacher = Artifact("sequence-classification", teacher_model.config, tokenizer, teacher_model)
    torch.manual_seed(1)
    student_model = copy.deepcopy(teacher_model)
    with torch.no_grad():
        for parameter in student_model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.5)
    student = Artifact("sequence-classification", student_model.config, tokenizer, student_model)

    cfg = DataConfig.model_validate({"train": {"path": str(sentiment_files["train"]), "text": "sentence"},
                                     "eval": {"path": str(sentiment_files["dev"]), "text": "sentence"},
                                     "max_length": 32})
    data = load_task_data(cfg, "sequence-classification")
    ctx = Context(stage_dir=tmp_path, task="sequence-classification", max_length=32, data=data, quiet=True,
                  make_eval_set=lambda tok, split: build_eval_set(data, tok, cfg, split),
                  resolve_model={"@teacher": teacher}.__getitem__)
    evals = build_eval_set(data, tokenizer, cfg, "validation")

    def gap(model) -> float:  # how far the student's distribution is from the teacher's
        batch = {k: torch.from_numpy(v) for k, v in evals.features.items()}
        with torch.no_grad():
            return F.kl_div(F.log_softmax(model(**batch).logits, -1), F.softmax(teacher_model(**batch).logits, -1),
                            reduction="batchmean").item()

    bias = student_model.classifier.bias.detach().clone()
    before = gap(student_model)
    step = SoftenStep(teacher="@teacher", epochs=3, batch_size=16, lr=3e-3, warmup_ratio=0.0)
    softened = run(student, step, ctx)

    assert gap(softened.model) < before / 2
    assert torch.equal(softened.model.classifier.bias, bias)
    record = softened.history[-1]
    assert record["kind"] == "soften" and record["config"]["teacher"] == "@teacher"
    assert record["effect"]["steps"] == 3 * 12 and len(record["effect"]["evals"]) == 3
    assert step.model_refs() == {"teacher": "@teacher"}
