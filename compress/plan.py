"""The stages a recipe will make, checked before any work: names, inputs (branches), kinds, the baseline.

Each step names its input with `from` ("@01-export", "@export" for the last stage of that kind, "@base";
default: the previous step) and says through `output_kind` what it makes of the kind it receives, or why it
cannot take it. Walking the steps here rejects an impossible recipe with the step and the kind it would get.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from compress.kinds import TORCH_FP32, Kind

BASE = "base"
BASELINE_EXPORT = "baseline-export"
STAGE_NAME = re.compile(r"^(base|baseline-export|\d\d-[a-z][a-z0-9-]*)$")


class StepRejects(ValueError):
    """A step cannot take the kind it would receive; the message says why and what to do."""


@dataclass(frozen=True)
class PlannedStage:
    name: str
    step: Any  # a recipe Step; None for the base model
    input: str | None  # the stage this one is computed from
    kind: Kind
    stage_refs: dict[str, str] = field(default_factory=dict)  # "@input", "@finetune", ... -> the stage named


def stage_name(index: int, name: str) -> str:
    return f"{index:02d}-{name}"


def plan_stages(steps: list[Any]) -> list[PlannedStage]:
    """Base, then one stage per step, each with its input and output kind; ValueError names the bad step."""
    stages = [PlannedStage(BASE, None, None, TORCH_FP32)]
    for index, step in enumerate(steps):
        where = f"steps[{index}] ({step.kind})"
        source = resolve_stage(step.from_, stages, f"{where}.from") if step.from_ else stages[-1]
        refs = {ref: source.name if ref == "@input" else resolve_stage(ref, stages, f"{where}.{name}").name
                for name, ref in step.model_refs().items() if ref.startswith("@")}
        try:
            kind = step.output_kind(source.kind)
        except StepRejects as why:
            raise ValueError(f"{where} would receive {source.kind.describe()} from {source.name}: {why}") from None
        stages.append(PlannedStage(stage_name(index, step.name or step.kind), step, source.name, kind, refs))
    return stages


def resolve_stage(ref: str, stages: list[PlannedStage], where: str) -> PlannedStage:
    """'@01-export' names a stage; '@export' the last stage made by an export step (or named 'export');
    '@base' the base model."""
    wanted = ref.removeprefix("@")
    for stage in reversed(stages):
        if stage.name == wanted or (stage.step is not None and wanted in (stage.step.kind, stage.step.name)):
            return stage
    names = ", ".join(stage.name for stage in stages)
    raise ValueError(f"{where}: {ref!r} names no earlier stage (earlier: {names})")


def baseline(stages: list[PlannedStage], requested: str | None) -> PlannedStage:
    """The uncompressed model: the one named, else the last stage reached from the base by torch steps that
    do not compress (the base model or the fine-tuned one)."""
    if requested:
        return resolve_stage(requested, stages, "bench.baseline")
    uncompressed = {BASE}
    for stage in stages[1:]:
        if stage.input in uncompressed and not stage.step.compresses and stage.kind.format == "torch":
            uncompressed.add(stage.name)
    return [stage for stage in stages if stage.name in uncompressed][-1]


def baseline_export(stages: list[PlannedStage], reference: PlannedStage) -> PlannedStage | None:
    """When the recipe exports but never the baseline itself, the baseline is exported with the first export
    step's settings, so every compressed ONNX row has an uncompressed ONNX row beside it."""
    if reference.kind.format != "torch":
        return None
    exports = [stage for stage in stages if stage.step is not None and stage.step.kind == "export"]
    if not exports or any(stage.input == reference.name for stage in exports):
        return None
    step = exports[0].step.model_copy(update={"from_": f"@{reference.name}"})
    return PlannedStage(BASELINE_EXPORT, step, reference.name, step.output_kind(reference.kind),
                        {"@input": reference.name})


def parent_on_same_format(stages: list[PlannedStage], name: str, shown: set[str]) -> str | None:
    """The nearest ancestor among `shown` that deploys the same way: an int8 graph's fp32 graph."""
    by_name = {stage.name: stage for stage in stages}
    stage = by_name[name]
    ancestor = by_name.get(stage.input) if stage.input else None
    while ancestor is not None:
        if ancestor.name in shown and ancestor.kind.format == stage.kind.format:
            return ancestor.name
        ancestor = by_name.get(ancestor.input) if ancestor.input else None
    return None


def used_as_input(stages: list[PlannedStage]) -> set[str]:
    """Stages some later step reads from disk by name (a branch or a model reference)."""
    named = set()
    for stage in stages[1:]:
        if stage.step.from_:
            named.add(stage.input)
        named |= {name for ref, name in stage.stage_refs.items() if ref != "@input"}
    return named
