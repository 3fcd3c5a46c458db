"""Everything a pass needs from the outside world, so tests can hand it small fakes."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from compress.evalset import EvalSet
from compress.recipe import Recipe


@dataclass
class Context:
    recipe: Recipe
    stage_dir: Path  # the only place a pass may write; the pipeline saves the returned artifact here too
    data: Any = None  # compress.data.TaskData: .train / .eval as `datasets.Dataset`, .label_names
    make_eval_set: Callable[[Any], EvalSet] | None = None  # tokenizer -> EvalSet (cached by the pipeline)
    device: str = "cpu"
    quiet: bool = False  # no progress bars
    log: logging.Logger = field(default_factory=lambda: logging.getLogger("compress"))

    @property
    def seed(self) -> int:
        return self.recipe.seed

    def eval_set(self, tokenizer: Any) -> EvalSet:
        if self.make_eval_set is None:
            raise RuntimeError("this context was built without evaluation data")
        return self.make_eval_set(tokenizer)
