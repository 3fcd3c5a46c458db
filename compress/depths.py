"""Blocks a recipe's students keep, checked against their teachers' depth before any work.

The base model's depth is read from its config.json; each step passes it on (a distilled student has its own,
a structured prune that removes blocks subtracts them). A teacher outside the run, or a depth a step only
decides while it runs, is unknown here, and its students are checked by the pass itself.
"""

from __future__ import annotations

import json
from pathlib import Path

from compress.arch import FAMILIES
from compress.errors import RecipeError
from compress.plan import BASE, PlannedStage


def base_depth(directory: Path | str) -> int | None:
    """The number of transformer blocks of the model in `directory`, or None when that is not known here."""
    try:
        config = json.loads((Path(directory) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    known = FAMILIES.get(config.get("model_type"))
    depth = config.get(known.layers_attr) if known else None
    return depth if isinstance(depth, int) else None


def check_depths(stages: list[PlannedStage], depth: int | None) -> None:
    """RecipeError naming the step whose student is deeper than its teacher, or keeps blocks it lacks."""
    depths: dict[str, int | None] = {BASE: depth}
    for index, stage in enumerate(stages[1:]):
        step = stage.step
        depths[stage.name] = depths.get(stage.input)
        if step is None:
            continue
        if step.kind == "distill":
            teacher = depths.get(stage.stage_refs.get(step.teacher, ""))
            depths[stage.name] = _student_depth(step.student, teacher, f"steps[{index}].student")
        elif step.kind == "prune" and getattr(step, "layers", None) is not None:
            depths[stage.name] = None if depths[stage.name] is None or not isinstance(step.layers, list) \
                else depths[stage.name] - len(step.layers)


def _student_depth(student: object, teacher: int | None, where: str) -> int | None:
    if student.layers is not None:
        if teacher is not None and max(student.layers) >= teacher:
            raise RecipeError(f"{where}.layers: block {max(student.layers)} does not exist: the teacher has "
                              f"{teacher} blocks (0 to {teacher - 1})")
        return len(student.layers)
    if student.num_layers is not None:
        if teacher is not None and student.num_layers > teacher:
            raise RecipeError(f"{where}.num_layers: {student.num_layers} blocks, deeper than its teacher's {teacher}")
        return student.num_layers
    if student.model is not None:
        return None
    return None if teacher is None else (teacher + 1) // 2
