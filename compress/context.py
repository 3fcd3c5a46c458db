"""Everything a pass may ask of the outside world, so tests can hand it small fakes.

Data comes tokenized: training loaders, calibration batches, and numpy evaluation sets for the `eval` split
(the reported metric: verification only) and the `validation` split (for anything that tunes). Models other
than the step's input come through `model(ref)`, whose content hash the pipeline has put in the stage key.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from compress.errors import CompressError, DataError
from compress.evalset import EvalSet


@dataclass
class Context:
    stage_dir: Path  # the only place a pass may write; the pipeline saves the returned artifact here too
    task: str
    seed: int = 0
    max_length: int = 128  # classification: truncation; causal LM: block / context length
    data: Any = None  # compress.data.TaskData
    make_eval_set: Callable[[Any, str], EvalSet] | None = None  # (tokenizer, split) -> EvalSet, cached
    resolve_model: Callable[[str], Any] | None = None  # model reference -> Artifact
    checkpoint_dir: Path | None = None  # where a training stage keeps resumable checkpoints (kept across crashes)
    train_data: Any = None  # the step's own training rows (a DataSource), in place of data.train
    device: str = "cpu"
    quiet: bool = False  # no progress bars
    log: logging.Logger = field(default_factory=lambda: logging.getLogger("compress"))

    def eval_set(self, tokenizer: Any) -> EvalSet:
        """The reported metric's rows: for verifying a pass, never for tuning one."""
        return self._evals(tokenizer, "eval")

    def validation_set(self, tokenizer: Any) -> EvalSet:
        """Rows withheld from training, for anything that tunes (per-epoch scores, sensitivity, search)."""
        return self._evals(tokenizer, "validation")

    def train_loader(self, tokenizer: Any, batch_size: int, row_ids: bool = False) -> Any:
        from compress.loaders import train_loader

        return train_loader(self._data().training_rows(self.train_data), tokenizer, self.task, self.max_length, batch_size,
                            self.seed, row_ids)

    def calibration(self, tokenizer: Any, samples: int, batch_size: int = 8,
                    purpose: str = "calibration") -> list[dict[str, Any]]:
        """`samples` seeded rows of the calibration source (never the eval set), tokenized, as numpy batches.
        Fewer available: a warning naming `purpose`, and all of them; none: DataError naming data.calib."""
        from compress.loaders import calibration_batches

        batches = calibration_batches(self._data().table("calib"), tokenizer, self.task, self.max_length, samples,
                                      batch_size, self.seed)
        rows = sum(len(batch["input_ids"]) for batch in batches)
        if not rows:
            raise DataError(f"data.calib: {purpose} calibrates on rows, and data.calib (by default data.train) "
                            "holds none")
        if rows < samples:
            self.log.warning("%s: %d calibration rows asked for, %d available; using them all", purpose, samples,
                             rows)
        return batches

    def model(self, ref: str) -> Any:
        """The artifact a model reference names: "@input", "@00-finetune", "@finetune", or a model spec."""
        if self.resolve_model is None:
            raise CompressError(f"model reference {ref!r}: this context was built without model references")
        return self.resolve_model(ref)

    def _evals(self, tokenizer: Any, split: str) -> EvalSet:
        if self.make_eval_set is None:
            raise CompressError("this context was built without evaluation data")
        return self.make_eval_set(tokenizer, split)

    def _data(self) -> Any:
        if self.data is None:
            raise CompressError("this context was built without task data")
        return self.data
