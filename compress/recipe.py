"""The recipe schema. It is also the registry of passes: a step's `kind` names its pass module.

Adding a pass = one step class here + one line in `AnyStep` + `compress/passes/<kind>.py` with `run()`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, get_args

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

from compress.arch import is_text_stream
from compress.kinds import Kind
from compress.plan import StepRejects, baseline, plan_stages
from compress.settings import (
    MODEL_REF,
    BenchConfig,
    DataSource,
    FloatTolerance,
    GradualSchedule,
    KDLoss,
    ModelRef,
    QuantTolerance,
    RecoverSettings,
    Strict,
    TrainSettings,
)
from compress.sysinfo import has_vnni, machine_info

Task = Literal["sequence-classification", "causal-lm"]

class DataConfig(Strict):
    train: DataSource | None = None
    eval: DataSource | None = None  # the reported metric; nothing ever tunes on it
    # For anything that tunes (per-epoch evaluation, sensitivity, fallback, search). Default: carved from train.
    validation: DataSource | None = None
    calib: DataSource | None = None  # calibration rows (default: a seeded sample of train); never the eval set
    eval_fraction: float = Field(0.1, gt=0, lt=1)  # carved from train (seeded) when `eval` is absent
    validation_fraction: float = Field(0.1, gt=0, lt=1)  # carved from train when `validation` is absent
    validation_max_rows: PositiveInt = 2000
    labels: list[str] | None = Field(None, min_length=2)  # label names in id order; inferred from train otherwise
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


StageRef = Annotated[str, Field(pattern=r"^@[a-z0-9][a-z0-9-]*$")]


class Step(Strict):
    """A step's settings, and its contract: which kinds it takes and what it makes of them."""

    model_config = ConfigDict(populate_by_name=True)
    from_: StageRef | None = Field(None, alias="from")  # input stage; default: the previous step's
    # The stage's name after its number (default: the step's kind), e.g. 05-int8-static; '@int8-static' names it.
    name: str | None = Field(None, pattern=r"^[a-z][a-z0-9-]*$", max_length=40)
    compresses: ClassVar[bool] = True  # False: its output can still be the benchmark's baseline
    needs_data: ClassVar[tuple[str, ...]] = ()  # recipe data this step reads: "train", "calib"

    def output_kind(self, given: Kind) -> Kind:
        """The kind this step makes from `given`; raises StepRejects saying why it cannot take it."""
        raise NotImplementedError

    def key_facts(self) -> dict[str, Any]:
        """Settings resolved on this machine (e.g. per instruction set) that change the result: cache key."""
        return {}

    @property
    def reads_labels(self) -> bool:
        """Whether the step trains on the training rows' labels (so they must have some)."""
        return False

    def check_task(self, task: str) -> None:
        """Raise ValueError when these settings cannot serve `task`."""

    def model_refs(self) -> dict[str, str]:
        """Every model reference in the settings, by dotted field name ('teacher', 'student.model')."""
        return _model_refs(self)


def _model_refs(settings: BaseModel, prefix: str = "") -> dict[str, str]:
    refs = {}
    for name, info in type(settings).model_fields.items():
        value = getattr(settings, name)
        if isinstance(value, BaseModel):
            refs |= _model_refs(value, f"{prefix}{name}.")
        elif value not in (None, "none") and (MODEL_REF in info.metadata or _holds_model_ref(info.annotation)):
            refs[f"{prefix}{name}"] = value
    return refs


def _holds_model_ref(annotation: Any) -> bool:
    """`ModelRef | None` keeps the marker inside the union's arguments."""
    return any(arg == MODEL_REF or _holds_model_ref(arg) for arg in get_args(annotation))


def own_train_data(step: Step) -> tuple[str, DataSource] | None:
    """A step's own training rows and the field naming them ('train_data', 'recover.train_data'), if it has any."""
    blocks = [("", step)] if isinstance(step, TrainSettings) else [
        (f"{name}.", value) for name in type(step).model_fields if isinstance(value := getattr(step, name), TrainSettings)]
    return next(((f"{field}train_data", block.train_data) for field, block in blocks if block.train_data), None)


def _torch_float(step: str, given: Kind) -> None:
    if given.format != "torch":
        raise StepRejects(f"{step} works on a torch model; put it before the export (or branch with "
                          "'from' from a torch stage)")
    if not given.is_float:
        raise StepRejects(f"{step} needs float weights, not {given.weights}")


class FinetuneStep(TrainSettings, Step):
    """Train the whole model on the task (AdamW, linear warm-up and decay, validation score each epoch)."""

    kind: Literal["finetune"] = "finetune"
    compresses: ClassVar[bool] = False
    needs_data: ClassVar[tuple[str, ...]] = ("train",)
    reads_labels: ClassVar[bool] = True

    def output_kind(self, given: Kind) -> Kind:
        _torch_float("finetune", given)
        return given


class ExportStep(Step):
    """Export the torch model to portable ONNX (optimum-onnx, default-domain ops only) and verify it."""

    kind: Literal["export"] = "export"
    compresses: ClassVar[bool] = False
    opset: int = Field(17, ge=14, le=21)
    verify: FloatTolerance = FloatTolerance()  # float models: elementwise against torch
    # Quantized torch models (QAT, weight-only) against their torch model, by task metric and agreement.
    verify_quantized: QuantTolerance = QuantTolerance()
    # Causal LM: the graph also takes and returns the attention keys and values, so generation reuses them
    # (time to first token, ms per generated token); perplexity runs it with an empty cache.
    kv_cache: bool = False

    def check_task(self, task: str) -> None:
        if self.kv_cache and not is_text_stream(task):
            raise ValueError("kv_cache: only a causal LM generates; leave it off for this task")

    def output_kind(self, given: Kind) -> Kind:
        if given.format != "torch":
            raise StepRejects("it is already an ONNX graph")
        sparsity = "zeros" if given.sparsity else None
        if given.weights == "fake-quant":  # QuantizeLinear/DequantizeLinear pairs with the learned scales
            return Kind("onnx", "int8-qdq", sparsity=sparsity)
        if given.weights.endswith("weight-only"):  # lowered to MatMulNBits with the same integers and scales
            bits = given.weights.split("-")[0]
            return Kind("onnx", f"{bits}-matmulnbits", sparsity=sparsity, runtime="onnxruntime")
        return Kind("onnx", given.weights, sparsity=sparsity)


class OrtFuseStep(Step):
    """Rewrite the graph with ONNX Runtime's transformer fusions (attention, layer norms, GELU): faster in
    ONNX Runtime, which alone can then load it."""

    kind: Literal["ort-fuse"] = "ort-fuse"
    compresses: ClassVar[bool] = False
    verify: FloatTolerance = FloatTolerance()

    def output_kind(self, given: Kind) -> Kind:
        if given.format != "onnx":
            raise StepRejects("it fuses an ONNX graph; add an 'export' step before it")
        if given.runtime == "onnxruntime":
            raise StepRejects("the graph is already rewritten into ONNX Runtime ops")
        if not given.is_float:
            raise StepRejects("fuse the float graph, then quantize it")
        return given.evolve(runtime="onnxruntime")


class Calibration(Strict):
    """Rows the quantizer observes to choose activation ranges (static int8, QAT) or to correct weights (GPTQ,
    AWQ): a seeded sample of `data.calib` (default: of the training rows), never the eval set."""

    samples: PositiveInt = 256  # fewer available: a warning, and all of them are used
    batch_size: PositiveInt = 8
    method: Literal["minmax", "percentile", "entropy"] = "minmax"  # static int8: how a range is chosen
    percentile: float = Field(99.999, gt=50, le=100)  # method percentile: the share of values kept in range


class Fallback(Strict):
    """Keep the most sensitive layers in float until the validation metric drops by at most `max_drop`."""

    max_drop: float = Field(ge=0)  # accuracy points as a fraction; perplexity: relative rise
    max_layers: PositiveInt | None = None  # never keep more than this many layers in float


# The settings each `ptq` mode reads; setting another mode's field is a recipe error naming it.
PTQ_FIELDS = {
    "dynamic": {"per_channel", "reduce_range", "weight_type", "keep_fp32", "quantize_embeddings", "sensitivity",
                "fallback"},
    "static": {"per_channel", "reduce_range", "weight_type", "activation_type", "calibration", "keep_fp32",
               "quantize_embeddings", "sensitivity", "fallback"},
    "weight-only": {"bits", "method", "block_size", "symmetric", "accuracy_level", "calibration", "keep_fp32",
                    "quantize_embeddings"},
    "fp16": {"keep_fp32"},
}
PTQ_COMMON = {"kind", "from_", "name", "mode", "verify"}


class PTQStep(Step):
    """Post-training quantization of the ONNX graph with ONNX Runtime's tools.

    dynamic: int8 weights, activations quantized per batch at run time (integer ops). static: int8 QDQ with
    activation ranges calibrated beforehand. weight-only: 4- or 8-bit MatMulNBits (RTN, GPTQ or HQQ), the
    decoder's route. fp16: half-precision weights and activations, for GPUs and runtimes with fp16 kernels.
    """

    kind: Literal["ptq"] = "ptq"
    mode: Literal["dynamic", "static", "weight-only", "fp16"] = "dynamic"
    per_channel: bool = True
    # 7-bit weights avoid u8s8 saturation on CPUs without VNNI; auto: only on such a CPU.
    reduce_range: bool | Literal["auto"] = "auto"
    weight_type: Literal["auto", "int8", "uint8"] = "auto"  # auto: chosen for this CPU and recorded
    activation_type: Literal["auto", "int8", "uint8"] = "auto"  # static: auto chosen for this CPU and recorded
    calibration: Calibration = Calibration()
    quantize_embeddings: bool = True  # the embedding Gather too, where the runtime has a kernel for it
    keep_fp32: list[Annotated[str, Field(min_length=1)]] = []  # node-name fragments kept in float, e.g. [down_proj]
    sensitivity: bool = False  # rank layers by the validation metric change when each alone is quantized
    fallback: Fallback | None = None  # keep the most sensitive layers in float within a validation budget
    bits: Literal[4, 8] = 4  # weight-only
    method: Literal["rtn", "gptq", "hqq"] = "rtn"  # weight-only; AWQ: the `quantize` step (torch level)
    # 32: ONNX Runtime's default and the finer grid small models need; llm-int4 uses 128, the published setting.
    block_size: int = Field(32, ge=16)
    symmetric: bool = True  # weight-only: no zero points
    accuracy_level: Literal[0, 1, 2, 3, 4] = 4  # MatMulNBits compute: 4 = int8 activations (fastest on CPUs)
    verify: QuantTolerance = QuantTolerance()

    @model_validator(mode="after")
    def _fields_of_mode(self) -> PTQStep:
        stray = sorted(self.model_fields_set - PTQ_FIELDS[self.mode] - PTQ_COMMON)
        if stray:
            raise ValueError(f"{', '.join(stray)}: not a setting of ptq mode {self.mode!r} "
                             f"(it reads: {', '.join(sorted(PTQ_FIELDS[self.mode]))})")
        if self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two >= 16 (got {self.block_size})")
        if self.activation_type == "int8" and self.weight_type == "uint8":
            raise ValueError("activation_type int8 with weight_type uint8: ONNX Runtime has no kernel for that pair; "
                             "set weight_type int8")
        return self

    @property
    def needs_data(self) -> tuple[str, ...]:
        calibrates = self.mode == "static" or (self.mode == "weight-only" and self.method == "gptq")
        return ("calib",) if calibrates else ()

    def output_kind(self, given: Kind) -> Kind:
        if given.format != "onnx":
            raise StepRejects("ptq quantizes an ONNX graph; add an 'export' step before it")
        if not given.is_float or given.weights != "fp32":
            raise StepRejects(f"the graph is already {given.precision}; quantize the fp32 graph "
                              "(branch from it with 'from')")
        if self.mode == "static" and given.runtime == "onnxruntime":
            raise StepRejects("static QDQ cannot reach the weights inside ONNX Runtime's fused attention and "
                              "embedding ops; quantize the portable graph (branch from the export with 'from')")
        if self.mode == "fp16":
            return given.evolve(weights="fp16")
        if self.mode == "weight-only":
            return given.evolve(weights=f"int{self.bits}-matmulnbits", runtime="onnxruntime")
        return given.evolve(weights="int8-dynamic" if self.mode == "dynamic" else "int8-qdq")

    def resolved_reduce_range(self) -> bool:
        return (not has_vnni()) if self.reduce_range == "auto" else self.reduce_range

    def key_facts(self) -> dict[str, Any]:
        decided_here = ("reduce_range", "weight_type", "activation_type")
        if not any(getattr(self, name) == "auto" for name in decided_here if name in PTQ_FIELDS[self.mode]):
            return {}
        return {"reduce_range": self.resolved_reduce_range(), "isa": machine_info()["isa"]}


EmbeddingBits = Literal[3, 4, 8]


class QATStep(RecoverSettings, Step):
    """Quantization-aware training: fake-quant Linear layers (per-channel symmetric int8 weights, per-tensor
    activations, straight-through gradients) and, with `embedding_bits`, embedding tables (per-row int8, int4, or
    3-bit on levels fitted to the table), trained on the task loss, distilled from the model before QAT by
    default. `export` then writes a QDQ graph with the learned scales."""

    kind: Literal["qat"] = "qat"
    needs_data: ClassVar[tuple[str, ...]] = ("train",)
    lr: float = Field(2e-5, gt=0, lt=1)
    per_channel: bool = True
    keep_fp32: list[Annotated[str, Field(min_length=1)]] = []  # module-name fragments left in float
    # The embedding tables too, per row (half of a small encoder's weights): their bits, or bits per table-name
    # fragment (a table none names stays float), or None to keep them all float.
    embedding_bits: EmbeddingBits | Annotated[dict[Annotated[str, Field(min_length=1)], EmbeddingBits],
                                              Field(min_length=1)] | None = None
    calibration: Calibration = Calibration()  # the activations' first ranges, before training moves them

    @field_validator("embedding_bits", mode="before")
    @classmethod
    def _known_bits(cls, bits: Any) -> Any:
        """One line naming the bad value (the union's own errors name its branches instead)."""
        if isinstance(bits, dict) and not bits:
            raise ValueError("name at least one table (e.g. {word_embeddings: 4}), or leave embedding_bits out")
        given = bits.items() if isinstance(bits, dict) else [] if bits is None else [("", bits)]
        for fragment, value in given:
            if value not in get_args(EmbeddingBits) or isinstance(value, bool):
                raise ValueError(f"{fragment + ': ' if fragment else ''}{value!r} bits; a table takes 3 (levels "
                                 "fitted to it), 4 or 8")
        return bits

    @model_validator(mode="after")
    def _trainable_ranges(self) -> QATStep:
        if self.calibration.method != "minmax":
            raise ValueError(f"calibration.method: qat starts its ranges from min/max and then learns them; "
                             f"{self.calibration.method!r} is for ptq mode static")
        if self.attention_weight and self.distill_from != "none":
            raise ValueError("attention_weight: attention maps need eager attention kernels, which qat does not "
                             "switch to; distil the logits, hidden states (hidden_weight) or relations")
        return self

    @property
    def reads_labels(self) -> bool:
        return self.distill_from == "none" or self.alpha < 1

    def output_kind(self, given: Kind) -> Kind:
        _torch_float("qat", given)
        return given.evolve(weights="fake-quant")


class QuantizeStep(Step):
    """Torch-level weight-only quantization (neural-compressor: RTN, GPTQ, AWQ) of the Linear layers: a torch
    artifact that saves, reloads and evaluates; `export` lowers it to MatMulNBits with the same integers."""

    kind: Literal["quantize"] = "quantize"
    backend: Literal["neural-compressor"] = "neural-compressor"
    method: Literal["rtn", "gptq", "awq"] = "rtn"
    bits: Literal[4, 8] = 4
    group_size: PositiveInt = 128  # must divide every quantized layer's input features
    symmetric: bool = True
    calibration: Calibration = Calibration(samples=128)  # gptq and awq
    keep_fp32: list[Annotated[str, Field(min_length=1)]] = ["lm_head"]  # module-name fragments left in float
    verify: QuantTolerance = QuantTolerance()

    @model_validator(mode="after")
    def _exportable_groups(self) -> QuantizeStep:
        if self.group_size < 16 or self.group_size & (self.group_size - 1):
            raise ValueError(f"group_size must be a power of two >= 16, as ONNX Runtime's MatMulNBits blocks are "
                             f"(got {self.group_size})")
        return self

    @property
    def needs_data(self) -> tuple[str, ...]:
        return () if self.method == "rtn" else ("calib",)

    def output_kind(self, given: Kind) -> Kind:
        if given.format != "torch" or not given.is_float:
            raise StepRejects(f"quantize works on a float torch model, not {given.describe()}"
                              + ("" if given.format == "torch" else "; for an ONNX graph use ptq mode weight-only"))
        return given.evolve(weights=f"int{self.bits}-weight-only")


class L0Settings(Strict):
    """importance l0: hard-concrete gates trained with the model during the first `share` of the `recover`
    steps toward the target sizes; then the closed units go and the rest of the steps train the smaller model."""

    share: float = Field(0.5, gt=0, le=1)  # of the recovery steps, with the gates
    warmup: float = Field(0.5, ge=0, le=1)  # of the gate steps, over which the target size is approached
    lr: float = Field(0.05, gt=0, lt=1)  # the gates' and Lagrange multipliers' own Adam learning rate
    init_open: float = Field(0.9, gt=0, lt=1)  # a fresh gate's chance of being open


Ratio = Annotated[float, Field(ge=0, lt=1)]
# heads / ffn: a ratio removed (allocation global, uniform), counts kept per block (per_layer) or one count kept
# in every block (top_k).
UnitAmount = float | PositiveInt | list[NonNegativeInt]
UNSTRUCTURED = {"sparsity", "modules", "recover"}
# The settings each prune `method` reads; another method's field is a recipe error naming it.
PRUNE_FIELDS = {
    "structured": {"importance", "allocation", "heads", "ffn", "ffn_multiple_of", "layers", "allow_layer_drop",
                   "calibration", "l0", "recover"},
    "magnitude": UNSTRUCTURED | {"ranking", "schedule", "gradual", "nm"},
    "movement": UNSTRUCTURED | {"variant", "gradual", "scores_lr", "lambda_"},
    "l1": UNSTRUCTURED | {"ranking", "lambda_"},
    "wanda": UNSTRUCTURED | {"nm", "calibration"},
    "sparsegpt": UNSTRUCTURED | {"nm", "calibration", "block_size", "damp"},
}
PRUNE_COMMON = {"kind", "from_", "name", "method"}
TRAINS_TO_CHOOSE = {"movement": "learns its scores", "l1": "applies its penalty"}  # ...while the model trains
ALLOCATION_AMOUNT = {"global": "a ratio in [0, 1) removed", "uniform": "a ratio in [0, 1) removed",
                     "per_layer": "a list of counts kept, one per block", "top_k": "a count kept in every block"}


class PruneStep(Step):
    """Remove parts of the model.

    structured: attention heads, FFN neurons and whole blocks leave the weight matrices, chosen by importance
    (gradient, activation, magnitude, or L0 gates trained toward the target) and an allocation rule.
    Unstructured (zeros inside the matrices, `sparsity` of the selected weights, or an `nm` pattern):
    magnitude (one-shot or gradual during recovery), movement (scores learned during recovery), l1 (a
    penalty during recovery, then a threshold), wanda and sparsegpt (one-shot from calibration rows, block by
    block). `recover` trains the result, distilled from the unpruned model by default, with the zeros held.
    """

    kind: Literal["prune"] = "prune"
    method: Literal["structured", "magnitude", "movement", "l1", "wanda", "sparsegpt"] = "structured"
    importance: Literal["gradient", "activation", "magnitude", "l0"] = "gradient"
    allocation: Literal["global", "uniform", "per_layer", "top_k"] = "global"
    heads: UnitAmount | None = None
    ffn: UnitAmount | None = None
    # Every block keeps a multiple of this many FFN neurons: what a 4-bit quantizer's group (64, 128) or a
    # GEMM tile needs to divide the width.
    ffn_multiple_of: PositiveInt = 1
    layers: Ratio | list[NonNegativeInt] | None = None  # blocks removed: indices, or the ratio least missed
    # Under global allocation a block keeps at least one head (one key-value group's worth) unless this is set;
    # then a block the ranking empties is removed whole.
    allow_layer_drop: bool = False
    calibration: Calibration = Calibration(samples=256)  # rows the importance scores are measured on
    l0: L0Settings = L0Settings()
    # Unstructured: the share of the selected weights zeroed, and which weights (globs on module names; default
    # every Linear inside the transformer blocks, not the embeddings nor the task head).
    sparsity: Ratio | None = None
    modules: list[Annotated[str, Field(min_length=1)]] | None = Field(None, min_length=1)
    ranking: Literal["global", "per_layer"] = "global"  # magnitude, l1: one threshold, or one per layer
    schedule: Literal["oneshot", "gradual"] = "oneshot"  # magnitude: all at once, or rising during `recover`
    gradual: GradualSchedule = GradualSchedule()
    # [N, M]: N of every M consecutive inputs stay (2:4). YAML writes it as a list: read as a tuple.
    nm: tuple[PositiveInt, PositiveInt] | None = Field(None, strict=False)
    variant: Literal["hard", "soft"] = "hard"  # movement: top scores per layer, or one threshold + penalty
    scores_lr: float = Field(1e-2, gt=0, lt=1)  # movement: the scores' own gradient-descent step size
    lambda_: float = Field(0.0, ge=0, alias="lambda")  # l1: penalty on mean |w|; movement soft: on sigmoid(S)
    block_size: PositiveInt = 128  # sparsegpt: columns pruned together
    damp: float = Field(0.01, gt=0, lt=1)  # sparsegpt: share of the mean Hessian diagonal added to it
    recover: RecoverSettings | None = None  # training after pruning (needed by l0, gradual, movement, l1)

    @model_validator(mode="after")
    def _coherent(self) -> PruneStep:
        stray = sorted(self.model_fields_set - PRUNE_FIELDS[self.method] - PRUNE_COMMON)
        if stray:
            names = ", ".join(type(self).model_fields[name].alias or name for name in stray)
            raise ValueError(f"{names}: not a setting of prune method {self.method!r}")
        if self.method == "structured":
            self._coherent_structure()
        else:
            self._coherent_sparsity()
        return self

    def _coherent_structure(self) -> None:
        if self.heads is None and self.ffn is None and self.layers is None:
            raise ValueError("give what to remove: heads, ffn, layers, or several")
        for name in ("heads", "ffn"):
            amount = getattr(self, name)
            if amount is not None and not _fits_allocation(amount, self.allocation):
                raise ValueError(f"{name}: allocation {self.allocation} takes {ALLOCATION_AMOUNT[self.allocation]} "
                                 f"(got {amount})")
        if isinstance(self.layers, list) and len(set(self.layers)) != len(self.layers):
            raise ValueError(f"layers: list each block once (got {self.layers})")
        if "ffn_multiple_of" in self.model_fields_set and self.ffn is None:
            raise ValueError("ffn_multiple_of: rounds the FFN neurons each block keeps; give ffn too")
        if self.importance == "l0":
            if self.allocation != "global":
                raise ValueError("importance l0: the gates decide where units go, so allocation must be global")
            if self.recover is None:
                raise ValueError("importance l0: the gates are trained during recovery; add a 'recover' block")
        if self.recover is not None and self.recover.attention_weight and self.heads is not None:
            raise ValueError("recover.attention_weight: attention maps need the teacher's head counts, which "
                             "head pruning changes; distil logits, hidden states or relations")

    def _coherent_sparsity(self) -> None:
        if self.nm is not None:
            n, m = self.nm
            if n >= m:
                raise ValueError(f"nm: N:M keeps N of every M weights, so N must be below M (got {n}:{m})")
            if self.sparsity is not None and abs(self.sparsity - (1 - n / m)) > 1e-9:
                raise ValueError(f"sparsity: {self.sparsity} contradicts nm {n}:{m} (which is {1 - n / m:g}); "
                                 "give one of them")
            if self.schedule == "gradual":
                raise ValueError("nm: an N:M pattern is set one-shot; leave schedule at oneshot")
        elif self.sparsity is None:
            raise ValueError(f"sparsity: method {self.method} needs the share of weights to zero (or nm: [2, 4])")
        if self.recover is None:
            if self.method in TRAINS_TO_CHOOSE:
                raise ValueError(f"method {self.method} {TRAINS_TO_CHOOSE[self.method]} while the model trains; "
                                 "add a 'recover' block")
            if self.schedule == "gradual":
                raise ValueError("schedule gradual: sparsity rises during training; add a 'recover' block")
        if self.method == "l1" and self.lambda_ == 0:
            raise ValueError("lambda: method l1 needs a penalty above 0 (e.g. 1e-4)")

    @property
    def target_sparsity(self) -> float:
        return 1 - self.nm[0] / self.nm[1] if self.nm else self.sparsity

    @property
    def needs_data(self) -> tuple[str, ...]:
        if self.method == "structured":
            scores_on_rows = self.importance in ("gradient", "activation") or isinstance(self.layers, float)
        else:
            scores_on_rows = self.method in ("wanda", "sparsegpt")
        return (("calib",) if scores_on_rows else ()) + (("train",) if self.recover else ())

    @property
    def reads_labels(self) -> bool:
        return self.recover is not None and (self.recover.distill_from == "none" or self.recover.alpha < 1)

    def key_facts(self) -> dict[str, Any]:
        return self.recover.key_facts() if self.recover else {}

    def output_kind(self, given: Kind) -> Kind:
        _torch_float("prune", given)
        if given.sparsity == "masks":
            raise StepRejects("its masks are still live; make the sparsity permanent first")
        if self.method != "structured":
            return given.evolve(sparsity="zeros")
        return given.evolve(per_layer_shapes=given.per_layer_shapes or self.heads is not None
                            or self.ffn is not None)


def _fits_allocation(amount: Any, allocation: str) -> bool:
    if allocation in ("global", "uniform"):
        return isinstance(amount, float) and 0 <= amount < 1
    if allocation == "per_layer":
        return isinstance(amount, list) and len(amount) > 0
    return isinstance(amount, int) and amount >= 1


class StudentSpec(Strict):
    """The student: a layer selection of the teacher (default), a smaller config of its family, or a model."""

    layers: list[NonNegativeInt] | None = None  # teacher blocks kept, weights copied; default every other from the top
    num_layers: PositiveInt | None = None  # a smaller config: any of these four
    hidden_size: PositiveInt | None = None
    intermediate_size: PositiveInt | None = None
    num_heads: PositiveInt | None = None
    init: Literal["teacher", "random"] = "teacher"  # smaller config: sliced from the teacher where shapes allow
    model: ModelRef | None = None  # or a model of its own: "@00-finetune", a directory, an alias

    @model_validator(mode="after")
    def _one_way(self) -> StudentSpec:
        config = [self.num_layers, self.hidden_size, self.intermediate_size, self.num_heads]
        ways = [self.layers is not None, any(v is not None for v in config), self.model is not None]
        if sum(ways) > 1:
            raise ValueError("give one of 'layers', a smaller config (num_layers, hidden_size, intermediate_size, "
                             "num_heads) or 'model'")
        if self.layers is not None and (not self.layers or sorted(set(self.layers)) != self.layers):
            raise ValueError(f"layers must be distinct block indices in ascending order (got {self.layers})")
        return self


class DistillStep(KDLoss, TrainSettings, Step):
    """Train a smaller student on a teacher's outputs: soft logits, hidden states, attention, relations."""

    kind: Literal["distill"] = "distill"
    needs_data: ClassVar[tuple[str, ...]] = ("train",)
    teacher: ModelRef = "@input"
    student: StudentSpec = StudentSpec()
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, ~30 % slower
    # Keep the teacher's logits per training row from the first epoch (in memory and on disk) for the next
    # ones: the teacher then runs once, not once an epoch. Logit-only KD of a classifier.
    cache_teacher: bool = False

    @model_validator(mode="after")
    def _cacheable(self) -> DistillStep:
        if self.cache_teacher and (self.hidden_weight or self.attention_weight or self.relation_weight):
            raise ValueError("cache_teacher keeps the teacher's logits only; it needs hidden_weight, "
                             "attention_weight and relation_weight at 0")
        return self

    def check_task(self, task: str) -> None:
        if self.cache_teacher and is_text_stream(task):
            raise ValueError("cache_teacher: a causal LM's logits (every token x the vocabulary) are too large "
                             "to keep per row; leave it off")

    def output_kind(self, given: Kind) -> Kind:
        _torch_float("distill", given)
        return given


AnyStep = Annotated[FinetuneStep | ExportStep | OrtFuseStep | PTQStep | DistillStep | QATStep | QuantizeStep
                    | PruneStep, Field(discriminator="kind")]


class Recipe(Strict):
    model: str  # embedded alias (minilm-l6, smollm2-135m), local directory, or hub id
    task: Task
    data: DataConfig
    steps: list[AnyStep] = []
    bench: BenchConfig = BenchConfig()
    seed: int = 0
    trust_remote_code: bool = False  # never run a model's own code unless asked
    allow_pickle: bool = False  # weights from safetensors only: unpickling a checkpoint can run code

    @field_validator("model")
    @classmethod
    def _local_model_relative_to_recipe(cls, value: str, info: ValidationInfo) -> str:
        base = (info.context or {}).get("base_dir")
        if base is None:
            return value
        local = Path(base) / Path(value).expanduser()
        try:
            beside = local.exists()
        except OSError as err:  # a name no filesystem holds (too long, say)
            raise ValueError(f"not a usable path, alias or hub id ({err.strerror})") from None
        # An explicit path, or one that exists beside the recipe; anything else is an alias or a hub id.
        return str(local.resolve()) if value.startswith((".", "/", "~")) or beside else value

    @property
    def load_trust(self) -> dict[str, bool]:
        """What loading this recipe's models may do beyond reading safetensors and JSON: the user's own say."""
        return {"trust_remote_code": self.trust_remote_code, "allow_pickle": self.allow_pickle}

    def train_data_sources(self) -> dict[str, DataSource]:
        """Each step's own training rows, by the field that names them ('steps[2].recover.train_data')."""
        return {f"steps[{index}].{own[0]}": own[1] for index, step in enumerate(self.steps)
                if (own := own_train_data(step))}

    @model_validator(mode="after")
    def _coherent(self) -> Recipe:
        if not is_text_stream(self.task):
            for name in ("train", "eval"):
                source = getattr(self.data, name)
                if source is not None and source.text_pair == source.text:
                    raise ValueError(f"data.{name}: text_pair must differ from text")
        for index, step in enumerate(self.steps):
            try:
                step.check_task(self.task)
            except ValueError as why:
                raise ValueError(f"steps[{index}].{why}") from None
            own = own_train_data(step)
            rows, where = (own[1], f"steps[{index}].{own[0]}") if own else (self.data.train, "data.train")
            if step.reads_labels and rows is not None and rows.label is None:
                raise ValueError(f"steps[{index}] ({step.kind}) trains on labels, but {where} has none "
                                 "(label: null); give the label column, or for distill set alpha: 1")
            for split in step.needs_data:
                if split == "train" and self.data.train is None:
                    raise ValueError(f"steps[{index}] ({step.kind}) needs data.train")
                if split == "calib" and self.data.train is None and self.data.calib is None:
                    raise ValueError(f"steps[{index}] ({step.kind}) needs calibration rows: data.calib or data.train")
        stages = plan_stages(self.steps)
        if self.bench.baseline:
            baseline(stages, self.bench.baseline)
        return self


STEP_CLASSES: dict[str, type[Step]] = {
    cls.model_fields["kind"].default: cls for cls in get_args(get_args(AnyStep)[0])
}


def nested_models(annotation: Any) -> list[type[BaseModel]]:
    """The schema classes inside an annotation (through Optional, list and the step union)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [model for arg in get_args(annotation) for model in nested_models(arg)]


def step_pass_module(step: Step) -> str:
    """The module whose `run(artifact, step, ctx)` carries out `step` ('ort-fuse' -> passes/ort_fuse.py)."""
    return f"compress.passes.{step.kind.replace('-', '_')}"
