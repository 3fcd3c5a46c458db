"""Making the student for knowledge distillation: a layer selection of the teacher, or a smaller config of its
family initialized from the teacher's weights (or at random).

Blocks are numbered from 0 here, as in the model's ModuleList (`kd.py` numbers hidden states, 1-based).
The student block i made by `student_from_config` comes from teacher block `uniform_layers(...)[i]`, the
block that `kd.uniform_layer_map` pairs it with: the hidden-state loss starts where the weights came from.

Every error is a `ValueError` whose message names the `student.*` setting at fault.
"""

from __future__ import annotations

import copy
import operator
from typing import Any

import torch
from torch import nn

from compress.arch import Family, family

INITS = ("teacher", "random")


def default_layers(teacher_layers: int) -> list[int]:
    """Every other block counting from the top, so the last block is always kept:
    6 → [1, 3, 5], 5 → [0, 2, 4]."""
    if teacher_layers < 1:
        raise ValueError(f"student.layers: the teacher has {teacher_layers} layers; it needs at least one")
    return list(range((teacher_layers - 1) % 2, teacher_layers, 2))


def uniform_layers(student_layers: int, teacher_layers: int) -> list[int]:
    """The teacher block each student block comes from, spread evenly and ending on the last block
    (`default_layers(n)` is `uniform_layers(ceil(n / 2), n)`)."""
    if not 1 <= student_layers <= teacher_layers:
        raise ValueError(f"student.num_layers: {student_layers} is not between 1 and the teacher's "
                         f"{teacher_layers} layers")
    return [(i + 1) * teacher_layers // student_layers - 1 for i in range(student_layers)]


def select_layers(teacher: Any, layers: list[int]) -> Any:
    """A copy of `teacher` holding only its blocks `layers` (ascending, distinct), in that order; the teacher
    is untouched. The config's layer count, the blocks' `layer_idx` and any pruned heads follow the new
    numbering, so `save_pretrained` / `from_pretrained` give back the same model."""
    arch = family(teacher.config.model_type)
    blocks = transformer_blocks(teacher)
    check_layers(layers, len(blocks))
    # One memo for the kept blocks and the rest: whatever they share (the config) stays shared in the copy,
    # and the dropped blocks are never copied at all.
    memo: dict[int, Any] = {}
    kept = nn.ModuleList([copy.deepcopy(blocks[i], memo) for i in layers]).train(blocks.training)
    memo[id(blocks)] = kept
    student = copy.deepcopy(teacher, memo)
    for position, block in enumerate(kept):
        renumber(block, position)
    setattr(student.config, arch.layers_attr, len(layers))
    student.config.pruned_heads = rekeyed_pruned_heads(student.config.pruned_heads, layers)
    if getattr(student.config, "layer_shapes", None):
        student.config.layer_shapes = rekeyed_layer_shapes(student.config, layers)
    return student


def check_layers(layers: list[int], teacher_layers: int) -> None:
    if not layers:
        raise ValueError("student.layers: give at least one teacher block")
    for index in layers:
        if not 0 <= index < teacher_layers:
            raise ValueError(f"student.layers: index {index} is out of range for a {teacher_layers}-layer "
                             f"teacher (0-{teacher_layers - 1})")
    for index in layers:
        if layers.count(index) > 1:
            raise ValueError(f"student.layers: index {index} is listed more than once")
    if sorted(layers) != list(layers):
        raise ValueError(f"student.layers: list the blocks in ascending order (got {list(layers)})")


def transformer_blocks(model: Any) -> nn.ModuleList:
    return operator.attrgetter(family(model.config.model_type).layers)(model.base_model)


def renumber(block: nn.Module, position: int) -> None:
    """Attention modules know their block's index (their KV cache slot); a reloaded model numbers them
    0..n-1."""
    for module in block.modules():
        if hasattr(module, "layer_idx"):
            module.layer_idx = position


def rekeyed_pruned_heads(pruned_heads: dict[int, list[int]], layers: list[int]) -> dict[int, list[int]]:
    """The pruned heads of teacher blocks `layers`, keyed by their position in the student."""
    return {position: list(pruned_heads[index])
            for position, index in enumerate(layers) if index in pruned_heads}


def rekeyed_layer_shapes(config: Any, layers: list[int]) -> dict[str, list[int]] | None:
    """Structured pruning's per-block widths (`config.layer_shapes`) of blocks `layers`, in that order."""
    shapes = getattr(config, "layer_shapes", None)
    return {name: [sizes[i] for i in layers] for name, sizes in shapes.items()} if shapes else None


def smaller_config(teacher_config: Any, num_layers: int | None = None, hidden_size: int | None = None,
                   intermediate_size: int | None = None, num_heads: int | None = None) -> Any:
    """A copy of the teacher's config with the given sizes, none larger than the teacher's. Grouped-query
    attention keeps the teacher's query heads per key-value head, and `head_dim` (where the config has one)
    follows the new width and head count."""
    arch = family(teacher_config.model_type)
    sizes = {"num_layers": (arch.layers_attr, num_layers), "hidden_size": (arch.hidden_attr, hidden_size),
             "intermediate_size": (arch.intermediate_attr, intermediate_size),
             "num_heads": (arch.heads_attr, num_heads)}
    config = copy.deepcopy(teacher_config)
    for setting, (attr, size) in sizes.items():
        if size is not None:
            check_size(setting, size, getattr(teacher_config, attr))
            setattr(config, attr, size)
    same_widths = hidden_size is None and intermediate_size is None and num_heads is None
    if not same_widths:
        fit_heads(config, teacher_config, arch)
    # Pruned heads and per-block widths name teacher blocks at the teacher's widths: they carry over to the
    # student's copies of those blocks only when the widths stay.
    config.pruned_heads = {}
    teacher_blocks = uniform_layers(getattr(config, arch.layers_attr), getattr(teacher_config, arch.layers_attr))
    if same_widths:
        config.pruned_heads = rekeyed_pruned_heads(teacher_config.pruned_heads, teacher_blocks)
    if getattr(config, "layer_shapes", None):
        config.layer_shapes = rekeyed_layer_shapes(teacher_config, teacher_blocks) if same_widths else None
    return config


def check_size(setting: str, size: int, teacher_size: int | None) -> None:
    if size < 1:
        raise ValueError(f"student.{setting} must be >= 1 (got {size})")
    # GPT-2 leaves its MLP width unset (None: 4 × hidden): nothing to compare with.
    if teacher_size is not None and size > teacher_size:
        raise ValueError(f"student.{setting}: {size} is larger than the teacher's {teacher_size}")


def fit_heads(config: Any, teacher_config: Any, arch: Family) -> None:
    hidden, heads = getattr(config, arch.hidden_attr), getattr(config, arch.heads_attr)
    if hidden % heads:
        raise ValueError(f"student.hidden_size: {hidden} is not divisible by the number of attention heads "
                         f"{heads} (student.num_heads, or the teacher's)")
    teacher_kv_heads = getattr(teacher_config, "num_key_value_heads", None)
    if teacher_kv_heads:
        group = getattr(teacher_config, arch.heads_attr) // teacher_kv_heads
        if heads % group:
            raise ValueError(f"student.num_heads: {heads} heads cannot keep the teacher's {group} query "
                             f"heads per key-value head (grouped-query attention); choose a multiple of "
                             f"{group}")
        config.num_key_value_heads = heads // group
    if hasattr(config, "head_dim"):
        config.head_dim = hidden // heads


def student_from_config(teacher: Any, config: Any, init: str = "teacher",
                        seed: int = 0) -> tuple[Any, dict[str, Any]]:
    """A model of the teacher's class built from `config` (on the teacher's device, dtype and train/eval mode)
    and a report of its tensors, by state-dict name: `copied` whole from the teacher, `sliced` (the teacher's
    leading rows and columns) or left `random` (the model's own seeded init); with `init="teacher"` also
    `teacher_blocks`, the teacher block each student block comes from (`uniform_layers`)."""
    if init not in INITS:
        raise ValueError(f"student.init must be one of {', '.join(INITS)} (got {init!r})")
    if config.model_type != teacher.config.model_type:
        raise ValueError(f"student: a {config.model_type} config cannot make a student of a "
                         f"{teacher.config.model_type} teacher")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        student = type(teacher)(config)
    student.to(device=teacher.device, dtype=teacher.dtype).train(teacher.training)
    if init == "random":
        return student, {"copied": [], "sliced": [], "random": list(student.state_dict())}
    return student, copy_from_teacher(student, teacher)


def copy_from_teacher(student: Any, teacher: Any) -> dict[str, Any]:
    teacher_blocks = uniform_layers(len(transformer_blocks(student)), len(transformer_blocks(teacher)))
    blocks_prefix = module_name(student, transformer_blocks(student)) + "."
    teacher_state = teacher.state_dict()
    report: dict[str, Any] = {"teacher_blocks": teacher_blocks, "copied": [], "sliced": [], "random": []}
    with torch.no_grad():
        for name, tensor in student.state_dict().items():
            source = teacher_state.get(teacher_name(name, blocks_prefix, teacher_blocks))
            if source is None or not fits_in(tensor.shape, source.shape):
                report["random"].append(name)
                continue
            tensor.copy_(source[tuple(slice(0, size) for size in tensor.shape)])
            report["copied" if tensor.shape == source.shape else "sliced"].append(name)
    return report


def teacher_name(name: str, blocks_prefix: str, teacher_blocks: list[int]) -> str:
    """The teacher's state-dict name for the student's tensor `name`: block i becomes teacher_blocks[i]."""
    if not name.startswith(blocks_prefix):
        return name
    index, _, rest = name[len(blocks_prefix):].partition(".")
    return f"{blocks_prefix}{teacher_blocks[int(index)]}.{rest}"


def module_name(model: nn.Module, target: nn.Module) -> str:
    return next(name for name, module in model.named_modules() if module is target)


def fits_in(shape: torch.Size, teacher_shape: torch.Size) -> bool:
    return len(shape) == len(teacher_shape) and all(s <= t for s, t in zip(shape, teacher_shape))


def same_vocabulary(tokenizer_a: Any, tokenizer_b: Any) -> bool:
    """Same token → id table and the same special tokens at the same ids: the two models read one input."""
    return (tokenizer_a.get_vocab() == tokenizer_b.get_vocab()
            and special_token_ids(tokenizer_a) == special_token_ids(tokenizer_b))


def special_token_ids(tokenizer: Any) -> dict[str, Any]:
    return {role: tokenizer.convert_tokens_to_ids(token)
            for role, token in tokenizer.special_tokens_map.items()}
