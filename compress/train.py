"""The one training loop (on accelerate), for every pass that trains: finetune, distillation, QAT, recovery.

A pass adapts it with a `loss_fn` (the objective: it sees the model's outputs, e.g. against a teacher's) and
with `Callback`s (hooks around each step: masks, scores, penalties, observer freezing), all in one run.
"""

from __future__ import annotations

import json
import logging
import math
import random
import shutil
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from compress.arch import family
from compress.errors import RecipeError
from compress.eval.metrics import evaluate as evaluate_metric
from compress.eval.runners import TorchRunner
from compress.evalset import EvalSet
from compress.rundir import replace_dir
from compress.settings import TrainSettings
from compress.sysinfo import machine_info

log = logging.getLogger("compress")
Batch = dict[str, torch.Tensor]
LossFn = Callable[[Any, Batch], torch.Tensor]  # (model, batch) -> loss
Evaluate = Callable[[Any], dict[str, float]]  # model -> scores
MODEL_FILE, STATE_TENSORS, STATE_JSON = "model.safetensors", "state.safetensors", "state.json"


@dataclass
class TrainState:
    """Where training stands; callbacks read it, checkpoints save it."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # the current epoch, from 0
    micro_step: int = 0  # micro-batches of the current epoch consumed so far
    total_steps: int = 0  # optimizer steps the run will make
    loss: float | None = None  # of the last optimizer step: mean over its micro-batches
    samples: int = 0  # rows trained on, over all processes


class Callback:
    """Hooks into `train`; each does nothing until overridden. `model` is the unwrapped model.

    Per optimizer step, in order: for each of its `grad_accum` micro-batches `on_batch_start(state, batch)`,
    the forward pass in `loss_fn`, then `extra_loss(state, model)`: a tensor the loop adds to that
    micro-batch's loss (a penalty such as L0; it may use activations the forward pass left in hooks), or None;
    then backward. Once all micro-batches are done: `on_after_backward` (the step's whole gradient, unscaled
    under fp16), `optimizer.step()`, `on_step_end`. `on_epoch_end` follows each epoch's evaluation, and
    `on_train_end` comes once. An objective that needs the model's outputs (distillation) is a `loss_fn`.

    `state_dict` goes into checkpoints (JSON values, tensors); `load_state_dict` gets its tensors on the CPU.
    """

    def on_batch_start(self, state: TrainState, batch: Batch) -> None:
        pass

    def extra_loss(self, state: TrainState, model: Any) -> torch.Tensor | None:
        return None

    def on_after_backward(self, state: TrainState, model: Any) -> None:
        pass

    def on_step_end(self, state: TrainState, model: Any) -> None:
        pass

    def on_epoch_end(self, state: TrainState, model: Any) -> None:
        pass

    def on_train_end(self, state: TrainState, model: Any) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def default_loss(model: Any, batch: Batch) -> torch.Tensor:
    return model(**batch).loss


def train(
    model: Any,
    loader: Any,
    settings: TrainSettings,
    *,
    seed: int,
    loss_fn: LossFn = default_loss,
    callbacks: Sequence[Callback] = (),
    evaluate: Evaluate | None = None,
    desc: str = "train",
    quiet: bool = False,
    checkpoint_dir: Path | None = None,
) -> dict[str, Any]:
    """Train `model` in place: AdamW (no decay on biases and norms), linear warm-up then decay, over
    `settings.epochs` (or `max_steps` optimizer steps) of `grad_accum` micro-batches each.

    `loss_fn(model, batch)` is the objective; callbacks add penalties through `Callback.extra_loss`.
    The loader's order is reshuffled each epoch from `seed + epoch`, so that an epoch can be replayed.
    `evaluate(model)` runs after each epoch on the unwrapped model in eval mode, on its device. With
    `checkpoint_dir`, a checkpoint is written every `settings.checkpoint_every` steps and the newest one
    there is resumed: the result is that of an uninterrupted run. The model stays on the training device.

    Returns steps, samples, seconds, samples_per_s (of this call), final_loss (mean of the last tenth of
    the steps), evals (one dict per epoch), precision (the one used) and resumed_from_step (or None).
    """
    from accelerate import Accelerator, DataLoaderConfiguration
    from accelerate.utils import set_seed

    set_seed(seed)
    data_order = DataLoaderConfiguration(use_seedable_sampler=True, data_seed=seed)
    # Autocast and the fp16 scaler are applied here, around the loss only: accelerate's would wrap the model's
    # forward, and evaluation and the returned model would run in reduced precision too.
    accelerator = Accelerator(mixed_precision="no", dataloader_config=data_order)
    precision = resolve_precision(settings.precision, accelerator.device)
    model, loader = accelerator.prepare(model, loader)
    run = TrainingRun(accelerator, model, loader, settings, seed, loss_fn, list(callbacks), precision,
                      checkpoint_dir)
    return run.fit(evaluate, desc, quiet)


def planned_steps(micro_batches: int, settings: TrainSettings) -> int:
    """Optimizer steps a run over `micro_batches` batches an epoch makes."""
    steps_per_epoch = math.ceil(micro_batches / settings.grad_accum)
    return min(steps_per_epoch * settings.epochs, settings.max_steps or math.inf)


def resolve_precision(requested: str, device: torch.device) -> str:
    """fp32, bf16 or fp16: `auto` takes bf16 where the device computes it natively."""
    if requested == "fp16" and device.type != "cuda":
        raise RecipeError(f"precision: fp16 needs a CUDA GPU (a gradient scaler guards it), but training "
                          f"runs on {device.type}; use bf16 or fp32")
    if requested != "auto":
        return requested
    if device.type == "cuda":
        native = torch.cuda.is_bf16_supported()
    else:
        native = bool({"avx512_bf16", "amx_bf16"} & set(machine_info()["isa"]))
    return "bf16" if native else "fp32"


class TrainingRun:
    """One call of `train`: the prepared objects, the state, and what the summary reports."""

    def __init__(self, accelerator: Any, model: Any, loader: Any, settings: TrainSettings, seed: int,
                 loss_fn: LossFn, callbacks: list[Callback], precision: str,
                 checkpoint_dir: Path | None) -> None:
        from transformers import get_linear_schedule_with_warmup

        self.accelerator, self.model, self.loader, self.settings = accelerator, model, loader, settings
        self.module = accelerator.unwrap_model(model)
        self.loss_fn, self.callbacks, self.precision = loss_fn, callbacks, precision
        self.checkpoint_dir = None if checkpoint_dir is None else Path(checkpoint_dir)
        total = planned_steps(len(loader), settings)
        self.state = TrainState(total_steps=total)
        self.optimizer = adamw(self.module, settings)
        warmup = math.ceil(total * settings.warmup_ratio)
        self.scheduler = get_linear_schedule_with_warmup(self.optimizer, warmup, total)
        self.scaler = torch.amp.GradScaler(accelerator.device.type, enabled=precision == "fp16")
        self.losses: list[float] = []
        self.evals: list[dict[str, float]] = []
        # A checkpoint is resumed only by the same run: same settings, seed and data size.
        self.plan = {"settings": settings.model_dump(mode="json"), "seed": seed, "micro_batches": len(loader)}

    def fit(self, evaluate: Evaluate | None, desc: str, quiet: bool) -> dict[str, Any]:
        resumed_from = self.resume()
        started, samples_before = time.perf_counter(), self.state.samples
        bar = tqdm(total=self.state.total_steps, initial=self.state.step, desc=desc, unit="step",
                   disable=quiet or not self.accelerator.is_main_process)
        self.optimizer.zero_grad(set_to_none=True)
        for epoch in range(self.state.epoch, self.settings.epochs):
            if self.state.step >= self.state.total_steps:
                break
            self.state.epoch = epoch
            self.model.train()
            for group in self.micro_batch_groups(epoch):
                if self.state.step >= self.state.total_steps:
                    break
                self.optimizer_step(group)
                bar.update()
                rate = (self.state.samples - samples_before) / (time.perf_counter() - started)
                bar.set_postfix(loss=f"{self.state.loss:.4f}", samples_per_s=f"{rate:.1f}")
                self.maybe_checkpoint()
            self.end_epoch(evaluate, bar)
        bar.close()
        self.call("on_train_end", self.module)
        seconds = time.perf_counter() - started
        tail = self.losses[-max(1, len(self.losses) // 10):]
        return {
            "steps": self.state.step,
            "samples": self.state.samples,
            "seconds": round(seconds, 2),
            "samples_per_s": round((self.state.samples - samples_before) / seconds, 2),
            "final_loss": round(sum(tail) / len(tail), 4) if tail else None,
            "evals": self.evals,
            "precision": self.precision,
            "resumed_from_step": resumed_from,
        }

    def micro_batch_groups(self, epoch: int) -> Iterator[list[Batch]]:
        """The rest of this epoch's batches, `grad_accum` at a time (the last group may be shorter)."""
        self.loader.set_epoch(epoch)
        consumed = self.state.micro_step
        batches = self.accelerator.skip_first_batches(self.loader, consumed) if consumed else self.loader
        return chunks(batches, self.settings.grad_accum)

    def optimizer_step(self, group: list[Batch]) -> None:
        losses = []
        for i, batch in enumerate(group):
            self.call("on_batch_start", batch)
            last = i == len(group) - 1
            with nullcontext() if last else self.accelerator.no_sync(self.model):  # all-reduce once per step
                with self.autocast():
                    loss = self.loss_fn(self.model, batch)
                    loss = sum(self.extra_losses(), loss)
                self.accelerator.backward(self.scaler.scale(loss / len(group)))
            losses.append(loss.detach().float())
            self.state.micro_step += 1
            self.state.samples += len(batch["input_ids"]) * self.accelerator.num_processes
        self.scaler.unscale_(self.optimizer)
        self.call("on_after_backward", self.module)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.state.step += 1
        self.state.loss = torch.stack(losses).mean().item()
        self.losses.append(self.state.loss)
        self.call("on_step_end", self.module)

    def autocast(self) -> Any:
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)
        return torch.autocast(self.accelerator.device.type, dtype=dtype) if dtype else nullcontext()

    def extra_losses(self) -> list[torch.Tensor]:
        extras = (callback.extra_loss(self.state, self.module) for callback in self.callbacks)
        return [extra for extra in extras if extra is not None]

    def end_epoch(self, evaluate: Evaluate | None, bar: Any) -> None:
        if evaluate is not None:
            self.module.eval()
            self.evals.append({"epoch": self.state.epoch + 1, **evaluate(self.module)})
            if not bar.disable:  # tqdm.write prints even for a disabled bar
                bar.write(f"epoch {self.state.epoch + 1}: " + ", ".join(
                    f"{k} {v:.4f}" for k, v in self.evals[-1].items() if k != "epoch"))
        self.call("on_epoch_end", self.module)
        self.state.epoch, self.state.micro_step = self.state.epoch + 1, 0

    def call(self, hook: str, argument: Any) -> None:
        for callback in self.callbacks:
            getattr(callback, hook)(self.state, argument)

    def maybe_checkpoint(self) -> None:
        every = self.settings.checkpoint_every
        if self.checkpoint_dir is None or every is None or self.state.step % every:
            return
        if self.accelerator.is_main_process:
            write_checkpoint(self.checkpoint_dir, self.state.step, self.module, self.snapshot())

    def snapshot(self) -> dict[str, Any]:
        return {
            "plan": self.plan,
            "state": asdict(self.state),
            "losses": self.losses,
            "evals": self.evals,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "callbacks": [callback.state_dict() for callback in self.callbacks],
            "rng": rng_state(),
        }

    def resume(self) -> int | None:
        """Loads the newest checkpoint of this same run, if there is one; returns its step."""
        found = latest_checkpoint(self.checkpoint_dir) if self.checkpoint_dir is not None else None
        if found is None:
            return None
        snapshot = read_snapshot(found)
        if snapshot["plan"] != self.plan:
            log.warning("%s was written by a run with other settings, seed or data; starting afresh", found)
            return None
        from safetensors.torch import load_model

        load_model(self.module, found / MODEL_FILE, device=str(self.accelerator.device))
        self.optimizer.load_state_dict(snapshot["optimizer"])
        self.scheduler.load_state_dict(snapshot["scheduler"])
        self.scaler.load_state_dict(snapshot["scaler"])
        for callback, state in zip(self.callbacks, snapshot["callbacks"], strict=True):
            callback.load_state_dict(state)
        self.state = TrainState(**snapshot["state"])
        self.losses, self.evals = snapshot["losses"], snapshot["evals"]
        restore_rng(snapshot["rng"])
        return self.state.step


def adamw(model: Any, settings: TrainSettings) -> torch.optim.AdamW:
    trainable = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in trainable if p.ndim >= 2]  # no weight decay on biases and norms
    rest = [p for p in trainable if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": settings.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=settings.lr)


def chunks(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    iterator = iter(items)
    while chunk := list(islice(iterator, size)):
        yield chunk


# Checkpoints: `step-NNNNNNNN/` holding the model (safetensors), the other tensors (safetensors) and
# everything else (JSON). Written under a hidden name and renamed when complete, so a directory named
# step-* is always whole; older ones (and partial ones a crash left) are deleted after the rename.

def write_checkpoint(directory: Path, step: int, model: Any, snapshot: dict[str, Any]) -> Path:
    from safetensors.torch import save_file, save_model

    final, partial = directory / f"step-{step:08d}", directory / f".step-{step:08d}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    save_model(model, str(partial / MODEL_FILE))  # handles tied weights, which save_file refuses
    tree, tensors = split_tensors(snapshot)
    save_file(tensors, str(partial / STATE_TENSORS))
    (partial / STATE_JSON).write_text(json.dumps(tree))
    replace_dir(partial, final)
    for older in directory.glob("*step-*"):
        if older != final:
            shutil.rmtree(older)
    return final


def latest_checkpoint(directory: Path) -> Path | None:
    complete = sorted(directory.glob("step-*"))
    return complete[-1] if complete else None


def read_snapshot(checkpoint: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    tree = json.loads((checkpoint / STATE_JSON).read_text())
    return join_tensors(tree, load_file(str(checkpoint / STATE_TENSORS)))


def split_tensors(tree: Any, path: str = "") -> tuple[Any, dict[str, torch.Tensor]]:
    """(JSON-able tree, tensors by path): each tensor becomes {"__tensor__": path}; a dict whose keys are
    not all strings (an optimizer's state is keyed by parameter index) becomes {"__items__": [[k, v]...]}."""
    if isinstance(tree, torch.Tensor):
        return {"__tensor__": path}, {path: tree.detach().contiguous().cpu()}
    if isinstance(tree, dict):
        pairs = [(key, split_tensors(value, f"{path}.{key}")) for key, value in tree.items()]
        tensors = {name: t for _, (_, part) in pairs for name, t in part.items()}
        if all(isinstance(key, str) for key in tree):
            return {key: value for key, (value, _) in pairs}, tensors
        return {"__items__": [[key, value] for key, (value, _) in pairs]}, tensors
    if isinstance(tree, (list, tuple)):
        parts = [split_tensors(value, f"{path}.{i}") for i, value in enumerate(tree)]
        return [value for value, _ in parts], {name: t for _, part in parts for name, t in part.items()}
    return tree, {}


def join_tensors(tree: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(tree, dict):
        if "__tensor__" in tree:
            return tensors[tree["__tensor__"]]
        if "__items__" in tree:
            return {key: join_tensors(value, tensors) for key, value in tree["__items__"]}
        return {key: join_tensors(value, tensors) for key, value in tree.items()}
    if isinstance(tree, list):
        return [join_tensors(value, tensors) for value in tree]
    return tree


def rng_state() -> dict[str, Any]:
    numpy_state = np.random.get_state(legacy=False)
    numpy_state["state"]["key"] = numpy_state["state"]["key"].tolist()
    return {
        "python": random.getstate(),
        "numpy": numpy_state,
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy_state = state["numpy"]
    numpy_state["state"]["key"] = np.asarray(numpy_state["state"]["key"], dtype=np.uint32)
    np.random.set_state(numpy_state)
    torch.set_rng_state(state["torch"])
    if state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])


def scores_on(eval_set: EvalSet, progress: bool = False) -> Evaluate:
    """An `evaluate` for `train`: the model's task metric on `eval_set`, computed on the model's device."""

    def scores(model: Any) -> dict[str, float]:
        result = evaluate_metric(TorchRunner(model), eval_set, progress=progress)
        return {result.name: result.value}

    return scores


def freeze_embeddings(model: Any) -> int:
    """Stop training the embedding tables (the family table says where they are); returns how many weights."""
    module = model.base_model
    for attr in family(model.config.model_type).embeddings.split("."):
        module = getattr(module, attr)
    params = list(module.parameters())
    for parameter in params:
        parameter.requires_grad_(False)
    return sum(p.numel() for p in params)


@contextmanager
def trainability_kept(model: Any) -> Iterator[None]:
    """Whatever a pass freezes to train, the model it returns has the trainable parameters it came with."""
    before = [(parameter, parameter.requires_grad) for parameter in model.parameters()]
    try:
        yield
    finally:
        for parameter, requires_grad in before:
            parameter.requires_grad_(requires_grad)

