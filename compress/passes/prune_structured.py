"""Structured pruning: score heads, FFN neurons and blocks, choose what goes, remove it from the weight
matrices, then recover by training (distilled from the unpruned model by default). With importance l0 the
choice is made by hard-concrete gates trained during that recovery."""

from __future__ import annotations

import copy
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from compress.algos.allocation import Choice, check_multiple, choose, layers_to_drop, rule_counts
from compress.algos.importance import activation_scores, gradient_scores, layer_scores, magnitude_scores
from compress.algos.l0 import HardConcreteGates, L0Penalty
from compress.algos.shrink import drop_layers, remove_heads, remove_neurons, scale_units
from compress.algos.units import HEADS, NEURONS, gated, kv_groups, units_per_layer
from compress.arch import is_text_stream
from compress.artifact import Artifact, step_record
from compress.context import Context
from compress.errors import RecipeError
from compress.kinds import Kind
from compress.passes.recovery import recover
from compress.recipe import PruneStep
from compress.train import planned_steps

FIELDS = {HEADS: "heads", NEURONS: "ffn"}


def run(artifact: Artifact, step: PruneStep, ctx: Context, kind: Kind) -> Artifact:
    started = time.perf_counter()
    model = copy.deepcopy(artifact.model).eval()  # the input stays whole: it is the default teacher
    before = shape_of(model)
    text_stream = is_text_stream(artifact.task)
    batches = None
    if "calib" in step.needs_data:
        batches = ctx.calibration(artifact.tokenizer, step.calibration.samples, step.calibration.batch_size, "prune")
    dropped = blocks_to_drop(model, step, batches, text_stream)
    wanted = {kind: amount for kind, amount in ((HEADS, step.heads), (NEURONS, step.ffn)) if amount is not None}
    check_rule_counts(model, step, wanted, dropped)
    if step.importance == "l0":
        model = drop_layers(model, dropped) if dropped else model
        model, gates, summary = pruned_by_gates(model, artifact, step, wanted, ctx)
        effect = {"l0": gates, "layers_removed": dropped}
    else:
        model, effect = pruned_by_importance(model, step, wanted, dropped, batches, text_stream)
        summary = recover(model, artifact, step.recover, ctx, "prune.recover") if step.recover else None
    effect = {"importance": step.importance, "allocation": step.allocation, **effect, "before": before,
              "after": shape_of(model)}
    if summary is not None:
        effect["recovery"] = summary
    effect["seconds"] = round(time.perf_counter() - started, 2)
    model = model.to(ctx.device).eval()
    return artifact.evolve(step_record(step, **effect), model=model, config=model.config, kind=kind)


def blocks_to_drop(model: Any, step: PruneStep, batches: Any, text_stream: bool) -> list[int]:
    if step.layers is None:
        return []
    if isinstance(step.layers, float):
        scores = layer_scores(model, batches, text_stream)
    else:
        scores = torch.zeros(len(units_per_layer(model, HEADS)))
    with refused_as_recipe_error():
        return layers_to_drop(scores, step.layers)


def check_rule_counts(model: Any, step: PruneStep, wanted: dict[str, Any], dropped: list[int]) -> None:
    """Counts fixed by a rule (not global ranking), and blocks narrower than `ffn_multiple_of`, are refused
    before any importance is measured."""
    with refused_as_recipe_error():
        for kind, amount in wanted.items():
            sizes, multiple = units_per_layer(model, kind), multiple_of(step, kind)
            check_multiple(FIELDS[kind], sizes, frozenset(dropped), multiple)
            if step.allocation != "global":
                rule_counts(FIELDS[kind], sizes, step.allocation, amount, groups_of(model, kind), frozenset(dropped),
                            multiple)


def pruned_by_importance(model: Any, step: PruneStep, wanted: dict[str, Any], dropped: list[int], batches: Any,
                         text_stream: bool) -> tuple[Any, dict[str, Any]]:
    """Score the units, choose per the allocation, remove them and the dropped (or emptied) blocks."""
    scores = unit_scores(model, step.importance, batches, text_stream) if wanted else {}
    with refused_as_recipe_error():
        choices = {kind: allocate(model, kind, scores[kind], step, amount, frozenset(dropped))
                   for kind, amount in wanted.items()}
    emptied = choices[HEADS].emptied if HEADS in choices else []
    effect: dict[str, Any] = {f"{FIELDS[kind]}_kept_at_minimum": choice.kept_at_minimum
                              for kind, choice in choices.items() if choice.kept_at_minimum}
    if emptied:
        effect["layers_emptied"] = emptied
    remove_units(model, choices)
    gone = sorted({*dropped, *emptied})
    effect["layers_removed"] = gone
    return (drop_layers(model, gone) if gone else model), effect


@contextmanager
def refused_as_recipe_error() -> Iterator[None]:
    """An allocation's ValueError (it names the field) becomes a recipe error: exit 2, nothing written."""
    try:
        yield
    except ValueError as why:
        raise RecipeError(f"prune.{why}") from None


def unit_scores(model: Any, importance: str, batches: Any, text_stream: bool) -> dict[str, list[torch.Tensor]]:
    if importance == "magnitude":
        return magnitude_scores(model)
    score = gradient_scores if importance == "gradient" else activation_scores
    return score(model, batches, text_stream)


def allocate(model: Any, kind: str, scores: list[torch.Tensor], step: PruneStep, amount: Any,
             skip: frozenset[int], normalize: bool = True) -> Choice:
    return choose(FIELDS[kind], scores, step.allocation, amount, groups_of(model, kind),
                  allow_empty=kind == HEADS and step.allow_layer_drop, normalize=normalize, skip=skip,
                  multiple=multiple_of(step, kind))


def multiple_of(step: PruneStep, kind: str) -> int:
    return step.ffn_multiple_of if kind == NEURONS else 1


def groups_of(model: Any, kind: str) -> list[int]:
    """Per block, the key-value groups a head count must be a multiple of (1 for FFN neurons)."""
    return [kv_groups(model, layer) if kind == HEADS else 1 for layer in range(len(units_per_layer(model, kind)))]


def remove_units(model: Any, choices: dict[str, Choice]) -> None:
    if HEADS in choices:
        remove_heads(model, choices[HEADS].removed)
    if NEURONS in choices:
        remove_neurons(model, choices[NEURONS].removed)


def pruned_by_gates(model: Any, artifact: Artifact, step: PruneStep, wanted: dict[str, float],
                    ctx: Context) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    """Train the model with hard-concrete gates on the wanted unit kinds for the first `l0.share` of the
    recovery steps; remove exactly the wanted share of units, those whose gates are the least open, fold the
    others' gate values into the weights; train the smaller model for the remaining steps."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        raise RecipeError("prune.importance: l0 gates train in one process; run this recipe without torchrun")
    settings = step.recover
    total = planned_steps(len(ctx.train_loader(artifact.tokenizer, settings.batch_size)), settings)
    gate_steps = max(1, round(step.l0.share * total))
    counts = {kind: units_per_layer(model, kind) for kind in wanted}
    gates = HardConcreteGates(counts, init_open=step.l0.init_open).to(next(model.parameters()).device)
    penalty = L0Penalty(gates, {kind: 1 - ratio for kind, ratio in wanted.items()}, step.l0.lr, step.l0.warmup)
    at_start = penalty.expected_open()
    with gated(model, lambda kind, layer: gates.gate(kind, layer, sample=model.training)):
        gating = recover(model, artifact, settings.model_copy(update={"max_steps": gate_steps}), ctx,
                         "prune.recover", callbacks=[penalty], phase="gates")
    values = {kind: gates.final_gates(kind) for kind in wanted}
    with refused_as_recipe_error():
        choices = {kind: allocate(model, kind, gates.log_alphas(kind), step, wanted[kind], frozenset(),
                                  normalize=False) for kind in wanted}
    for kind, per_layer in values.items():
        scale_units(model, kind, per_layer)
    emptied = choices[HEADS].emptied if HEADS in choices else []
    remove_units(model, choices)
    if emptied:
        model = drop_layers(model, emptied)
    record = {"gate_steps": gate_steps, "expected_open_at_start": at_start, "expected_open": penalty.expected_open(),
              "closed_but_kept": {FIELDS[kind]: closed_but_kept(values[kind], choices[kind]) for kind in wanted},
              "layers_emptied": emptied, "gate_training": gating}
    record |= {f"{FIELDS[kind]}_kept_at_minimum": choice.kept_at_minimum
               for kind, choice in choices.items() if choice.kept_at_minimum}
    summary = None
    if total > gate_steps:
        rest = {"max_steps": total - gate_steps, "seed": settings.seed_or(ctx.seed) + 1}  # another data order
        summary = recover(model, artifact, settings.model_copy(update=rest), ctx, "prune.recover", phase="pruned")
    return model, record, summary


def closed_but_kept(values: list[torch.Tensor], choice: Choice) -> int:
    """Units whose gate closed (value 0) yet stay, because more closed than the target removes: dead weight."""
    return sum(int((per_layer == 0).sum()) - sum(1 for unit in choice.removed.get(layer, [])
                                                   if per_layer[unit] == 0)
               for layer, per_layer in enumerate(values))


def shape_of(model: Any) -> dict[str, Any]:
    return {"heads": units_per_layer(model, HEADS), "ffn": units_per_layer(model, NEURONS),
            "parameters": sum(p.numel() for p in model.parameters())}
