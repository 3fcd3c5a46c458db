"""One `logits(features)` interface over a torch model and an ONNX Runtime session, and greedy generation
with a KV cache (`prefill`, then `decode` one token at a time) for those that can generate.

Only the torch path imports torch and transformers, and only when used: an ONNX bench worker stays light,
so its peak memory and start-up reflect what deploying the graph costs.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from compress.artifact import GRAPH, read_manifest
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

    def __init__(self, model: Any, threads: int | None = None) -> None:
        import torch

        if threads is not None:
            torch.set_num_threads(threads)
        self.model = model.eval()
        parameters = inspect.signature(model.forward).parameters.values()
        # Named parameters only: a model's **kwargs would swallow inputs it does not understand.
        self.accepted = {p.name for p in parameters if p.kind is not inspect.Parameter.VAR_KEYWORD}

    def logits(self, features: dict[str, np.ndarray]) -> np.ndarray:
        import torch

        inputs = {k: self._tensor(v) for k, v in features.items() if k in self.accepted}
        with torch.inference_mode():
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

        with torch.inference_mode():
            output = self.model(input_ids=self._tensor(input_ids), past_key_values=cache, use_cache=True, **options)
        return output.logits[:, -1].argmax(-1).cpu().numpy(), output.past_key_values

    def _tensor(self, value: np.ndarray) -> Any:
        import torch

        device = next(self.model.parameters()).device  # evaluation runs where the model is, CPU or GPU
        return torch.from_numpy(np.ascontiguousarray(value)).to(device)

    def runtime(self) -> dict[str, Any]:
        import torch

        return {"name": "torch", "version": torch.__version__, "threads": torch.get_num_threads(),
                "interop_threads": torch.get_num_interop_threads()}


class OrtRunner:
    format = "onnx"

    def __init__(self, path: Path, threads: int = 2, denormal_as_zero: bool = True) -> None:
        import onnxruntime as ort

        options = session_options(threads, denormal_as_zero)
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.inputs = self.session.get_inputs()
        self.output_name = self.session.get_outputs()[0].name
        self.past = [spec for spec in self.inputs if spec.name.startswith(PAST)]
        self.present_names = [PRESENT + spec.name.removeprefix(PAST) for spec in self.past]

    def logits(self, features: dict[str, np.ndarray]) -> np.ndarray:
        """A graph with cache inputs gets an empty cache: the whole input is the prompt."""
        (logits,) = self.session.run([self.output_name], self._feeds(features, self._empty_cache(features)))
        return logits.astype(np.float32, copy=False)

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
        logits, *present = self.session.run([self.output_name, *self.present_names], feeds)
        return logits[:, -1].argmax(-1), {spec.name: value for spec, value in zip(self.past, present, strict=True)}

    def _empty_cache(self, features: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        batch = len(features["input_ids"])
        return {spec.name: empty_past(spec.shape, batch).astype(ORT_DTYPES.get(spec.type, np.float32))
                for spec in self.past}

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
            feeds[spec.name] = value.astype(ORT_DTYPES.get(spec.type, np.float32), copy=False)
        return feeds

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


def load_runner(artifact_dir: Path, threads: int) -> TorchRunner | OrtRunner:
    artifact_dir = Path(artifact_dir)
    manifest = read_manifest(artifact_dir)
    kind = Kind.from_json(manifest["kind"])
    if kind.format == "onnx":
        return OrtRunner(artifact_dir / GRAPH, threads)
    from compress.artifact import Artifact

    # As saved: its dtype, or its quantized modules rebuilt (a plain from_pretrained would drop them).
    return TorchRunner(Artifact.load(artifact_dir).model, threads)
