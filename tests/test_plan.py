"""Stage planning: names, branches, kinds through the step contracts, the baseline and its export."""

from dataclasses import dataclass, field

import pytest

from compress.kinds import Kind
from compress.plan import (
    StepRejects,
    baseline,
    baseline_export,
    parent_on_same_format,
    plan_stages,
    resolve_stage,
    used_as_input,
)
from compress.recipe import Recipe
from compress.recipe_loader import apply_overrides


def steps(*raw: dict) -> list:
    recipe = Recipe.model_validate({"model": "m", "task": "sequence-classification",
                                    "data": {"train": {"path": "t.tsv"}}, "steps": list(raw)})
    return recipe.steps


@dataclass(frozen=True)
class Shrink:
    """A stand-in for a torch step that compresses (distillation, pruning), with a model reference."""

    kind: str = "shrink"
    from_: str | None = None
    name: str | None = None
    teacher: str = "@input"
    compresses: bool = True
    refs: dict = field(default_factory=dict)

    def output_kind(self, given: Kind) -> Kind:
        if given.format != "torch":
            raise StepRejects("shrink works on torch")
        return given.evolve(per_layer_shapes=True)

    def model_refs(self) -> dict[str, str]:
        return {"teacher": self.teacher}


def test_a_chain_gets_names_inputs_and_kinds():
    stages = plan_stages(steps({"kind": "finetune"}, {"kind": "export"}, {"kind": "ort-fuse"}, {"kind": "ptq"}))
    assert [(s.name, s.input) for s in stages] == [("base", None), ("00-finetune", "base"),
                                                  ("01-export", "00-finetune"), ("02-ort-fuse", "01-export"),
                                                  ("03-ptq", "02-ort-fuse")]
    assert [s.kind.describe() for s in stages[2:]] == [
        "ONNX fp32", "ONNX fp32 with ONNX Runtime contrib ops", "ONNX int8 (integer ops) with ONNX Runtime contrib ops"]


def test_branches_hold_side_by_side_variants_of_one_model():
    stages = plan_stages(steps({"kind": "export"}, {"kind": "ptq"}, {"kind": "ort-fuse", "from": "@00-export"},
                               {"kind": "ptq", "from": "@ort-fuse"}))
    assert [(s.name, s.input) for s in stages[1:]] == [("00-export", "base"), ("01-ptq", "00-export"),
                                                      ("02-ort-fuse", "00-export"), ("03-ptq", "02-ort-fuse")]
    assert stages[2].kind.runtime == "portable" and stages[4].kind.runtime == "onnxruntime"
    assert used_as_input(stages) == {"00-export", "02-ort-fuse"}


def test_stage_references_resolve_to_the_last_stage_of_a_kind():
    stages = plan_stages(steps({"kind": "finetune"}, {"kind": "finetune"}, {"kind": "export"}))
    assert resolve_stage("@finetune", stages, "x").name == "01-finetune"
    assert resolve_stage("@00-finetune", stages, "x").name == "00-finetune"
    assert resolve_stage("@base", stages, "x").name == "base"
    with pytest.raises(ValueError, match=r"where: '@ptq' names no earlier stage \(earlier: base, 00-finetune"):
        resolve_stage("@ptq", stages, "where")


def test_the_baseline_is_the_last_uncompressed_torch_model_and_gets_exported():
    stages = plan_stages([*steps({"kind": "finetune"}), Shrink(), *steps({"kind": "export"}, {"kind": "ptq"})])
    reference = baseline(stages, None)
    assert reference.name == "00-finetune"
    extra = baseline_export(stages, reference)
    assert (extra.name, extra.input, extra.step.kind, extra.kind.format) == ("baseline-export", "00-finetune",
                                                                            "export", "onnx")
    assert extra.step.from_ == "@00-finetune"
    assert parent_on_same_format(stages, "03-ptq", {"02-export"}) == "02-export"
    assert parent_on_same_format(stages, "02-export", {"00-finetune", "01-shrink"}) is None
    assert parent_on_same_format(stages, "01-shrink", {"base", "00-finetune"}) == "00-finetune"


def test_no_extra_export_when_the_baseline_itself_is_exported():
    stages = plan_stages(steps({"kind": "finetune"}, {"kind": "export"}, {"kind": "ptq"}))
    assert baseline(stages, None).name == "00-finetune"
    assert baseline_export(stages, baseline(stages, None)) is None
    only_onnx = plan_stages(steps({"kind": "export"}, {"kind": "ptq"}))
    assert baseline(only_onnx, None).name == "base"
    assert baseline(only_onnx, "@00-export").name == "00-export"


def test_model_references_to_stages_are_checked_and_read_from_disk():
    good = plan_stages([*steps({"kind": "finetune"}), Shrink(teacher="@00-finetune")])
    assert "00-finetune" in used_as_input(good) and good[-1].stage_refs == {"@00-finetune": "00-finetune"}
    assert plan_stages([*steps({"kind": "finetune"}), Shrink()])[-1].stage_refs == {"@input": "00-finetune"}
    with pytest.raises(ValueError, match=r"steps\[1\] \(shrink\).teacher: '@02-x' names no earlier stage"):
        plan_stages([*steps({"kind": "finetune"}), Shrink(teacher="@02-x")])
    with pytest.raises(ValueError, match=r"steps\[1\] \(shrink\) would receive ONNX fp32 from 00-export: shrink"):
        plan_stages([*steps({"kind": "export"}), Shrink()])


def test_from_can_be_set_on_the_command_line():
    raw = {"model": "m", "task": "sequence-classification", "data": {"train": {"path": "t.tsv"}},
           "steps": [{"kind": "export"}, {"kind": "ort-fuse"}, {"kind": "ptq"}]}
    recipe = Recipe.model_validate(apply_overrides(raw, ["steps.2.from=@00-export"]))
    assert recipe.steps[2].from_ == "@00-export"
    assert recipe.model_dump(by_alias=True)["steps"][2]["from"] == "@00-export"


def test_ptq_reduce_range_auto_follows_the_cpu_and_enters_the_key(monkeypatch):
    from compress import recipe

    (ptq,) = steps({"kind": "export"}, {"kind": "ptq", "reduce_range": "auto"})[1:]
    monkeypatch.setattr(recipe, "has_vnni", lambda: False)
    assert ptq.resolved_reduce_range() is True and ptq.key_facts()["reduce_range"] is True
    monkeypatch.setattr(recipe, "has_vnni", lambda: True)
    assert ptq.resolved_reduce_range() is False and "isa" in ptq.key_facts()
    (fixed,) = steps({"kind": "export"}, {"kind": "ptq", "reduce_range": True, "weight_type": "int8"})[1:]
    assert fixed.key_facts() == {}


def test_steps_may_name_their_stages_and_be_referred_to_by_that_name():
    stages = plan_stages(steps({"kind": "export"}, {"kind": "ptq", "name": "int8-static", "mode": "static"},
                               {"kind": "ptq", "name": "int4", "mode": "weight-only", "from": "@export"},
                               {"kind": "ort-fuse", "from": "@00-export"}))
    assert [s.name for s in stages[1:4]] == ["00-export", "01-int8-static", "02-int4"]
    assert stages[2].kind.weights == "int8-qdq" and stages[3].input == "00-export"
    with pytest.raises(ValueError, match=r"steps\[4\] \(ptq\) would receive ONNX int8 \(QDQ\) from 01-int8-static"):
        plan_stages(steps({"kind": "export"}, {"kind": "ptq", "name": "int8-static", "mode": "static"},
                          {"kind": "ptq", "name": "int4", "mode": "weight-only", "from": "@export"},
                          {"kind": "ort-fuse", "from": "@00-export"}, {"kind": "ptq", "from": "@int8-static"}))


def test_stage_names_allow_digits_and_hyphens_in_kinds():
    from compress.plan import STAGE_NAME, stage_name

    for kind in ("ort-fuse", "int4-gptq", "ptq"):
        assert STAGE_NAME.match(stage_name(3, kind))
    assert STAGE_NAME.match("base") and STAGE_NAME.match("baseline-export")
    assert not STAGE_NAME.match("notes") and not STAGE_NAME.match(".03-ptq.partial")


def test_auto_precision_puts_the_machine_in_the_key():
    (auto,) = steps({"kind": "finetune", "precision": "auto"})
    (fixed,) = steps({"kind": "finetune", "precision": "bf16"})
    assert "precision_decided_by" in auto.key_facts() and fixed.key_facts() == {}
