"""A context for running one pass on the tiny models, with a given eval set for every split."""

from __future__ import annotations

from pathlib import Path

import pytest

from compress.context import Context
from compress.evalset import EvalSet


@pytest.fixture
def make_context():
    def make(stage_dir: Path, evalset: EvalSet) -> Context:
        return Context(stage_dir=stage_dir, task=evalset.task, make_eval_set=lambda tokenizer, split: evalset,
                       quiet=True)

    return make
