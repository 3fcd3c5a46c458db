import pytest

from compress.depths import base_depth, check_depths
from compress.errors import RecipeError
from compress.plan import plan_stages
from compress.recipe import DistillStep, ExportStep, PruneStep


def distill(**student) -> DistillStep:
    return DistillStep(student=student)


def test_the_base_depth_comes_from_the_config(tiny_bert_dir, tmp_path):
    assert base_depth(tiny_bert_dir) == 2
    assert base_depth(tmp_path) is None


@pytest.mark.parametrize(("steps", "expected"), [
    ([distill(layers=[0, 6])], r"steps\[0\].student.layers: block 6 does not exist: the teacher has 6 blocks"),
    ([distill(num_layers=7)], r"steps\[0\].student.num_layers: 7 blocks, deeper than its teacher's 6"),
    # The second student's teacher is the first student, 3 blocks deep.
    ([distill(layers=[1, 3, 5]), distill(layers=[0, 3])], r"steps\[1\].student.layers: block 3 does not exist"),
    ([PruneStep(layers=[0, 1, 2]), distill(num_layers=4)], r"steps\[1\].*4 blocks, deeper than its teacher's 3"),
])
def test_a_student_deeper_than_its_teacher_is_refused_before_any_work(steps, expected):
    with pytest.raises(RecipeError, match=expected):
        check_depths(plan_stages(steps), 6)


def test_students_within_their_teachers_and_unknown_depths_pass():
    check_depths(plan_stages([distill(layers=[1, 3, 5]), distill(num_layers=2), ExportStep()]), 6)
    check_depths(plan_stages([distill(num_layers=12)]), None)
