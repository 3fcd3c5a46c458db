"""Unstructured sparsity: which weights may be zeroed, which are, and how many at each training step.

Every mask is True where a weight stays. Counts are exact: a layer asked for sparsity s loses
round(s * weights) of them, ties broken by position, so achieved and target sparsity agree to one weight.
Matrices are seen output-major (one row per output feature), also GPT-2's input-major Conv1D.
"""

from __future__ import annotations

import fnmatch
from typing import Any

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from compress.algos.students import transformer_blocks

Masks = dict[str, torch.Tensor]  # module name -> bool, shaped like its weight; True = kept
WEIGHTED = (nn.Linear, Conv1D, nn.Embedding)


def prunable(model: Any, patterns: list[str] | None = None) -> dict[str, nn.Module]:
    """The modules whose weights are pruned. Default: every Linear (Conv1D) inside the transformer blocks, not
    the embeddings nor the task head. `patterns` (globs on module names) may name Linear and Embedding
    modules anywhere; a pattern that matches none raises ValueError naming it and a few names that exist."""
    if patterns is None:
        inside = in_blocks(model)
        return {name: module for name, module in model.named_modules()
                if isinstance(module, (nn.Linear, Conv1D)) and id(module) in inside}
    weighted = {name: module for name, module in model.named_modules() if isinstance(module, WEIGHTED)}
    chosen: dict[str, nn.Module] = {}
    for pattern in patterns:
        found = {name: module for name, module in weighted.items() if fnmatch.fnmatchcase(name, pattern)}
        if not found:
            examples = ", ".join(list(weighted)[:: max(1, len(weighted) // 6)][:6])
            raise ValueError(f"modules: {pattern!r} matches no Linear or Embedding module (they are named like "
                             f"{examples})")
        chosen |= found
    return {name: module for name, module in weighted.items() if name in chosen}  # model order


def in_blocks(model: Any) -> set[int]:
    """The ids of every module inside the transformer blocks."""
    return {id(module) for block in transformer_blocks(model) for module in block.modules()}


def matrix(module: nn.Module) -> torch.Tensor:
    """The weight, output-major: a view, so writing to it writes the module's weight."""
    return module.weight.t() if isinstance(module, Conv1D) else module.weight


def lowest(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Bool mask, True except at the `count` lowest scores (ties: the first in flat order go)."""
    flat = scores.detach().reshape(-1).float()
    keep = torch.ones_like(flat, dtype=torch.bool)
    if count >= flat.numel():
        keep[:] = False
    elif count > 0:
        threshold = torch.kthvalue(flat, count).values  # selection, not a full sort: masks renew every step
        below = flat < threshold
        keep[below] = False
        keep[torch.nonzero(flat == threshold).squeeze(1)[:count - int(below.sum())]] = False
    return keep.view_as(scores)


def ranked_masks(scores: dict[str, torch.Tensor], sparsity: float, ranking: str) -> Masks:
    """Keep the highest scores: within each layer (per_layer), or across all layers at once (global)."""
    if ranking == "per_layer":
        return {name: lowest(score, round(sparsity * score.numel())) for name, score in scores.items()}
    flat = torch.cat([score.reshape(-1).float() for score in scores.values()])
    keep = lowest(flat, round(sparsity * flat.numel()))
    masks, start = {}, 0
    for name, score in scores.items():
        masks[name] = keep[start:start + score.numel()].view_as(score)
        start += score.numel()
    return masks


def row_masks(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Wanda's comparison group: each output row loses its lowest scores, the same count in every row; the
    remainder of round(sparsity * weights) goes to the rows whose next candidate scores lowest."""
    rows = len(scores)
    total = round(sparsity * scores.numel())
    each, extra = divmod(total, rows)
    order = torch.sort(scores.float(), dim=1, stable=True).indices
    keep = torch.ones_like(scores, dtype=torch.bool)
    keep.scatter_(1, order[:, :each], False)
    if extra:
        next_column = order[:, each]
        next_score = scores.float().gather(1, next_column[:, None]).squeeze(1)
        chosen = torch.sort(next_score, stable=True).indices[:extra]
        keep[chosen, next_column[chosen]] = False
    return keep


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """N:M: in every group of `m` consecutive inputs of a row, the `n` highest scores stay."""
    rows, columns = scores.shape
    if columns % m:
        raise ValueError(f"nm: {n}:{m} needs input widths divisible by {m} (a layer has {columns})")
    groups = scores.float().reshape(rows, columns // m, m)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(2, torch.topk(groups, n, dim=2).indices, True)
    return keep.reshape(rows, columns)


def cubic_sparsity(step: int, total: int, final: float, start: float, end: float) -> float:
    """Zhu & Gupta (2017): from 0 at `start` to `final` at `end` (fractions of the `total` steps), rising
    fast first and slowly last: final * (1 - (1 - progress)^3)."""
    first, last = round(start * total), max(round(start * total) + 1, round(end * total))
    progress = min(1.0, max(0.0, (step - first) / (last - first)))
    return final * (1 - (1 - progress) ** 3)


def apply_masks(modules: dict[str, nn.Module], masks: Masks) -> None:
    with torch.no_grad():
        for name, mask in masks.items():
            weight = modules[name].weight
            weight.mul_(mask.to(weight.device, weight.dtype))


def zero_masks(modules: dict[str, nn.Module]) -> Masks:
    """The masks a weight's zeros already make: what a later training step must keep at zero."""
    return {name: module.weight.detach() != 0 for name, module in modules.items()}


def layer_sparsity(modules: dict[str, nn.Module]) -> dict[str, dict[str, Any]]:
    """Per module: its share of zeros, its L0 (non-zero count) and L1 norm, and its size."""
    report = {}
    for name, module in modules.items():
        weight = module.weight.detach()
        nonzeros = int(torch.count_nonzero(weight))
        report[name] = {"sparsity": round(1 - nonzeros / weight.numel(), 6), "nonzeros": nonzeros,
                        "l1": round(float(weight.abs().float().sum()), 4), "weights": weight.numel()}
    return report


def overall_sparsity(report: dict[str, dict[str, Any]]) -> float:
    weights = sum(layer["weights"] for layer in report.values())
    return round(1 - sum(layer["nonzeros"] for layer in report.values()) / weights, 6) if weights else 0.0
