"""Distil a teacher into a smaller student: soft logits, hidden states, attention maps, attention relations."""

from __future__ import annotations

import copy
import os
from contextlib import ExitStack
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from compress.algos.kd import DistillLoss, capture_qkv, check_layer_map, make_projections, uniform_layer_map
from compress.algos.masking import held_zeros
from compress.algos.students import (
    default_layers,
    same_vocabulary,
    select_layers,
    smaller_config,
    student_from_config,
)
from compress.arch import TASKS, family
from compress.artifact import Artifact, step_record
from compress.context import Context
from compress.errors import RecipeError
from compress.recipe import DistillStep
from compress.train import Callback, freeze_embeddings, scores_on, train, trainability_kept


def run(artifact: Artifact, step: DistillStep, ctx: Context) -> Artifact:
    teacher_artifact = ctx.model(step.teacher)
    if not same_vocabulary(teacher_artifact.tokenizer, artifact.tokenizer):
        raise RecipeError(f"distill.teacher: {step.teacher} has another vocabulary than the model it teaches; "
                          "teacher and student must share a tokenizer")
    teacher = teacher_artifact.model.eval()
    student, made = build_student(step, teacher_artifact, ctx)
    loss = distill_loss(step, student, teacher)
    attention = {model: model.config._attn_implementation for model in (student, teacher)}
    if loss.needs_attentions:  # sdpa kernels return no attention maps
        for model in attention:
            model.set_attn_implementation("eager")
    if step.gradient_checkpointing:
        student.gradient_checkpointing_enable()
    validation = ctx.validation_set(artifact.tokenizer)
    cache = TeacherLogits(ctx.checkpoint_dir) if step.cache_teacher else None
    # A student taken from a sparse teacher's blocks keeps their zeros.
    held = [held_zeros(student)] if teacher_artifact.kind.sparsity or artifact.kind.sparsity else []
    with trainability_kept(student):
        frozen = freeze_embeddings(student) if step.freeze_embeddings else 0
        # The projections that map the student's hidden states onto the teacher's train with the student, as
        # its submodule for the duration (so the loop's optimizer and checkpoints hold them), then go.
        student.add_module("distill_loss", loss)
        loader = ctx.train_loader(artifact.tokenizer, step.batch_size, row_ids=cache is not None)
        summary = train(student, loader, step, seed=step.seed_or(ctx.seed), loss_fn=objective(loss, teacher, cache),
                        callbacks=[*held, cache] if cache else held, desc="distill", quiet=ctx.quiet,
                        evaluate=scores_on(validation, progress=not ctx.quiet) if _scored(validation) else None,
                        checkpoint_dir=ctx.checkpoint_dir)
        del student.distill_loss
    if step.gradient_checkpointing:
        student.gradient_checkpointing_disable()
    for model, implementation in attention.items():  # back to the kernels they came with
        model.set_attn_implementation(implementation)
    effect = {"student": made, "layer_map": loss.mapping, "frozen_parameters": frozen,
              "metric": TASKS[artifact.task].metric, "evals_on": "validation", **summary}
    student = student.to(ctx.device).eval()
    return artifact.evolve(step_record(step, **effect), model=student, config=student.config)


def build_student(step: DistillStep, teacher_artifact: Artifact, ctx: Context) -> tuple[Any, dict[str, Any]]:
    """The student model and a record of how it was made."""
    spec, teacher = step.student, teacher_artifact.model
    if spec.model is not None:
        chosen = ctx.model(spec.model)
        if not same_vocabulary(chosen.tokenizer, teacher_artifact.tokenizer):
            raise RecipeError(f"distill.student.model: {spec.model} has another vocabulary than the teacher")
        student = copy.deepcopy(chosen.model)
        return student.train(), {"from": spec.model, "layers": _depth(student)}
    config_changes = {"num_layers": spec.num_layers, "hidden_size": spec.hidden_size,
                      "intermediate_size": spec.intermediate_size, "num_heads": spec.num_heads}
    try:
        if any(value is not None for value in config_changes.values()):
            config = smaller_config(teacher.config, **config_changes)
            student, report = student_from_config(teacher, config, init=spec.init, seed=step.seed_or(ctx.seed))
            return student.train(), {"config": {k: v for k, v in config_changes.items() if v is not None},
                                     "init": spec.init, **report}
        layers = spec.layers if spec.layers is not None else default_layers(_depth(teacher))
        return select_layers(teacher, layers).train().requires_grad_(True), {"layers_of_teacher": layers}
    except ValueError as err:
        raise RecipeError(f"distill: {err}") from None


def distill_loss(step: DistillStep, student: Any, teacher: Any) -> DistillLoss:
    student_depth, teacher_depth = _depth(student), _depth(teacher)
    mapping = [tuple(pair) for pair in step.layer_map] if step.layer_map else uniform_layer_map(student_depth,
                                                                                                 teacher_depth)
    try:
        check_layer_map(mapping, student_depth, teacher_depth)
    except ValueError as err:
        raise RecipeError(f"distill.layer_map: {err}") from None
    arch = family(student.config.model_type)
    projections = None
    if step.hidden_weight:
        projections = make_projections(getattr(student.config, arch.hidden_attr),
                                       getattr(teacher.config, arch.hidden_attr), mapping)
    # Grouped-query attention narrows the keys and values: their head count divides every q, k, v width.
    relation_heads = step.relation_heads or getattr(student.config, "num_key_value_heads", None) \
        or getattr(student.config, arch.heads_attr)
    return DistillLoss(alpha=step.alpha, temperature=step.temperature, hidden_weight=step.hidden_weight,
                       attention_weight=step.attention_weight, relation_weight=step.relation_weight,
                       mapping=mapping, projections=projections, relation_heads=relation_heads)


def objective(loss: DistillLoss, teacher: Any, cache: TeacherLogits | None = None) -> Any:
    """The loop's `loss_fn`: both models on the same batch, the teacher without gradients (no_grad, not
    inference_mode: the soft targets are saved for the student's backward pass), or its cached logits."""

    def compute(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        row_ids = batch.pop("row_id", None)
        teacher.to(next(model.parameters()).device)  # a no-op after the first batch
        with ExitStack() as hooks:
            captured = None
            if loss.needs_qkv:  # the last blocks' query, key and value projections (MiniLM relations)
                captured = [hooks.enter_context(capture_qkv(m, family(m.config.model_type), _depth(m)))
                            for m in (model, teacher)]
            student_out = model(**batch, **loss.output_flags)
            teacher_out = cache.lookup(row_ids) if cache else None
            if teacher_out is None:
                with torch.no_grad():
                    teacher_out = teacher(**batch, **loss.output_flags)
                if cache:
                    cache.keep(row_ids, teacher_out.logits)
            qkv = {"student_qkv": captured[0].qkv, "teacher_qkv": captured[1].qkv} if captured else {}
            total, _ = loss(student_out, teacher_out, batch["attention_mask"], **qkv)
        return total

    return compute


class TeacherLogits(Callback):
    """The teacher's logits per training row, from the first epoch on: in memory, and at each epoch's end in
    the stage's checkpoint directory (one file per process), so later epochs and a resumed run reuse them."""

    def __init__(self, directory: Path | None) -> None:
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        self.path = directory / f"teacher-logits-{rank}.safetensors" if directory else None
        self.logits: dict[int, torch.Tensor] = {}
        if self.path is not None and self.path.is_file():
            self.logits = {int(row): tensor for row, tensor in load_file(self.path).items()}

    def lookup(self, row_ids: torch.Tensor) -> SimpleNamespace | None:
        rows = row_ids.tolist()
        if not all(row in self.logits for row in rows):
            return None
        return SimpleNamespace(logits=torch.stack([self.logits[row] for row in rows]).to(row_ids.device))

    def keep(self, row_ids: torch.Tensor, logits: torch.Tensor) -> None:
        self.logits |= dict(zip(row_ids.tolist(), logits.detach().float().cpu(), strict=True))

    def on_epoch_end(self, state: Any, model: Any) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_name(f".{self.path.name}.partial")
        save_file({str(row): tensor.contiguous() for row, tensor in self.logits.items()}, partial)
        os.replace(partial, self.path)


def _depth(model: Any) -> int:
    return getattr(model.config, family(model.config.model_type).layers_attr)


def _scored(evals: Any) -> bool:
    """Per-epoch scores need labels (classification) or text (causal LM): unlabelled rows give none."""
    return evals.labels is not None or evals.target_mask is not None
