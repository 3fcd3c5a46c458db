"""The processes of a multi-process launch (`torchrun`, `accelerate launch`): rank 0 writes, all train."""

from __future__ import annotations

import os
from typing import Any


class Ranks:
    """One process unless launched with several; then the processes meet at `wait()` between stages."""

    def __init__(self) -> None:
        self.count = int(os.environ.get("WORLD_SIZE", "1"))
        self.state: Any = None
        if self.count > 1:
            import torch
            from accelerate import PartialState

            # Joins the process group the launcher set up: NCCL on GPUs, gloo on CPUs (accelerate takes a
            # CPU-only launch for a single process unless told). The training loop's Accelerator shares it.
            self.state = PartialState(cpu=not torch.cuda.is_available())

    @property
    def main(self) -> bool:
        return self.state is None or self.state.is_main_process

    def wait(self) -> None:
        if self.state is not None:
            self.state.wait_for_everyone()
