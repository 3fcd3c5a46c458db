"""Weight-only quantization of the torch model's Linear layers (neural-compressor RTN, GPTQ or AWQ), judged by
the task metric against its input model."""

from __future__ import annotations

import copy
import time
from typing import Any

from compress.algos.weight_only import (
    check_awq_supported,
    check_group_size,
    quantizable_layers,
    quantize_weight_only,
)
from compress.arch import TASKS
from compress.artifact import Artifact, step_record
from compress.context import Context
from compress.errors import NothingToDo
from compress.eval.metrics import evaluate
from compress.eval.runners import TorchRunner
from compress.export.verify import verify_quantized
from compress.recipe import QuantizeStep


def run(artifact: Artifact, step: QuantizeStep, ctx: Context) -> Artifact:
    started = time.perf_counter()
    layers = list(quantizable_layers(artifact.model, step.keep_fp32))
    if not layers:
        raise NothingToDo(f"quantize: keep_fp32 {step.keep_fp32} keeps every Linear layer in float")
    check_group_size({name: artifact.model.get_submodule(name) for name in layers}, step.group_size)
    if step.method == "awq":
        check_awq_supported(artifact.model)
    calibration = None
    if step.method != "rtn":
        calibration = ctx.calibration(artifact.tokenizer, step.calibration.samples, step.calibration.batch_size,
                                      f"quantize {step.method}")
    evalset = ctx.eval_set(artifact.tokenizer).take(step.verify.samples)
    before = evaluate(TorchRunner(artifact.model), evalset, progress=not ctx.quiet)
    # A copy: the input stage may feed other branches.
    model = quantize_weight_only(copy.deepcopy(artifact.model), layers, step.method, step.bits, step.group_size,
                                 step.symmetric, calibration)
    after = evaluate(TorchRunner(model), evalset, progress=not ctx.quiet)
    measured = verify_quantized(before, after, evalset, step.verify, TASKS[artifact.task].higher_is_better)
    effect = {"method": step.method, "bits": step.bits, "group_size": step.group_size, "symmetric": step.symmetric,
              "quantized_layers": len(layers), "bytes_before": model_bytes(artifact.model),
              "bytes_after": model_bytes(model), **measured, "seconds": round(time.perf_counter() - started, 2)}
    return artifact.evolve(step_record(step, **effect), model=model, kind=step.output_kind(artifact.kind))


def model_bytes(model: Any) -> int:
    """The bytes of the weights and buffers it saves, tied tensors counted once."""
    storages = {tensor.untyped_storage().data_ptr(): tensor.untyped_storage().nbytes()
                for tensor in model.state_dict().values()}
    return sum(storages.values())
