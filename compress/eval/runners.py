"""One `logits(features)` interface over a torch model, an ONNX Runtime session and an OpenVINO compiled model,
and greedy generation with a KV cache (`prefill`, then `decode` one token at a time) for those that can.

Only the torch path imports torch and transformers, and only when used: an ONNX bench worker stays light,
so its peak memory and start-up reflect what deploying the graph costs.
"""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from compress.artifact import GRAPH, read_manifest
from compress.eval.targets import AS_STORED, TARGETS, Target
from compress.kinds import Kind

DENORMAL_AS_ZERO = "session.set_denormal_as_zero"
PAST, PRESENT = "past_key_values", "present"  # optimum's names of a graph's cache inputs and outputs
NO_CACHE = "no KV cache in the graph"
ORT_DTYPES = {
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(bool)": np.bool_,
}
OPENVINO_PRECISIONS = {"fp32": "f32", "bf16": "bf16", "fp16": "f16"}


class Runner(Protocol):
    format: str

    def logits(self, features: dict[str, np.ndarray]) -> np.ndarray: ...

    def runtime(self) -> dict[str, Any]:
        """The runtime's name, version and the settings that decide its speed."""

    @property
    def cannot_generate(self) -> str | None:
        """Why `prefill` and `decode` are unavailable, or None when they work."""

    def prefill(self, input_ids: np.ndarray) -> tuple[np.ndarray, Any]:
        """The greedy next token of each prompt row [batch] and the cache that holds the prompt."""

    def decode(self, tokens: np.ndarray, cache: Any) -> tuple[np.ndarray, Any]:
        """`tokens` [batch] appended after `cache`: the greedy next tokens and the grown cache."""


class TorchRunner:
    format = "torch"

    def __init__(self, model: Any, threads: int | None = None, autocast: str | None = None) -> None:
        """`autocast`: "bf16" or "fp16" computes the matrix products at that precision on the model's device."""
        import torch

        if threads is not None:
            torch.set_num_threads(threads)
        self.model = model.eval()
        self.autocast = autocast
        parameters = inspect.signature(model.forward).parameters.values()
        # Named parameters only: a model's **kwargs would swallow inputs it does not understand.
        self.accepted = {p.name for p in parameters if p.kind is not inspect.Parameter.VAR_KEYWORD}

    def logits(self, features: dict[str, np.ndarray]) -> np.ndarray:
        import torch

        inputs = {k: self._tensor(v) for k, v in features.items() if k in self.accepted}
        with torch.inference_mode(), self._precision():
            output = self.model(**inputs)
        return output.logits.float().cpu().numpy()

    @property
    def cannot_generate(self) -> str | None:
        return None if getattr(self.model, "can_generate", lambda: False)() else "not a generative model"

    def prefill(self, input_ids: np.ndarray) -> tuple[np.ndarray, Any]:
        # transformers' own generate scores only the last position of the prompt; so do we.
        last_only = {"logits_to_keep": 1} if "logits_to_keep" in self.accepted else {}
        return self._step(input_ids, None, **last_only)

    def decode(self, tokens: np.ndarray, cache: Any) -> tuple[np.ndarray, Any]:
        return self._step(tokens[:, None], cache)

    def _step(self, input_ids: np.ndarray, cache: Any, **options: Any) -> tuple[np.ndarray, Any]:
        import torch

        with torch.inference_mode(), self._precision():
            output = self.model(input_ids=self._tensor(input_ids), past_key_values=cache, use_cache=True, **options)
        return output.logits[:, -1].argmax(-1).cpu().numpy(), output.past_key_values

    def _precision(self) -> Any:
        import torch

        if self.autocast is None:
            return contextlib.nullcontext()
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[self.autocast]
        return torch.autocast(self._device().type, dtype=dtype)

    def _device(self) -> Any:
        return next(self.model.parameters()).device  # evaluation runs where the model is, CPU or GPU

    def _tensor(self, value: np.ndarray) -> Any:
        import torch

        return torch.from_numpy(np.ascontiguousarray(value)).to(self._device())

    def runtime(self) -> dict[str, Any]:
        import torch

        device = self._device()
        return {"name": "torch", "version": torch.__version__, "device": str(device),
                "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                "autocast": self.autocast, "threads": torch.get_num_threads(),
                "interop_threads": torch.get_num_interop_threads()}


@dataclass(frozen=True)
class GraphInput:
    name: str
    shape: list[int | str | None]
    dtype: Any  # numpy dtype


class GraphRunner:
    """What every ONNX runtime shares: feeds built from the eval features (position ids derived, an empty cache
    for a graph with cache inputs) and greedy generation over its cache outputs. A subclass sets `inputs` and
    `output_name` and runs the graph in `_run`."""

    format = "onnx"
    inputs: list[GraphInput]
    output_name: str

    def _init_cache(self) -> None:
        self.past = [spec for spec in self.inputs if spec.name.startswith(PAST)]
        self.present_names = [PRESENT + spec.name.removeprefix(PAST) for spec in self.past]

    def _run(self, output_names: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        raise NotImplementedError

    def logits(self, features: dict[str, np.ndarray]) -> np.ndarray:
        """A graph with cache inputs gets an empty cache: the whole input is the prompt."""
        (logits,) = self.outputs([self.output_name], features)
        return logits.astype(np.float32, copy=False)

    def outputs(self, names: list[str], features: dict[str, np.ndarray]) -> list[np.ndarray]:
        """The graph's values called `names` (outputs it declares) for `features` as the prompt."""
        return self._run(names, self._feeds(features, self._empty_cache(features)))

    @property
    def cannot_generate(self) -> str | None:
        return None if self.past else NO_CACHE

    def prefill(self, input_ids: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        return self._step({"input_ids": input_ids, "attention_mask": np.ones_like(input_ids)}, None)

    def decode(self, tokens: np.ndarray, cache: dict[str, np.ndarray]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        past_length = cache[self.past[0].name].shape[2]  # [batch, heads, past, head_dim]
        mask = np.ones((len(tokens), past_length + 1), dtype=np.int64)
        return self._step({"input_ids": tokens[:, None], "attention_mask": mask}, cache)

    def _step(self, features: dict[str, np.ndarray],
              cache: dict[str, np.ndarray] | None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        feeds = self._feeds(features, self._empty_cache(features) if cache is None else cache)
        logits, *present = self._run([self.output_name, *self.present_names], feeds)
        return logits[:, -1].argmax(-1), {spec.name: value for spec, value in zip(self.past, present, strict=True)}

    def _empty_cache(self, features: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if not self.past:
            return {}
        batch = len(features["input_ids"])
        return {spec.name: empty_past(spec.shape, batch).astype(spec.dtype) for spec in self.past}

    def _feeds(self, features: dict[str, np.ndarray], cache: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        feeds = dict(cache)
        for spec in self.inputs:
            if spec.name in cache:
                continue
            if spec.name in features:
                value = features[spec.name]
            elif spec.name == "position_ids":  # the new tokens' positions, after those in the cache
                value = position_ids(features["attention_mask"])[:, -features["input_ids"].shape[1]:]
            else:
                raise KeyError(f"the ONNX graph needs input {spec.name!r}, which the eval features lack")
            feeds[spec.name] = value.astype(spec.dtype, copy=False)
        return feeds


class OrtRunner(GraphRunner):
    def __init__(self, path: Path, threads: int = 2, denormal_as_zero: bool = True,
                 providers: tuple[str, ...] = ("CPUExecutionProvider",), profile: Path | None = None) -> None:
        """`profile`: a file prefix for ONNX Runtime's per-node profile (`session.end_profiling()` writes it)."""
        import onnxruntime as ort

        options = session_options(threads, denormal_as_zero)
        if profile is not None:
            options.enable_profiling = True
            options.profile_file_prefix = str(profile)
        # The CPU provider last: it runs whatever a GPU provider leaves.
        chosen = list(dict.fromkeys([*providers, "CPUExecutionProvider"]))
        self.session = ort.InferenceSession(str(path), options, providers=chosen)
        self.inputs = [GraphInput(spec.name, spec.shape, ORT_DTYPES.get(spec.type, np.float32))
                       for spec in self.session.get_inputs()]
        self.output_name = self.session.get_outputs()[0].name
        self._init_cache()

    def _run(self, output_names: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.session.run(output_names, feeds)

    def runtime(self) -> dict[str, Any]:
        import onnxruntime as ort

        options = self.session.get_session_options()
        return {
            "name": "onnxruntime",
            "version": ort.__version__,
            "execution_provider": self.session.get_providers()[0],
            "intra_op_threads": options.intra_op_num_threads,
            "inter_op_threads": options.inter_op_num_threads,
            "denormal_as_zero": options.get_session_config_entry(DENORMAL_AS_ZERO) == "1",
        }


class OpenVinoRunner(GraphRunner):
    """OpenVINO's CPU plugin reading the ONNX file directly, with its threads, streams and precision set
    explicitly: left alone, it computes in bf16 on CPUs that have it, a different numeric result."""

    def __init__(self, path: Path, threads: int = 2, precision: str = "fp32") -> None:
        import openvino as ov

        core = ov.Core()
        config = {"INFERENCE_PRECISION_HINT": OPENVINO_PRECISIONS[precision], "INFERENCE_NUM_THREADS": threads,
                  "NUM_STREAMS": 1, "PERFORMANCE_HINT": "LATENCY", "CPU_DENORMALS_OPTIMIZATION": True}
        self.compiled = core.compile_model(core.read_model(str(path)), "CPU", config)
        self.request = self.compiled.create_infer_request()
        self.inputs = [GraphInput(port.get_any_name(), _ov_shape(port), port.get_element_type().to_dtype())
                       for port in self.compiled.inputs]
        self.output_name = self.compiled.outputs[0].get_any_name()
        self._init_cache()

    def _run(self, output_names: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        results = self.request.infer(feeds)
        # Copies: the request reuses its output buffers on the next call.
        return [np.array(results[self.compiled.output(name)]) for name in output_names]

    def runtime(self) -> dict[str, Any]:
        import openvino as ov

        get = self.compiled.get_property
        # Read back from the compiled model: what OpenVINO applied, not what was asked.
        return {"name": "openvino", "version": ov.__version__, "device": "CPU",
                "precision": get("INFERENCE_PRECISION_HINT").to_string(),
                "threads": int(get("INFERENCE_NUM_THREADS")), "streams": int(get("NUM_STREAMS")),
                "performance_hint": str(get("PERFORMANCE_HINT")),
                "denormals_as_zero": bool(get("CPU_DENORMALS_OPTIMIZATION"))}


def _ov_shape(port: Any) -> list[int | None]:
    return [dim.get_length() if dim.is_static else None for dim in port.get_partial_shape()]


def session_options(threads: int, denormal_as_zero: bool = True) -> Any:
    """The settings of every ONNX Runtime session the project creates.

    Denormals as zero: padded positions drive the fused attention into denormal floats, which x86 computes
    in slow microcode, while flushing them changes no logit beyond the export tolerance
    (tests/eval/test_runners.py). ORT applies it to its pool threads per session, but to the calling thread
    only for the first session of the process.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry(DENORMAL_AS_ZERO, "1" if denormal_as_zero else "0")
    return options


def position_ids(attention_mask: np.ndarray) -> np.ndarray:
    return np.clip(attention_mask.cumsum(axis=1) - 1, 0, None)


def empty_past(shape: list[int | str | None], batch: int) -> np.ndarray:
    """A zero-length cache for a graph exported with past inputs: [batch, heads, 0, head_dim]."""
    return np.zeros([batch, *(dim if isinstance(dim, int) else 0 for dim in shape[1:])], dtype=np.float32)


def greedy_tokens(runner: Runner, input_ids: np.ndarray, new_tokens: int) -> Iterator[np.ndarray]:
    """Greedy generation with the runner's cache: yields each step's new tokens [batch], the first one straight
    after the prefill of `input_ids` [batch, prompt length]."""
    if runner.cannot_generate:
        raise ValueError(f"cannot generate: {runner.cannot_generate}")
    tokens, cache = runner.prefill(input_ids)
    yield tokens
    for _ in range(new_tokens - 1):
        tokens, cache = runner.decode(tokens, cache)
        yield tokens


def load_failure(err: Exception) -> str:
    """One line out of a runtime's multi-line error: OpenVINO's list of ops it has no conversion rule for, or
    the last line that says something."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    for line in lines:
        if line.startswith("-- "):
            return line.removeprefix("-- ")
    meaningful = [line for line in lines if not line.startswith(("Exception from", "Check '"))]
    return (meaningful or [type(err).__name__])[-1]


def loads_on(graph: Path) -> dict[str, str | None]:
    """Each CPU runtime for ONNX graphs: None when it loads `graph`, else why not (or that it is missing)."""
    runners = {"onnxruntime": OrtRunner, "openvino": OpenVinoRunner}
    verdicts: dict[str, str | None] = {}
    for name, runner in runners.items():
        if importlib.util.find_spec(name) is None:
            verdicts[name] = "not installed"
            continue
        try:
            runner(graph, threads=1)
            verdicts[name] = None
        except Exception as err:  # noqa: BLE001  (whatever the runtime says is the answer)
            verdicts[name] = load_failure(err)
    return verdicts


def load_runner(artifact_dir: Path, threads: int, target: Target = TARGETS["torch"]) -> Runner:
    """The artifact under `target`; the artifact's own format decides when the target is the default."""
    artifact_dir = Path(artifact_dir)
    manifest = read_manifest(artifact_dir)
    kind = Kind.from_json(manifest["kind"])
    if kind.format == "onnx":
        if target.format != "onnx":
            target = TARGETS["onnxruntime"]
        if target.engine == "openvino":
            return OpenVinoRunner(artifact_dir / GRAPH, threads, target.precision)
        return OrtRunner(artifact_dir / GRAPH, threads, providers=target.providers)
    from compress.artifact import Artifact

    # As saved: its dtype, or its quantized modules rebuilt (a plain from_pretrained would drop them).
    model = Artifact.load(artifact_dir).model
    if target.format != "torch":
        target = TARGETS["torch"]
    if target.device == "cuda":
        model = model.to("cuda")
    autocast = None if target.precision == AS_STORED else target.precision
    return TorchRunner(model, threads, autocast)
