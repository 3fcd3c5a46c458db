"""Which heads and neurons go: importance scores plus a rule for how many each block keeps.

global: the `ratio` least important units of the whole model (scores normalised per block, as Michel et al.
do for heads, so blocks with larger activations do not keep everything); uniform: `ratio` of every block;
per_layer: explicit counts kept per block; top_k: the same count kept in every block. Within a block the
lowest-scoring units go; in a grouped-query block, evenly from each key-value group. With a `multiple` (FFN
neurons), every block keeps a multiple of it: the width a 4-bit quantizer's group or a GEMM tile divides.

Errors are `ValueError`s naming the recipe field (`heads`, `ffn`, `layers`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

ALLOCATIONS = ("global", "uniform", "per_layer", "top_k")


@dataclass
class Choice:
    removed: dict[int, list[int]]  # block -> unit indices removed
    kept_at_minimum: list[int] = field(default_factory=list)  # blocks the global ranking would have emptied
    emptied: list[int] = field(default_factory=list)  # blocks it did empty (allow_layer_drop): to be dropped


def choose(name: str, scores: list[torch.Tensor], allocation: str, amount: float | list[int],
           groups: list[int], allow_empty: bool = False, normalize: bool = True,
           skip: frozenset[int] = frozenset(), multiple: int = 1) -> Choice:
    """Units to remove per block. `groups[b]`: key-value groups of block b (1 without grouped-query
    attention): a block keeps a multiple of them (and of `multiple`). Blocks in `skip` (being dropped whole)
    are left out."""
    sizes = [len(score) for score in scores]
    if allocation == "global":
        keep, at_minimum, emptied = global_counts(name, scores, float(amount), groups, allow_empty, normalize, skip,
                                                  multiple)
    else:
        keep, at_minimum, emptied = rule_counts(name, sizes, allocation, amount, groups, skip, multiple), [], []
    removed = {layer: lowest(scores[layer], sizes[layer] - keep[layer], groups[layer])
               for layer in range(len(scores))
               if layer not in skip and layer not in emptied and keep[layer] < sizes[layer]}
    return Choice(removed, at_minimum, emptied)


def rule_counts(name: str, sizes: list[int], allocation: str, amount: float | list[int],
                groups: list[int], skip: frozenset[int], multiple: int = 1) -> list[int]:
    check_multiple(name, sizes, skip, multiple)
    if allocation == "uniform":
        keep = [nearest_multiple(size - round(float(amount) * size), multiple, size) for size in sizes]
    elif allocation == "top_k":
        keep = [int(amount)] * len(sizes)
    elif allocation == "per_layer":
        if not isinstance(amount, list) or len(amount) != len(sizes):
            raise ValueError(f"{name}: allocation per_layer needs one count per block ({len(sizes)}), got {amount}")
        keep = list(amount)
    else:
        raise ValueError(f"allocation must be one of {', '.join(ALLOCATIONS)} (got {allocation!r})")
    for layer, (count, size, group) in enumerate(zip(keep, sizes, groups)):
        if layer in skip:
            continue
        if count < 1:
            raise ValueError(f"{name}: block {layer} would keep no {name} (of {size}); keep at least one, or "
                             "remove the block with 'layers'")
        if count > size:
            raise ValueError(f"{name}: block {layer} has {size}, so it cannot keep {count}")
        if count % group:
            raise ValueError(f"{name}: block {layer} keeps {count} of {size} query heads; with {group} "
                             f"key-value groups it must keep a multiple of {group}")
        if count % multiple:
            raise ValueError(f"{name}: block {layer} keeps {count}, not a multiple of {name}_multiple_of "
                             f"({multiple})")
    return keep


def check_multiple(name: str, sizes: list[int], skip: frozenset[int], multiple: int) -> None:
    for layer, size in enumerate(sizes):
        if layer not in skip and size < multiple:
            raise ValueError(f"{name}_multiple_of: block {layer} has {size} {name} units, fewer than {multiple}")


def nearest_multiple(count: int, multiple: int, size: int) -> int:
    """`count` rounded to the nearest multiple (halves up), at most the largest that fits in `size`."""
    return min(int(count / multiple + 0.5) * multiple, size // multiple * multiple)


def global_counts(name: str, scores: list[torch.Tensor], ratio: float, groups: list[int], allow_empty: bool,
                  normalize: bool, skip: frozenset[int], multiple: int = 1) -> tuple[list[int], list[int], list[int]]:
    """Units kept per block when the `ratio` lowest-scoring units of the model go; a block keeps at least one
    key-value group's worth unless `allow_empty`, in which case one that would keep none is emptied."""
    check_multiple(name, [len(score) for score in scores], skip, multiple)
    layers = [layer for layer in range(len(scores)) if layer not in skip]
    ranked = [(value / (score.norm() if normalize and score.norm() > 0 else 1)).item()
              for layer in layers for score in [scores[layer]] for value in score]
    owner = [layer for layer in layers for _ in range(len(scores[layer]))]
    removed_per_layer = dict.fromkeys(layers, 0)
    for index in sorted(range(len(ranked)), key=ranked.__getitem__)[:round(ratio * len(ranked))]:
        removed_per_layer[owner[index]] += 1
    keep = [len(score) for score in scores]
    at_minimum, emptied = [], []
    for layer in layers:
        size, group = len(scores[layer]), groups[layer]
        ranked_kept = size - removed_per_layer[layer]
        count = int(ranked_kept / group + 0.5) * group  # the nearest whole number of groups, halves up
        if ranked_kept == 0 and allow_empty:
            emptied.append(layer)
        elif ranked_kept < group:  # held at one group's worth, which the ranking would have gone below
            at_minimum.append(layer)
            count = group
        keep[layer] = max(nearest_multiple(count, multiple, size), multiple)
    return keep, at_minimum, emptied


def lowest(scores: torch.Tensor, count: int, groups: int) -> list[int]:
    """The `count` lowest-scoring units; with key-value groups, count / groups from each group."""
    per_group = len(scores) // groups
    chosen = []
    for group in range(groups):
        start = group * per_group
        order = torch.argsort(scores[start:start + per_group], stable=True)
        chosen += [start + int(i) for i in order[:count // groups]]
    return sorted(chosen)


def layers_to_drop(scores: torch.Tensor, amount: float | list[int]) -> list[int]:
    """Blocks removed whole: the listed indices, or the `amount` fraction whose skipping costs least."""
    depth = len(scores)
    if isinstance(amount, list):
        for index in amount:
            if not 0 <= index < depth:
                raise ValueError(f"layers: index {index} is out of range for a {depth}-block model (0-{depth - 1})")
        chosen = sorted(set(amount))
    else:
        chosen = sorted(int(i) for i in torch.argsort(scores, stable=True)[:round(amount * depth)])
    if len(chosen) >= depth:
        raise ValueError(f"layers: removing {len(chosen)} of {depth} blocks leaves none")
    return chosen
