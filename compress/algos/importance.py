"""How much each attention head, FFN neuron and block matters, measured on calibration batches.

gradient: |dL/dg| of a gate g = 1 on each unit's output, summed over the batches (Michel et al. 2019).
activation: mean L2 norm of the unit's output over real tokens. magnitude: weight norms of the unit's rows
and columns (no data). Blocks: how far the predictions move when the block alone is skipped.

The loss needs no labels: a classifier is scored against its own predictions on the batch, a causal LM on
the batch's next tokens. Scores are one tensor per block, higher = more important.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from compress.algos.students import transformer_blocks
from compress.algos.units import HEADS, NEURONS, UNIT_KINDS, gated, head_dim, units_per_layer
from compress.arch import family

Scores = dict[str, list[torch.Tensor]]  # unit kind -> per block, one score per unit
Batch = dict[str, torch.Tensor]


def as_tensors(batch: dict[str, Any], device: torch.device) -> Batch:
    return {name: torch.as_tensor(values, device=device) for name, values in batch.items()}


def self_targets(model: Any, batch: Batch, text_stream: bool) -> torch.Tensor:
    """Labels the loss is measured against: the next tokens (causal LM), or the model's own predictions."""
    if text_stream:
        return batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    with torch.no_grad():
        return model(**batch).logits.argmax(-1)


def loss_on(model: Any, batch: Batch, targets: torch.Tensor) -> torch.Tensor:
    return model(**batch, labels=targets).loss


def gradient_scores(model: Any, batches: Iterable[dict[str, Any]], text_stream: bool) -> Scores:
    model.eval()
    device = next(model.parameters()).device
    data = [(batch, self_targets(model, batch, text_stream)) for batch in (as_tensors(b, device) for b in batches)]
    gates = {kind: [torch.ones(n, device=device, requires_grad=True) for n in units_per_layer(model, kind)]
             for kind in UNIT_KINDS}
    scores = {kind: [torch.zeros(len(g), device=device) for g in gates[kind]] for kind in UNIT_KINDS}
    trainable = [p for p in model.parameters() if p.requires_grad]
    for parameter in trainable:  # only the gates need gradients
        parameter.requires_grad_(False)
    try:
        with gated(model, lambda kind, layer: gates[kind][layer]), torch.enable_grad():
            for batch, targets in data:
                loss_on(model, batch, targets).backward()
                for kind in UNIT_KINDS:
                    for layer, gate in enumerate(gates[kind]):
                        scores[kind][layer] += gate.grad.abs()
                        gate.grad = None
    finally:
        for parameter in trainable:
            parameter.requires_grad_(True)
    return {kind: [score.cpu() for score in per_layer] for kind, per_layer in scores.items()}


def activation_scores(model: Any, batches: Iterable[dict[str, Any]], text_stream: bool) -> Scores:
    """Mean output norm per unit; needs no targets (`text_stream` only keeps the signature of gradient_scores)."""
    model.eval()
    device = next(model.parameters()).device
    data = [as_tensors(batch, device) for batch in batches]
    totals: dict[tuple[str, int], torch.Tensor] = {}
    tokens = torch.zeros(())
    mask: list[torch.Tensor] = []

    def record(kind: str, layer: int, units: torch.Tensor) -> None:
        norms = units.float().norm(dim=-1) * mask[0].unsqueeze(-1)  # (batch, tokens, units), pads at 0
        totals[kind, layer] = totals.get((kind, layer), 0) + norms.sum(dim=(0, 1)).cpu()

    with gated(model, lambda kind, layer: None, record), torch.no_grad():
        for batch in data:
            mask[:] = [batch["attention_mask"].float()]
            tokens += mask[0].sum().cpu()
            model(**batch)
    depth = len(transformer_blocks(model))
    return {kind: [totals[kind, layer] / tokens for layer in range(depth)] for kind in UNIT_KINDS}


def magnitude_scores(model: Any) -> Scores:
    """Frobenius norms of each head's query rows and output-projection columns, and of each neuron's input
    rows and output column. Weights are read as (outputs, inputs) whatever their layer type."""
    arch, size = family(model.config.model_type), head_dim(model)
    scores: Scores = {HEADS: [], NEURONS: []}
    with torch.no_grad():
        for block in transformer_blocks(model):
            out = as_matrix(block.get_submodule(arch.attention_out))
            heads = out.t().reshape(-1, size, out.shape[0]).pow(2).sum(dim=(1, 2))
            if arch.qkv is not None:
                query = as_matrix(block.get_submodule(arch.qkv[0]))
                heads = heads + query.reshape(-1, size, query.shape[1]).pow(2).sum(dim=(1, 2))
            scores[HEADS].append(heads.sqrt().cpu())
            neurons = as_matrix(block.get_submodule(arch.ffn_out)).pow(2).sum(dim=0)
            for path in arch.ffn_in:
                neurons = neurons + as_matrix(block.get_submodule(path)).pow(2).sum(dim=1)
            scores[NEURONS].append(neurons.sqrt().cpu())
    return scores


def as_matrix(module: nn.Module) -> torch.Tensor:
    """The weight as (outputs, inputs): nn.Linear's layout; GPT-2's Conv1D stores it transposed."""
    return module.weight if isinstance(module, nn.Linear) else module.weight.t()


def layer_scores(model: Any, batches: Iterable[dict[str, Any]], text_stream: bool) -> torch.Tensor:
    """Per block: how far the model's predictions move when that block alone is skipped (KL divergence from
    the whole model's, per row or, for a causal LM, per real token), averaged over the batches. The blocks
    before the skipped one replay what they gave the whole model, so a batch costs half the block passes
    of running the model once per skipped block."""
    model.eval()
    blocks = transformer_blocks(model)
    data = [as_tensors(batch, next(model.parameters()).device) for batch in batches]
    rises = [0.0] * len(blocks)
    with torch.no_grad(), without_cache(model):
        for batch in data:
            whole, outputs = predictions_and_block_outputs(model, blocks, batch)
            for index, block in enumerate(blocks):
                for before, output in zip(blocks[:index], outputs):
                    before.forward = replaying(output)
                block.forward = skipping(outputs[index])
                try:
                    skipped = model(**batch).logits.float().log_softmax(-1)
                finally:
                    for replaced in blocks[:index + 1]:
                        del replaced.forward
                rises[index] += divergence(whole, skipped, batch["attention_mask"], text_stream)
    return torch.tensor([rise / len(data) for rise in rises])


def predictions_and_block_outputs(model: Any, blocks: nn.ModuleList, batch: Batch) -> tuple[torch.Tensor, list[Any]]:
    """The whole model's log-probabilities on `batch`, and what each block gave, in order."""
    outputs: list[Any] = []
    hooks = [block.register_forward_hook(lambda module, args, output: outputs.append(output)) for block in blocks]
    try:
        return model(**batch).logits.float().log_softmax(-1), outputs
    finally:
        for hook in hooks:
            hook.remove()


def replaying(output: Any) -> Any:
    """A block forward that returns what the block gave before, without computing it."""
    return lambda *args, **kwargs: output


def skipping(output: Any) -> Any:
    """A block forward that hands its input on, shaped like the block's own `output`."""
    def forward(*args: Any, **kwargs: Any) -> Any:
        hidden = args[0] if args else kwargs["hidden_states"]
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    return forward


@contextmanager
def without_cache(model: Any) -> Iterator[None]:
    """A causal LM's forward without its KV cache: a replayed block would leave its layer of the cache empty."""
    config = model.config
    if not hasattr(config, "use_cache"):
        yield
        return
    used, config.use_cache = config.use_cache, False
    try:
        yield
    finally:
        config.use_cache = used


def divergence(reference: torch.Tensor, other: torch.Tensor, mask: torch.Tensor, text_stream: bool) -> float:
    per_item = torch.nn.functional.kl_div(other, reference, log_target=True, reduction="none").sum(-1)
    if text_stream:
        return ((per_item * mask).sum() / mask.sum()).item()
    return per_item.mean().item()
