"""The units structured pruning removes: attention heads and FFN neurons of each block, found through the
architecture table, and gates that scale each unit's output in the forward pass.

A head's output is a slice of the attention's output-projection input (heads are laid out one after another),
and a neuron's is one column of the FFN's output-projection input: a gate multiplies that input, so the same
hook serves gradient importance (gates at 1 that collect gradients), activation statistics and L0 gates.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from compress.algos.students import transformer_blocks
from compress.arch import Family, family

HEADS, NEURONS = "heads", "neurons"
UNIT_KINDS = (HEADS, NEURONS)


def head_dim(model: Any) -> int:
    config = model.config
    arch = family(config.model_type)
    return getattr(config, "head_dim", None) or getattr(config, arch.hidden_attr) // getattr(config, arch.heads_attr)


def in_features(module: nn.Module) -> int:
    """Input width of a Linear or of GPT-2's Conv1D (whose weight is stored input-major)."""
    return module.in_features if isinstance(module, nn.Linear) else module.weight.shape[0]


def heads_per_layer(model: Any) -> list[int]:
    """Attention heads each block has now (pruning leaves blocks with different counts)."""
    arch, size = family(model.config.model_type), head_dim(model)
    return [in_features(block.get_submodule(arch.attention_out)) // size for block in transformer_blocks(model)]


def neurons_per_layer(model: Any) -> list[int]:
    arch = family(model.config.model_type)
    return [in_features(block.get_submodule(arch.ffn_out)) for block in transformer_blocks(model)]


def units_per_layer(model: Any, unit: str) -> list[int]:
    return heads_per_layer(model) if unit == HEADS else neurons_per_layer(model)


def kv_groups(model: Any, layer: int) -> int:
    """Key-value groups of a grouped-query block (its query heads leave each group evenly); 1 otherwise."""
    arch = family(model.config.model_type)
    if arch.head_pruning != "grouped-query":
        return 1
    attention_out = transformer_blocks(model)[layer].get_submodule(arch.attention_out)
    return getattr(model.config, "num_key_value_heads", None) or in_features(attention_out) // head_dim(model)


GateFn = Callable[[str, int], torch.Tensor | None]  # (unit kind, layer) -> one value per unit, or None


@contextmanager
def gated(model: Any, gate: GateFn, record: Callable[[str, int, torch.Tensor], None] | None = None
          ) -> Iterator[None]:
    """Within the block, each unit's output is multiplied by `gate(kind, layer)[unit]`; `record(kind, layer,
    x)` sees the gated projection input first, shaped (batch, tokens, units, width per unit)."""
    arch: Family = family(model.config.model_type)
    size = head_dim(model)
    handles = []

    def hook(kind: str, layer: int, width: int) -> Callable[..., Any]:
        def pre_hook(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
            x = args[0]
            units = x.view(*x.shape[:-1], -1, width)
            values = gate(kind, layer)
            if values is not None:
                units = units * values.to(units.dtype).view(-1, 1)
            if record is not None:
                record(kind, layer, units)
            return (units.reshape(x.shape), *args[1:])

        return pre_hook

    try:
        for layer, block in enumerate(transformer_blocks(model)):
            for kind, path, width in ((HEADS, arch.attention_out, size), (NEURONS, arch.ffn_out, 1)):
                handles.append(block.get_submodule(path).register_forward_pre_hook(hook(kind, layer, width)))
        yield
    finally:
        for handle in handles:
            handle.remove()
