"""Physical removal: pruned heads, FFN neurons and blocks leave the weight matrices, and the config records
the per-layer shapes so the model reloads.

Heads of BERT-like and GPT-2 models go through the model's own `prune_heads` (`config.pruned_heads`: stock
transformers reloads them). FFN widths per block and Llama's query heads have no place in a transformers
config: they are kept in `config.layer_shapes` ({"intermediate_size": [per block], "num_attention_heads":
[per block]}), and `install_reload_hook` (run by `import compress`) teaches transformers to build those shapes,
so `AutoModelFor*.from_pretrained` loads the pruned checkpoint.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D, prune_conv1d_layer, prune_linear_layer

from compress.algos.students import select_layers, transformer_blocks
from compress.algos.units import (
    HEADS,
    head_dim,
    heads_per_layer,
    in_features,
    kv_groups,
    neurons_per_layer,
)
from compress.arch import FAMILIES, Family, family

LAYER_SHAPES = "layer_shapes"


def keep_outputs(module: nn.Module, keep: torch.Tensor) -> nn.Module:
    if isinstance(module, Conv1D):
        return prune_conv1d_layer(module, keep, dim=1)
    return prune_linear_layer(module, keep, dim=0)


def keep_inputs(module: nn.Module, keep: torch.Tensor) -> nn.Module:
    if isinstance(module, Conv1D):
        return prune_conv1d_layer(module, keep, dim=0)
    return prune_linear_layer(module, keep, dim=1)


def kept(total: int, removed: list[int]) -> torch.Tensor:
    gone = set(removed)
    return torch.tensor([i for i in range(total) if i not in gone], dtype=torch.long)


def remove_neurons(model: Any, neurons: dict[int, list[int]]) -> None:
    """Remove FFN neurons `neurons[layer]` (indices into the block's current width), in place."""
    arch = family(model.config.model_type)
    blocks = transformer_blocks(model)
    for layer, removed in neurons.items():
        if not removed:
            continue
        block = blocks[layer]
        keep_neurons(block, arch, kept(in_features(block.get_submodule(arch.ffn_out)), removed))
    record_shapes(model)


def keep_neurons(block: nn.Module, arch: Family, keep: torch.Tensor) -> None:
    for path in arch.ffn_in:
        block.set_submodule(path, keep_outputs(block.get_submodule(path), keep))
    block.set_submodule(arch.ffn_out, keep_inputs(block.get_submodule(arch.ffn_out), keep))


def keep_query_heads(block: nn.Module, arch: Family, keep: torch.Tensor, per_group: int) -> None:
    """Keep query-projection rows and output-projection columns `keep`; `per_group` query heads per key-value
    head remain."""
    block.set_submodule(arch.qkv[0], keep_outputs(block.get_submodule(arch.qkv[0]), keep))
    block.set_submodule(arch.attention_out, keep_inputs(block.get_submodule(arch.attention_out), keep))
    block.get_submodule(arch.attention_out.rpartition(".")[0]).num_key_value_groups = per_group


def remove_heads(model: Any, heads: dict[int, list[int]]) -> None:
    """Remove attention heads `heads[layer]` (indices among the block's current heads), in place. A grouped-
    query block must lose the same number of query heads from every key-value group."""
    heads = {layer: sorted(set(removed)) for layer, removed in heads.items() if removed}
    if not heads:
        return
    if family(model.config.model_type).head_pruning == "transformers":
        # prune_heads counts heads as the block had them unpruned: map current indices back to those.
        original = {layer: still_there(model, layer) for layer in heads}
        model.prune_heads({layer: [original[layer][i] for i in removed] for layer, removed in heads.items()})
        return
    kept_per_group = {layer: grouped_heads_kept(model, layer, removed) for layer, removed in heads.items()}
    for layer, removed in heads.items():  # every block checked above: nothing changes unless all can
        remove_grouped_heads(model, layer, removed, kept_per_group[layer])
    record_shapes(model)


def still_there(model: Any, layer: int) -> list[int]:
    """The block's current heads, numbered as in the unpruned model (`config.pruned_heads` holds the rest)."""
    total = heads_per_layer(model)[layer] + len(model.config.pruned_heads.get(layer, []))
    gone = set(model.config.pruned_heads.get(layer, []))
    return [head for head in range(total) if head not in gone]


def grouped_heads_kept(model: Any, layer: int, removed: list[int]) -> int:
    """Query heads each key-value group of the block keeps; ValueError unless every group loses as many and
    keeps at least one."""
    heads, groups = heads_per_layer(model)[layer], kv_groups(model, layer)
    per_group = heads // groups
    lost = [sum(1 for head in removed if head // per_group == group) for group in range(groups)]
    if len(set(lost)) > 1:
        raise ValueError(f"layer {layer}: grouped-query attention needs the same number of query heads removed "
                         f"from each of its {groups} key-value groups (got {lost})")
    if lost[0] >= per_group:
        raise ValueError(f"layer {layer}: removing every query head of a key-value group leaves no attention")
    return per_group - lost[0]


def remove_grouped_heads(model: Any, layer: int, removed: list[int], kept_per_group: int) -> None:
    arch, size = family(model.config.model_type), head_dim(model)
    keep = torch.cat([torch.arange(head * size, (head + 1) * size)
                      for head in kept(heads_per_layer(model)[layer], removed).tolist()])
    keep_query_heads(transformer_blocks(model)[layer], arch, keep, kept_per_group)


def drop_layers(model: Any, layers: list[int]) -> Any:
    """A copy of `model` without blocks `layers`; the per-layer shapes follow the renumbering."""
    depth = len(transformer_blocks(model))
    return select_layers(model, [i for i in range(depth) if i not in set(layers)])


def record_shapes(model: Any) -> None:
    """Write the blocks' FFN widths and (grouped-query) query heads into `config.layer_shapes`."""
    config, arch = model.config, family(model.config.model_type)
    shapes = {}
    widths = neurons_per_layer(model)
    if any(width != getattr(config, arch.intermediate_attr) for width in widths):
        shapes["intermediate_size"] = widths
    if arch.head_pruning == "grouped-query":
        heads = heads_per_layer(model)
        if any(count != getattr(config, arch.heads_attr) for count in heads):
            shapes["num_attention_heads"] = heads
    setattr(config, LAYER_SHAPES, shapes or None)


def apply_layer_shapes(model: Any) -> None:
    """Give freshly built blocks the widths `config.layer_shapes` records (weights are loaded afterwards)."""
    shapes = getattr(model.config, LAYER_SHAPES, None)
    if not shapes or model.config.model_type not in FAMILIES:
        return
    arch, blocks = family(model.config.model_type), transformer_blocks(model)
    size = head_dim(model)
    for layer, block in enumerate(blocks):
        width = shapes.get("intermediate_size", [None] * len(blocks))[layer]
        if width is not None and in_features(block.get_submodule(arch.ffn_out)) != width:
            keep_neurons(block, arch, torch.arange(width))
        heads = shapes.get("num_attention_heads", [None] * len(blocks))[layer]
        if heads is not None and in_features(block.get_submodule(arch.attention_out)) != heads * size:
            keep_query_heads(block, arch, torch.arange(heads * size), heads // kv_groups(model, layer))


def install_reload_hook() -> None:
    """After transformers builds a model (`post_init`, where it also applies `pruned_heads`), give its blocks the
    recorded per-layer shapes, so `from_pretrained` loads a pruned checkpoint's weights into them."""
    from transformers import PreTrainedModel

    original = PreTrainedModel.post_init
    if getattr(original, "_compress_layer_shapes", False):
        return

    def post_init(self: Any) -> None:
        original(self)
        apply_layer_shapes(self)

    post_init._compress_layer_shapes = True  # type: ignore[attr-defined]
    PreTrainedModel.post_init = post_init  # type: ignore[method-assign]


def scale_units(model: Any, kind: str, values: list[torch.Tensor]) -> None:
    """Multiply each unit's output by its value (per block, one per unit), in the weights: the output
    projection's input columns, as a gate on that input would."""
    arch, size = family(model.config.model_type), head_dim(model)
    path, width = (arch.attention_out, size) if kind == HEADS else (arch.ffn_out, 1)
    with torch.no_grad():
        for block, per_unit in zip(transformer_blocks(model), values):
            module = block.get_submodule(path)
            scale = per_unit.repeat_interleave(width).to(module.weight)
            module.weight.mul_(scale if isinstance(module, nn.Linear) else scale.unsqueeze(1))
