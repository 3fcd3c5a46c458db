"""Settings blocks shared by the recipe schema and the low-level modules that act on them.

Kept apart from `recipe.py` so training, verification and the benchmark depend on these few classes only,
never on the step registry.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeInt,
    PositiveInt,
    ValidationInfo,
    field_validator,
    model_validator,
)

from compress.artifact import sha256_file
from compress.sysinfo import machine_info


class Strict(BaseModel):
    # strict: a recipe's `seed: false` or `epochs: "3"` is the wrong kind of value, not one to convert
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class DataSource(Strict):
    """One table or text file: a local file (csv, tsv, jsonl, txt) or a hub dataset."""

    path: str | None = None  # local file, relative to the recipe file
    dataset: str | None = None  # hub dataset name, used only when `path` is not given
    subset: str | None = None  # hub dataset configuration, e.g. 'sst2' of 'glue'
    split: str = "train"  # hub dataset split
    text: str = "text"  # column holding the text
    text_pair: str | None = None  # second text column, for sentence pairs
    label: str | None = "label"  # column holding the label (classification); null: unlabelled rows
    columns: list[str] | None = None  # names for a header-less csv/tsv, in file order
    delimiter: Literal[",", "\t", ";", "|"] | None = None  # a csv/tsv's separator; default: from its extension
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


# A field holding a model reference: "@input", an earlier stage ("@00-finetune", "@finetune") or a model spec
# (alias, local directory, hub id). The pipeline resolves it and puts its content hash in the stage key.
MODEL_REF = "model-reference"
ModelRef = Annotated[str, MODEL_REF]


Precision = Literal["auto", "fp32", "bf16", "fp16"]


class TrainSettings(Strict):
    """Shared by every step that trains (finetune, distill, qat, pruning recovery), written flat in the step."""

    epochs: PositiveInt = 1
    max_steps: PositiveInt | None = None  # stop after this many optimizer steps
    batch_size: PositiveInt = 32
    lr: float = Field(5e-5, gt=0, lt=1)
    weight_decay: float = Field(0.01, ge=0)
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    grad_accum: PositiveInt = 1  # micro-batches per optimizer step
    # auto: bf16 autocast where the device computes bf16 natively (AMX/AVX512-BF16 CPUs, Ampere+ GPUs), else fp32.
    # fp16 needs a GPU (a gradient scaler guards it).
    precision: Precision = "fp32"
    checkpoint_every: PositiveInt | None = None  # optimizer steps between resumable checkpoints
    freeze_embeddings: bool = False  # the embedding tables stay as they are: ~2.5x faster steps on a CPU
    seed: int | None = None  # this step's own seed (initialisation, data order); default: the recipe's
    # The rows this step trains on in place of data.train: for a distilling step, a transfer set (more text of
    # the task's kind, which the teacher labels). Rows also in the validation or eval split are left out.
    train_data: DataSource | None = None

    def seed_or(self, recipe_seed: int) -> int:
        return recipe_seed if self.seed is None else self.seed

    def key_facts(self) -> dict[str, Any]:
        """`auto` precision is decided by the machine: its instruction sets (and GPU) enter the stage key; so do
        the bytes of a local `train_data` file."""
        facts: dict[str, Any] = {"precision_decided_by": machine_info()["isa"]} if self.precision == "auto" else {}
        if self.train_data is not None and self.train_data.path and Path(self.train_data.path).is_file():
            facts["train_data_sha256"] = sha256_file(Path(self.train_data.path))
        return facts


class GradualSchedule(Strict):
    """When sparsity rises during training (gradual magnitude, movement): along the cubic curve of Zhu & Gupta
    (2017), from 0 at `start` to the target at `end` (fractions of the training steps), masks renewed every
    `every` steps; after `end` the masks stay and the model trains on at the target sparsity."""

    start: float = Field(0.0, ge=0, lt=1)
    end: float = Field(0.7, gt=0, le=1)
    every: PositiveInt = 10  # optimizer steps between mask updates (gradual magnitude)

    @model_validator(mode="after")
    def _ordered(self) -> GradualSchedule:
        if self.end <= self.start:
            raise ValueError(f"gradual.end ({self.end}) must come after gradual.start ({self.start})")
        return self


class FloatTolerance(Strict):
    """An fp32 graph must match torch elementwise: |onnx - torch| <= atol + rtol * |torch|."""

    atol: float = Field(1e-4, ge=0)
    rtol: float = Field(1e-3, ge=0)
    samples: PositiveInt = 32  # eval rows (or windows) compared


class QuantTolerance(Strict):
    """A quantized graph is judged by its task: metric drop and prediction agreement vs. its input."""

    max_metric_drop: float = Field(0.01, ge=0)  # accuracy points as a fraction; perplexity: relative rise
    min_agreement: float = Field(0.95, ge=0, le=1)  # fraction of argmax predictions (tokens for LMs) equal
    samples: PositiveInt | None = None  # eval rows (or windows) used; all when absent


class BenchConfig(Strict):
    enabled: bool = True
    # Where each stage runs (compress/eval/targets.py): every listed target of a stage's format gives a row; a
    # format none of them runs gets its default (torch, onnxruntime).
    runtimes: list[str] = Field(default_factory=lambda: ["torch", "onnxruntime"], min_length=1)
    baseline: str | None = None  # a stage ("@00-finetune"); default: the last output of a non-compressing step
    # Fixed-length inputs filled with real tokens (causal LM: one forward pass). Lists time every combination;
    # the first of each is the main shape, behind the speed-ups, the roofline and the generation prompt.
    batch_size: PositiveInt | list[PositiveInt] = 1
    seq_len: PositiveInt | list[PositiveInt] = 128
    threads: PositiveInt = 2
    warmup: int = Field(10, ge=0)
    runs: int = Field(100, ge=10)  # timed runs per variant, spread over the rounds
    rounds: int = Field(3, ge=3)  # variants are timed interleaved: A B C, A B C, ...
    real_length_samples: int = Field(100, ge=0)  # eval rows timed at their own length, batch 1
    # Causal LMs that can generate (torch; ONNX exported with kv_cache): greedy generations after a prompt of
    # seq_len real tokens, timed to the first token and per token after it.
    new_tokens: int = Field(32, ge=2)
    generation_runs: int = Field(10, ge=3)  # timed generations per variant, spread over the rounds
    timeout_s: int = Field(900, ge=10)  # a worker that does not answer a request within this is stopped

    @field_validator("batch_size", "seq_len")
    @classmethod
    def _not_empty(cls, value: int | list[int]) -> int | list[int]:
        if isinstance(value, list) and (not value or len(set(value)) != len(value)):
            raise ValueError("a list needs at least one value, each once")
        return value

    @property
    def batch(self) -> int:
        """The main batch size."""
        return self.batch_size[0] if isinstance(self.batch_size, list) else self.batch_size

    @property
    def seq(self) -> int:
        """The main sequence length."""
        return self.seq_len[0] if isinstance(self.seq_len, list) else self.seq_len

    @property
    def shapes(self) -> list[tuple[int, int]]:
        """Every (batch size, sequence length) timed, the main one first."""
        batches = self.batch_size if isinstance(self.batch_size, list) else [self.batch_size]
        lengths = self.seq_len if isinstance(self.seq_len, list) else [self.seq_len]
        return [(batch, length) for batch in batches for length in lengths]

    @field_validator("runtimes")
    @classmethod
    def _known_and_installed(cls, names: list[str]) -> list[str]:
        from compress.eval.targets import check_targets

        if len(set(names)) != len(names):
            raise ValueError(f"lists a runtime twice: {', '.join(names)}")
        check_targets(names)
        return names

    @model_validator(mode="after")
    def _every_round_times_every_variant(self) -> BenchConfig:
        for field in ("runs", "generation_runs"):
            if getattr(self, field) < self.rounds:
                raise ValueError(f"{field} ({getattr(self, field)}) must be at least rounds ({self.rounds})")
        return self


class KDLoss(Strict):
    """Knowledge-distillation loss weights: `distill` and the pruning steps' `recover` block share them.

    alpha * T^2 * KL(teacher || student at temperature T) + (1 - alpha) * CE(labels), plus the weighted terms.
    """

    alpha: float = Field(0.5, ge=0, le=1)  # weight of the soft loss; 1 - alpha on the hard labels
    temperature: float = Field(2.0, gt=0)
    hidden_weight: float = Field(0.0, ge=0)  # hidden-state MSE over the layer map (projected when widths differ)
    attention_weight: float = Field(0.0, ge=0)  # attention-map MSE (TinyBERT); needs equal head counts
    relation_weight: float = Field(0.0, ge=0)  # MiniLM self-attention relations (last blocks); any head counts
    relation_heads: PositiveInt | None = None  # heads the relations are split into; default: the student's
    # (student, teacher) hidden-state indices, 0 = embeddings; default: uniform over the depths
    layer_map: list[Annotated[tuple[NonNegativeInt, NonNegativeInt], Field(strict=False)]] | None = None  # YAML: lists

    @property
    def reads_labels(self) -> bool:
        return self.alpha < 1


class RecoverSettings(KDLoss, TrainSettings):
    """Training after pruning, distilled from the model before it by default (`distill_from: none`: plain
    fine-tuning on the labels)."""

    distill_from: ModelRef = "@input"

