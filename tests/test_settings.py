from __future__ import annotations

import pytest
from pydantic import ValidationError

from compress.settings import BenchConfig


def test_bench_times_generation_after_a_full_prompt_by_default():
    config = BenchConfig()
    assert (config.new_tokens, config.generation_runs) == (32, 10)


@pytest.mark.parametrize(("fields", "message"), [
    ({"rounds": 12, "runs": 11, "generation_runs": 12}, r"\bruns \(11\) must be at least rounds \(12\)"),
    ({"rounds": 4, "generation_runs": 3}, r"generation_runs \(3\) must be at least rounds \(4\)"),
    ({"new_tokens": 1}, "new_tokens"),
])
def test_bench_refuses_rounds_it_cannot_fill_and_generation_without_a_step_after_the_first_token(fields, message):
    with pytest.raises(ValidationError, match=message):
        BenchConfig(**fields)
