"""Unstructured pruning: zeros inside the weight matrices, chosen by magnitude (one-shot or gradual), movement,
an L1 penalty then a threshold, Wanda or SparseGPT; held at zero through recovery by training hooks, and saved
as plain zeros (the artifact's kind says sparse, so later training steps hold them too)."""

from __future__ import annotations

import copy
import time
from typing import Any

from torch import nn

from compress.algos.blockwise import prune_block_by_block
from compress.algos.masking import GradualMagnitude, HoldMasks, L1Penalty
from compress.algos.movement import Movement
from compress.algos.sparsegpt import sparsegpt, wanda
from compress.algos.sparsity import (
    Masks,
    apply_masks,
    in_blocks,
    layer_sparsity,
    matrix,
    nm_mask,
    overall_sparsity,
    prunable,
    ranked_masks,
)
from compress.artifact import Artifact, step_record
from compress.context import Context
from compress.kinds import Kind
from compress.passes.prune_structured import refused_as_recipe_error
from compress.passes.recovery import recover
from compress.recipe import PruneStep
from compress.train import Callback

FROM_ROWS = ("wanda", "sparsegpt")  # one-shot from calibration inputs, block by block


def run(artifact: Artifact, step: PruneStep, ctx: Context, kind: Kind) -> Artifact:
    started = time.perf_counter()
    model = copy.deepcopy(artifact.model).eval()  # the input stays whole: it is the default teacher
    with refused_as_recipe_error():
        modules = prunable(model, step.modules)
        check_fits(model, step, modules)
    before = layer_sparsity(modules)
    effect: dict[str, Any] = {"target_sparsity": step.target_sparsity}
    masks = None
    if step.method in FROM_ROWS:
        batches = ctx.calibration(artifact.tokenizer, step.calibration.samples, step.calibration.batch_size, "prune")
        masks = pruned_from_rows(model, step, modules, batches)
        effect["calibration_rows"] = sum(len(batch["input_ids"]) for batch in batches)
    elif step.method == "magnitude" and step.schedule == "oneshot":
        masks = magnitude_masks(modules, step)
        apply_masks(modules, masks)
    summary = None
    if step.recover is not None:
        callbacks = [HoldMasks(modules, masks)] if masks is not None else [training_pruner(modules, step)]
        summary = recover(model, artifact, step.recover, ctx, "prune.recover", callbacks=callbacks)
    if step.method == "l1":
        trained = layer_sparsity(modules)
        apply_masks(modules, ranked_masks({name: m.weight.detach().abs() for name, m in modules.items()},
                                          step.target_sparsity, step.ranking))
        effect["l1_after_training"] = {name: layer["l1"] for name, layer in trained.items()}
    after = layer_sparsity(modules)
    effect |= {"achieved_sparsity": overall_sparsity(after), "layers": per_layer(before, after)}
    if summary is not None:
        effect["recovery"] = summary
    effect["seconds"] = round(time.perf_counter() - started, 2)
    model = model.to(ctx.device).eval()
    return artifact.evolve(step_record(step, **effect), model=model, kind=kind)


def check_fits(model: Any, step: PruneStep, modules: dict[str, nn.Module]) -> None:
    if step.method in FROM_ROWS:
        inside = in_blocks(model)
        outside = [name for name, module in modules.items() if id(module) not in inside]
        if outside:
            raise ValueError(f"modules: {step.method} weighs each weight by its input activations, which only "
                             f"Linear layers inside the transformer blocks have; {outside[0]} is not one")
    if step.nm:
        for name, module in modules.items():
            if isinstance(module, nn.Embedding) or matrix(module).shape[1] % step.nm[1]:
                raise ValueError(f"nm: {name} ({tuple(matrix(module).shape)}) has no input width divisible by "
                                 f"{step.nm[1]} to group")


def magnitude_masks(modules: dict[str, nn.Module], step: PruneStep) -> Masks:
    if step.nm:
        return {name: in_weight_layout(module, nm_mask(matrix(module).detach().abs(), *step.nm))
                for name, module in modules.items()}
    return ranked_masks({name: module.weight.detach().abs() for name, module in modules.items()},
                        step.target_sparsity, step.ranking)


def pruned_from_rows(model: Any, step: PruneStep, modules: dict[str, nn.Module], batches: list[Any]) -> Masks:
    masks: Masks = {}

    def prune_layer(name: str, module: nn.Module, stats: Any) -> None:
        weight = matrix(module)
        if step.method == "wanda":
            mask = wanda(weight, stats.squares, step.target_sparsity, step.nm)
            weight.data.mul_(mask.to(weight.dtype))
        else:
            new, mask = sparsegpt(weight, stats.hessian, step.target_sparsity, step.nm, step.block_size, step.damp)
            weight.data.copy_(new)
        masks[name] = in_weight_layout(module, mask)

    prune_block_by_block(model, batches, modules, prune_layer, hessian=step.method == "sparsegpt")
    return masks


def in_weight_layout(module: nn.Module, mask: Any) -> Any:
    """An output-major mask laid out like the module's weight (GPT-2's Conv1D stores it input-major)."""
    return mask if matrix(module) is module.weight else mask.t()


def training_pruner(modules: dict[str, nn.Module], step: PruneStep) -> Callback:
    if step.method == "magnitude":
        return GradualMagnitude(modules, step.target_sparsity, step.ranking, step.gradual)
    if step.method == "movement":
        return Movement(modules, step.target_sparsity, step.variant, step.gradual, step.scores_lr, step.lambda_)
    return L1Penalty(modules, step.lambda_)


def per_layer(before: dict[str, dict[str, Any]], after: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per module: share of zeros and L0 (non-zero count) and L1 norm, before and after the step."""
    return {name: {"weights": layer["weights"], "sparsity": layer["sparsity"], "nonzeros": layer["nonzeros"],
                   "l1": layer["l1"], "nonzeros_before": before[name]["nonzeros"], "l1_before": before[name]["l1"]}
            for name, layer in after.items()}
