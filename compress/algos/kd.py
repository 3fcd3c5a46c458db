"""Knowledge-distillation losses: soft logits, hidden states, attention maps and self-attention relations.

Conventions of every function here:

- Layers are numbered as in HF `output_hidden_states`: 0 is the embeddings' output and i (1..num_layers) is
  block i's output. Blocks keep that 1-based number everywhere (attention maps: block i is
  `attentions[i - 1]`; `capture_qkv(..., block_index=i)`), so one mapping from `uniform_layer_map` serves
  `hidden_mse` and `attention_kd` alike.
- `mask` is the attention mask [B, L] (bool, or 1 for real tokens); padding never counts.
- Student and teacher read the same tokens (one tokenizer): positions line up one to one.
- Teacher tensors are targets: compute them under `torch.no_grad()`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from compress.arch import Family

Pair = tuple[int, int]  # (student index, teacher index)
QKV = tuple[Tensor, Tensor, Tensor]  # query, key and value projection outputs [B, L, width] of one block
RELATION_NAMES = ("query", "key", "value")


def logit_kd(student_logits: Tensor, teacher_logits: Tensor, temperature: float,
             mask: Tensor | None = None) -> Tensor:
    """T² · KL(softmax(teacher / T) ‖ softmax(student / T)), averaged over rows for classification ([B, C]),
    or over the positions where `mask` [B, L] is true for a causal LM ([B, L, V])."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"logit KD needs logits of one shape (same classes or vocabulary), but the "
                         f"student's are {tuple(student_logits.shape)} and the teacher's "
                         f"{tuple(teacher_logits.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 (got {temperature})")
    # fp32: a bf16 softmax over a large vocabulary loses the small probabilities that soft targets carry.
    log_student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    per_row = F.kl_div(log_student, log_teacher, log_target=True, reduction="none").sum(-1)
    return temperature**2 * masked_mean(per_row, mask)


def masked_mean(values: Tensor, mask: Tensor | None) -> Tensor:
    """Mean of `values` where `mask` (broadcast to their shape) is true; 0 when nothing is."""
    if mask is None:
        return values.mean()
    mask = mask.bool().expand_as(values)
    return torch.where(mask, values, 0.0).sum() / mask.sum().clamp(min=1)


def hidden_mse(student_hidden: Sequence[Tensor], teacher_hidden: Sequence[Tensor], mapping: Sequence[Pair],
               projections: nn.ModuleList | None = None, mask: Tensor | None = None) -> Tensor:
    """Mean squared error between mapped hidden states (HF `output_hidden_states` tuples), over real tokens,
    averaged over the pairs. `projections[i]` maps the student's states of pair i to the teacher's width."""
    pairs = check_layer_map(mapping, len(student_hidden) - 1, len(teacher_hidden) - 1)
    if projections is not None and len(projections) != len(pairs):
        raise ValueError(f"hidden_mse: {len(projections)} projections for {len(pairs)} mapped pairs; "
                         f"give one per pair (make_projections)")
    losses = []
    for i, (s, t) in enumerate(pairs):
        student = student_hidden[s] if projections is None else projections[i](student_hidden[s])
        teacher = teacher_hidden[t]
        if student.shape[-1] != teacher.shape[-1]:
            raise ValueError(f"hidden_mse: pair {(s, t)}: the student's width {student.shape[-1]} differs "
                             f"from the teacher's {teacher.shape[-1]}; map it with make_projections")
        per_token = (student.float() - teacher.float()).pow(2).mean(-1)
        losses.append(masked_mean(per_token, mask))
    return torch.stack(losses).mean()


def make_projections(student_width: int, teacher_width: int,
                     pairs: Sequence[Pair]) -> nn.ModuleList | None:
    """One Linear(student_width, teacher_width) per mapped pair, or None when the widths match. Train them
    with the student; they are no part of the compressed model."""
    if student_width == teacher_width:
        return None
    return nn.ModuleList(nn.Linear(student_width, teacher_width) for _ in pairs)


def uniform_layer_map(student_layers: int, teacher_layers: int) -> list[Pair]:
    """TinyBERT's uniform mapping, in hidden-state indices: embeddings to embeddings, then student block s to
    teacher block s·N/M (rounded down where M does not divide N), so the last block maps to the last."""
    if student_layers < 1 or teacher_layers < 1:
        raise ValueError(f"layer counts must be >= 1 (got student {student_layers}, "
                         f"teacher {teacher_layers})")
    return [(s, s * teacher_layers // student_layers) for s in range(student_layers + 1)]


def check_layer_map(mapping: Sequence[Sequence[int]], student_layers: int, teacher_layers: int) -> list[Pair]:
    """The mapping as (student, teacher) pairs of hidden-state indices, each within 0..its model's depth;
    a ValueError names the first bad pair and index."""
    if not mapping:
        raise ValueError("the layer mapping is empty: give at least one (student, teacher) pair")
    pairs = [tuple(pair) for pair in mapping]
    for position, pair in enumerate(pairs):
        if len(pair) != 2:
            raise ValueError(f"layer mapping[{position}] = {pair}: expected a (student, teacher) pair")
        check_layer_index(position, pair, "student", pair[0], student_layers)
        check_layer_index(position, pair, "teacher", pair[1], teacher_layers)
    return pairs


def check_layer_index(position: int, pair: tuple[int, ...], side: str, index: int, layers: int) -> None:
    if not 0 <= index <= layers:
        raise ValueError(f"layer mapping[{position}] = {pair}: {side} index {index} is outside 0..{layers} "
                         f"(0 is the embeddings, i is block i of the {side}'s {layers})")


def attention_kd(student_attentions: Sequence[Tensor] | None, teacher_attentions: Sequence[Tensor] | None,
                 mapping: Sequence[Pair], mask: Tensor | None = None) -> Tensor:
    """TinyBERT's attention loss: MSE between the attention probabilities [B, heads, L, L] of mapped blocks,
    over real (query, key) positions, averaged over the pairs.

    `mapping` is in hidden-state numbering (block i is index i, `attentions[i - 1]`), so the mapping given to
    `hidden_mse` serves here too: its (0, 0) embeddings pair has no attention and is skipped. The heads are
    compared one to one, so their counts must be equal; across head counts use `relation_kd`.
    """
    require_attentions(student_attentions, "student")
    require_attentions(teacher_attentions, "teacher")
    pair_mask = None if mask is None else real_pairs(mask)[:, None]  # [B, 1, L, L], broadcast over heads
    losses = []
    for s, t in block_pairs(mapping, len(student_attentions), len(teacher_attentions)):
        student, teacher = student_attentions[s - 1], teacher_attentions[t - 1]
        if student.shape[1] != teacher.shape[1]:
            raise ValueError(f"attention KD compares heads one to one, but student block {s} has "
                             f"{student.shape[1]} heads and teacher block {t} has {teacher.shape[1]}; use "
                             f"relation KD (relation_kd, relation_weight) instead: it works across head "
                             f"counts")
        losses.append(masked_mean((student.float() - teacher.float()).pow(2), pair_mask))
    return torch.stack(losses).mean()


def require_attentions(attentions: Sequence[Tensor] | None, whose: str) -> None:
    if attentions is None or any(block is None for block in attentions):
        raise ValueError(f"the {whose}'s attention maps are missing: call it with output_attentions=True, "
                         f"and load it with attn_implementation='eager' (sdpa and flash attention return "
                         f"none)")


def real_pairs(mask: Tensor) -> Tensor:
    """[B, L, L]: true where both the query and the key are real tokens."""
    real = mask.bool()
    return real[:, :, None] & real[:, None, :]


def block_pairs(mapping: Sequence[Pair], student_blocks: int, teacher_blocks: int) -> list[Pair]:
    """The pairs of `mapping` between blocks (both indices >= 1): the (0, 0) embeddings pair is dropped."""
    pairs = [pair for pair in check_layer_map(mapping, student_blocks, teacher_blocks) if pair != (0, 0)]
    for pair in pairs:
        if 0 in pair:
            raise ValueError(f"attention KD maps blocks to blocks, but {pair} maps the embeddings (index 0) "
                             f"to a block; blocks are numbered from 1, as in hidden states")
    if not pairs:
        raise ValueError("attention KD needs at least one pair of blocks (indices >= 1) in the mapping")
    return pairs


def relation_kd(student_qkv: QKV, teacher_qkv: QKV, relation_heads: int,
                mask: Tensor | None = None) -> Tensor:
    """MiniLM v2's self-attention relation loss between one student block and one teacher block.

    Each of q, k, v [B, L, width] is split on its own into `relation_heads` heads; per head the relation
    softmax(X·Xᵀ/√d) scores every real key for each query. The loss is KL(teacher ‖ student) per real query
    row, averaged over heads and real queries, summed over Q-Q, K-K and V-V as in the paper. Widths and the
    models' head counts may differ (grouped-query k and v are narrower than q): each width must be divisible
    by `relation_heads`.
    """
    losses = [relation_loss(name, student, teacher, relation_heads, mask)
              for name, student, teacher in zip(RELATION_NAMES, student_qkv, teacher_qkv, strict=True)]
    return torch.stack(losses).sum()


def relation_loss(name: str, student: Tensor, teacher: Tensor, relation_heads: int,
                  mask: Tensor | None) -> Tensor:
    """KL(teacher ‖ student) of one relation (Q-Q, K-K or V-V), averaged over heads and real queries."""
    if student.shape[:2] != teacher.shape[:2]:
        raise ValueError(f"relation KD: the student's {name} covers (batch, length) "
                         f"{tuple(student.shape[:2])} but the teacher's {tuple(teacher.shape[:2])}; "
                         f"feed both the same tokens")
    log_student = log_relations(student, relation_heads, mask, f"student's {name}")
    log_teacher = log_relations(teacher, relation_heads, mask, f"teacher's {name}")
    per_query = F.kl_div(log_student, log_teacher, log_target=True, reduction="none").sum(-1)  # [B, heads, L]
    return masked_mean(per_query, None if mask is None else mask.bool()[:, None])


def log_relations(states: Tensor, relation_heads: int, mask: Tensor | None, what: str) -> Tensor:
    """log softmax(X·Xᵀ/√d) per relation head: [B, relation_heads, L, L], masked keys at probability 0."""
    batch, length, width = states.shape
    if relation_heads < 1 or width % relation_heads:
        raise ValueError(f"relation KD: the {what} width {width} is not divisible by relation_heads="
                         f"{relation_heads}; choose a count that divides the q, k and v widths of both "
                         f"models")
    head_width = width // relation_heads
    heads = states.float().reshape(batch, length, relation_heads, head_width).transpose(1, 2)
    scores = heads @ heads.transpose(-1, -2) / math.sqrt(head_width)
    if mask is not None:
        # The lowest float rather than -inf: masked keys still get probability 0, and the KL's log terms
        # (and a fully padded row) stay finite instead of turning into NaN.
        scores = scores.masked_fill(~mask.bool()[:, None, None, :], torch.finfo(scores.dtype).min)
    return F.log_softmax(scores, dim=-1)


class QKVCapture:
    """What `capture_qkv` collected: the block's q, k and v projection outputs in the latest forward pass."""

    def __init__(self) -> None:
        self.outputs: dict[str, Tensor] = {}

    @property
    def qkv(self) -> QKV:
        if len(self.outputs) != len(RELATION_NAMES):
            raise RuntimeError("no forward pass has gone through the captured block yet")
        q, k, v = (self.outputs[name] for name in RELATION_NAMES)
        return q, k, v


@contextmanager
def capture_qkv(model: Any, family: Family, block_index: int) -> Iterator[QKVCapture]:
    """Hooks the q, k and v projections of block `block_index` (1-based, as in hidden states) of a HF model
    (blocks at `family.layers` under `model.base_model`, projections at `family.qkv`); each forward pass
    replaces what the capture holds. The hooks are removed on exit."""
    if family.qkv is None:
        raise ValueError(f"relation KD is not available for {model.config.model_type}: its attention "
                         f"computes q, k and v in one fused projection (Family.qkv is None in "
                         f"compress/arch.py)")
    blocks = model.base_model.get_submodule(family.layers)
    if not 1 <= block_index <= len(blocks):
        raise ValueError(f"block_index {block_index} is outside 1..{len(blocks)} (blocks are numbered "
                         f"from 1, as in hidden states)")
    block, capture = blocks[block_index - 1], QKVCapture()
    handles = [block.register_forward_pre_hook(lambda *_: capture.outputs.clear())]
    for name, path in zip(RELATION_NAMES, family.qkv, strict=True):
        handles.append(block.get_submodule(path).register_forward_hook(keep_output(capture.outputs, name)))
    try:
        yield capture
    finally:
        for handle in handles:
            handle.remove()


def keep_output(outputs: dict[str, Tensor], name: str) -> Any:
    def hook(module: nn.Module, inputs: Any, output: Tensor) -> None:
        outputs[name] = output

    return hook


class DistillLoss(nn.Module):
    """alpha·soft + (1 - alpha)·hard + hidden_weight·hidden + attention_weight·attention
    + relation_weight·relation, where soft is `logit_kd` at `temperature`, hard the student's own loss on the
    labels (`outputs.loss`), hidden `hidden_mse` and attention `attention_kd` over `mapping`, and relation
    `relation_kd` over the q/k/v that `capture_qkv` collected. A module, so that the projections are
    parameters: give them to the optimizer with the student's, and drop them after training.
    """

    def __init__(self, *, alpha: float = 1.0, temperature: float = 2.0, hidden_weight: float = 0.0,
                 attention_weight: float = 0.0, relation_weight: float = 0.0,
                 mapping: Sequence[Pair] | None = None, projections: nn.ModuleList | None = None,
                 relation_heads: int | None = None) -> None:
        super().__init__()
        weights = {"hidden_weight": hidden_weight, "attention_weight": attention_weight,
                   "relation_weight": relation_weight}
        check_settings(alpha, temperature, weights)
        if (hidden_weight or attention_weight) and not mapping:
            raise ValueError("hidden_weight and attention_weight need a layer mapping (uniform_layer_map)")
        if relation_weight and relation_heads is None:
            raise ValueError("relation_weight needs relation_heads")
        self.alpha, self.temperature = alpha, temperature
        self.hidden_weight, self.attention_weight = hidden_weight, attention_weight
        self.relation_weight = relation_weight
        self.mapping = None if mapping is None else [tuple(pair) for pair in mapping]
        self.projections = projections
        self.relation_heads = relation_heads

    @property
    def needs_hidden_states(self) -> bool:
        return self.hidden_weight > 0

    @property
    def needs_attentions(self) -> bool:
        return self.attention_weight > 0

    @property
    def needs_qkv(self) -> bool:
        return self.relation_weight > 0

    @property
    def output_flags(self) -> dict[str, bool]:
        """Keyword arguments for both models' forward calls."""
        return {"output_hidden_states": self.needs_hidden_states, "output_attentions": self.needs_attentions}

    def forward(self, student_outputs: Any, teacher_outputs: Any, attention_mask: Tensor,
                student_qkv: QKV | None = None, teacher_qkv: QKV | None = None,
                target_mask: Tensor | None = None) -> tuple[Tensor, dict[str, float]]:
        """(total, parts): parts are the weighted terms as floats, for logging. For a causal LM the logit KD
        is per token over `target_mask` (by default the attention mask) and the hard loss is the LM loss."""
        terms = self.weighted_terms(student_outputs, teacher_outputs, attention_mask, student_qkv,
                                    teacher_qkv, target_mask)
        return sum(terms.values()), {name: term.detach().item() for name, term in terms.items()}

    def weighted_terms(self, student: Any, teacher: Any, attention_mask: Tensor, student_qkv: QKV | None,
                       teacher_qkv: QKV | None, target_mask: Tensor | None) -> dict[str, Tensor]:
        terms = {}
        if self.alpha > 0:
            per_token = student.logits.dim() == 3
            scored = (attention_mask if target_mask is None else target_mask) if per_token else None
            terms["soft"] = self.alpha * logit_kd(student.logits, teacher.logits, self.temperature, scored)
        if self.alpha < 1:
            terms["hard"] = (1 - self.alpha) * hard_loss(student)
        if self.hidden_weight:
            require_hidden_states(student, teacher)
            terms["hidden"] = self.hidden_weight * hidden_mse(student.hidden_states, teacher.hidden_states,
                                                              self.mapping, self.projections, attention_mask)
        if self.attention_weight:
            terms["attention"] = self.attention_weight * attention_kd(student.attentions, teacher.attentions,
                                                                      self.mapping, attention_mask)
        if self.relation_weight:
            if student_qkv is None or teacher_qkv is None:
                raise ValueError("relation_weight needs student_qkv and teacher_qkv (collect them with "
                                 "capture_qkv)")
            terms["relation"] = self.relation_weight * relation_kd(student_qkv, teacher_qkv,
                                                                   self.relation_heads, attention_mask)
        return terms


def check_settings(alpha: float, temperature: float, weights: dict[str, float]) -> None:
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be within [0, 1] (got {alpha})")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 (got {temperature})")
    for name, weight in weights.items():
        if weight < 0:
            raise ValueError(f"{name} must be >= 0 (got {weight})")


def hard_loss(student_outputs: Any) -> Tensor:
    if student_outputs.loss is None:
        raise ValueError("alpha < 1 weighs in the hard loss (the student's own loss on the labels), but the "
                         "student computed none: pass labels with the batch, or set alpha=1")
    return student_outputs.loss


def require_hidden_states(*outputs: Any) -> None:
    if any(output.hidden_states is None for output in outputs):
        raise ValueError("hidden_weight > 0 needs hidden states: call both models with "
                         "output_hidden_states=True")
