"""One-shot pruning block by block over calibration batches (the way Wanda and SparseGPT run).

The batches' inputs to the first transformer block are captured once; then each block in turn: its Linear
layers' input statistics are gathered over all batches, the layers are pruned, and the block runs again so
that the next block sees the pruned block's outputs. Memory: one block's inputs for the calibration rows.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from compress.algos.importance import as_tensors
from compress.algos.students import transformer_blocks
from compress.algos.units import in_features


class InputStats:
    """Over the real tokens (padding excluded) a layer has seen: per input feature the sum of squares, and
    optionally X^T X (SparseGPT's Hessian, up to a factor)."""

    def __init__(self, width: int, hessian: bool) -> None:
        self.squares = torch.zeros(width, dtype=torch.float64)
        self.hessian = torch.zeros(width, width, dtype=torch.float64) if hessian else None
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().double().cpu()
        self.squares += (x * x).sum(0)
        if self.hessian is not None:
            self.hessian += x.T @ x
        self.tokens += len(x)


PruneLayer = Callable[[str, nn.Module, InputStats], None]


class _Captured(Exception):
    pass


def prune_block_by_block(model: Any, batches: list[dict[str, Any]], modules: dict[str, nn.Module],
                         prune_layer: PruneLayer, hessian: bool) -> None:
    """`prune_layer(name, module, stats)` prunes each of `modules` (all inside transformer blocks) in place."""
    device = next(model.parameters()).device
    tensors = [as_tensors(batch, device) for batch in batches]
    token_masks = [batch["attention_mask"].bool() for batch in tensors]
    use_cache = getattr(model.config, "use_cache", None)
    if use_cache is not None:
        model.config.use_cache = False
    try:
        with torch.no_grad():
            inputs = first_block_inputs(model, tensors)
            for block in transformer_blocks(model):
                parts = {id(part) for part in block.modules()}
                inside = {name: module for name, module in modules.items() if id(module) in parts}
                stats = gather(block, inside, inputs, token_masks, hessian)
                for name, module in inside.items():
                    prune_layer(name, module, stats[name])
                inputs = [with_hidden(args, kwargs, run(block, args, kwargs)) for args, kwargs in inputs]
    finally:
        if use_cache is not None:
            model.config.use_cache = use_cache


def first_block_inputs(model: Any, batches: list[dict[str, torch.Tensor]]) -> list[tuple[tuple, dict]]:
    """Each batch's (args, kwargs) to the first block: the model runs up to it and stops."""
    captured = []

    def grab(module: nn.Module, args: tuple, kwargs: dict) -> None:
        captured.append((args, kwargs))
        raise _Captured

    handle = transformer_blocks(model)[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for batch in batches:
            try:
                model(**batch)
            except _Captured:
                pass
    finally:
        handle.remove()
    return captured


def gather(block: nn.Module, modules: dict[str, nn.Module], inputs: list[tuple[tuple, dict]],
           token_masks: list[torch.Tensor], hessian: bool) -> dict[str, InputStats]:
    stats = {name: InputStats(in_features(module), hessian) for name, module in modules.items()}
    current: list[torch.Tensor] = []

    def hook(name: str) -> Callable[..., None]:
        def record(module: nn.Module, args: tuple) -> None:
            stats[name].add(args[0][current[0]])

        return record

    handles = [module.register_forward_pre_hook(hook(name)) for name, module in modules.items()]
    try:
        for (args, kwargs), mask in zip(inputs, token_masks, strict=True):
            current[:] = [mask]
            run(block, args, kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return stats


def run(block: nn.Module, args: tuple, kwargs: dict) -> torch.Tensor:
    out = block(*args, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def with_hidden(args: tuple, kwargs: dict, hidden: torch.Tensor) -> tuple[tuple, dict]:
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}
