"""The recipe schema. It is also the registry of passes: a step's `kind` names its pass module.

Adding a pass = one step class here + one line in `AnyStep` + `compress/passes/<kind>.py` with `run()`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, get_args

from pydantic import (
    BaseModel,
    Field,
    PositiveInt,
    ValidationInfo,
    field_validator,
    model_validator,
)

from compress.settings import BenchConfig, FloatTolerance, QuantTolerance, Strict, TrainSettings

Task = Literal["sequence-classification", "causal-lm"]

# Where a step works: on the torch model, by turning it into an ONNX graph, or on that graph.
TORCH, EXPORT, ONNX = "torch", "export", "onnx"


class DataSource(Strict):
    """One table or text file: a local file (csv, tsv, jsonl, txt) or a hub dataset."""

    path: str | None = None  # local file, relative to the recipe file
    dataset: str | None = None  # hub dataset name, used only when `path` is not given
    subset: str | None = None  # hub dataset configuration, e.g. 'sst2' of 'glue'
    split: str = "train"  # hub dataset split
    text: str = "text"  # column holding the text
    text_pair: str | None = None  # second text column, for sentence pairs
    label: str = "label"  # column holding the label (classification only)
    columns: list[str] | None = None  # names for a header-less csv/tsv, in file order
    limit: PositiveInt | None = None  # keep only the first N rows

    @field_validator("path")
    @classmethod
    def _relative_to_recipe(cls, value: str | None, info: ValidationInfo) -> str | None:
        base = (info.context or {}).get("base_dir")
        if value is None or base is None:
            return value
        return str((Path(base) / Path(value).expanduser()).resolve())

    @model_validator(mode="after")
    def _one_source(self) -> DataSource:
        if (self.path is None) == (self.dataset is None):
            raise ValueError("give exactly one of 'path' (a local file) or 'dataset' (a hub dataset name)")
        return self


class DataConfig(Strict):
    train: DataSource | None = None
    eval: DataSource | None = None
    eval_fraction: float = Field(0.1, gt=0, lt=1)  # carved from train (seeded) when `eval` is absent
    labels: list[str] | None = None  # declared label names, in id order; inferred from train otherwise
    max_length: PositiveInt = 128  # classification: truncation; causal LM: context length
    stride: PositiveInt | None = None  # causal LM perplexity window step (default: max_length)
    max_eval_tokens: PositiveInt | None = 16384  # causal LM: token cap for perplexity
    max_eval_rows: PositiveInt | None = None  # classification: cap on eval rows

    @model_validator(mode="after")
    def _some_data(self) -> DataConfig:
        if self.train is None and self.eval is None:
            raise ValueError("give 'train', 'eval' or both")
        if self.stride is not None and self.stride > self.max_length:
            raise ValueError(f"stride ({self.stride}) must not exceed max_length ({self.max_length})")
        return self


class Step(Strict):
    level: ClassVar[str]
    needs_training_data: ClassVar[bool] = False


class FinetuneStep(TrainSettings, Step):
    """Train the whole model on the task (AdamW, linear warm-up and decay, eval each epoch)."""

    level: ClassVar[str] = TORCH
    needs_training_data: ClassVar[bool] = True
    kind: Literal["finetune"] = "finetune"
    freeze_embeddings: bool = False  # about 2.5x faster on a CPU, small accuracy cost


class ExportStep(Step):
    """Export the torch model to ONNX (optimum-onnx), optionally optimise it, and verify it."""

    level: ClassVar[str] = EXPORT
    kind: Literal["export"] = "export"
    opset: int = Field(17, ge=14, le=21)
    optimize: bool = True  # ONNX Runtime transformer fusions (attention, layer norm, GELU)
    verify: FloatTolerance = FloatTolerance()


class PTQStep(Step):
    """Post-training quantization of the ONNX graph with ONNX Runtime."""

    level: ClassVar[str] = ONNX
    kind: Literal["ptq"] = "ptq"
    mode: Literal["dynamic"] = "dynamic"
    dtype: Literal["int8"] = "int8"
    per_channel: bool = True
    reduce_range: bool = False  # 7-bit weights: avoids u8s8 saturation on CPUs without VNNI
    keep_fp32: list[str] = []  # graph nodes whose name contains any of these stay fp32, e.g. [down_proj]
    verify: QuantTolerance = QuantTolerance()


AnyStep = Annotated[FinetuneStep | ExportStep | PTQStep, Field(discriminator="kind")]


class Recipe(Strict):
    model: str  # embedded alias (minilm-l6, smollm2-135m), local directory, or hub id
    task: Task
    data: DataConfig
    steps: list[AnyStep] = []
    bench: BenchConfig = BenchConfig()
    seed: int = 0
    trust_remote_code: bool = False  # never run a model's own code unless asked

    @field_validator("model")
    @classmethod
    def _local_model_relative_to_recipe(cls, value: str, info: ValidationInfo) -> str:
        base = (info.context or {}).get("base_dir")
        if base is None:
            return value
        local = Path(base) / Path(value).expanduser()
        # An explicit path, or one that exists beside the recipe; anything else is an alias or a hub id.
        return str(local.resolve()) if value.startswith((".", "/", "~")) or local.exists() else value

    @model_validator(mode="after")
    def _coherent(self) -> Recipe:
        if self.task == "sequence-classification":
            for name in ("train", "eval"):
                source = getattr(self.data, name)
                if source is not None and source.text_pair == source.text:
                    raise ValueError(f"data.{name}: text_pair must differ from text")
        if any(s.needs_training_data for s in self.steps) and self.data.train is None:
            first = next(i for i, s in enumerate(self.steps) if s.needs_training_data)
            raise ValueError(f"steps[{first}] ({self.steps[first].kind}) needs data.train")
        _check_order(self.steps)
        return self


def _check_order(steps: list[Step]) -> None:
    exported_at = None
    for i, step in enumerate(steps):
        if step.level == TORCH and exported_at is not None:
            raise ValueError(
                f"steps[{i}] ({step.kind}) works on the torch model, but steps[{exported_at}] already "
                "turned it into an ONNX graph; move it before the export"
            )
        if step.level == ONNX and exported_at is None:
            raise ValueError(f"steps[{i}] ({step.kind}) works on an ONNX graph; add an 'export' step before it")
        if step.level == EXPORT:
            if exported_at is not None:
                raise ValueError(f"steps[{i}] (export): the model was already exported at steps[{exported_at}]")
            exported_at = i


STEP_CLASSES: dict[str, type[Step]] = {
    cls.model_fields["kind"].default: cls for cls in get_args(get_args(AnyStep)[0])
}


def nested_models(annotation: Any) -> list[type[BaseModel]]:
    """The schema classes inside an annotation (through Optional, list and the step union)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [model for arg in get_args(annotation) for model in nested_models(arg)]


def step_pass_module(step: Step) -> str:
    """The module whose `run(artifact, step, ctx)` carries out `step`."""
    return f"compress.passes.{step.kind}"
