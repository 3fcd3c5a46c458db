"""The one thing every pass receives and returns: model or ONNX graph, tokenizer, task, kind, history.

On disk an artifact is a Hugging Face directory (config.json, tokenizer files, and model.safetensors or
model.onnx [+ model.onnx_data]) plus `compress.json`: the kind, the files' sha256 and the history. A torch
stage loads with `AutoModelFor*.from_pretrained`, an ONNX stage with optimum's `ORTModelFor*`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from compress.arch import is_text_stream
from compress.errors import ArtifactError
from compress.kinds import QUANTIZED_TORCH, TORCH_FP32, Kind
from compress.sysinfo import library_versions

MANIFEST = "compress.json"
STAGE_RECORD = "stage.json"  # the pipeline's record beside the manifest: the stage's cache key and input
WEIGHTS = "model.safetensors"
GRAPH = "model.onnx"
GRAPH_DATA = "model.onnx_data"  # external weights of a graph over 2 GB; the graph refers to it by this name
FORMAT = "compress-artifact/2"
TORCH_DTYPES = {"fp16": "float16", "bf16": "bfloat16"}
QUANTIZATION = "quantization.json"  # quantized torch kinds: which modules hold quantized weights, and how
# The module that rebuilds each quantized torch kind: `quantization_spec(model)` -> JSON, and
# `apply_quantization_spec(model, spec)` swaps those modules in (empty) so the saved tensors load into them.
QUANTIZED_MODULES = {"fake-quant": "compress.algos.fake_quant", "int8-weight-only": "compress.algos.weight_only",
                     "int4-weight-only": "compress.algos.weight_only"}


@dataclass
class Artifact:
    task: str
    config: Any  # transformers PretrainedConfig: architecture and label names
    tokenizer: Any
    model: Any = None  # torch PreTrainedModel (torch kinds)
    onnx_path: Path | None = None  # the graph (ONNX kinds)
    kind: Kind = TORCH_FP32
    source: str = ""  # the model spec the pipeline started from
    history: list[dict[str, Any]] = field(default_factory=list)

    @property
    def format(self) -> str:
        return self.kind.format

    @property
    def precision(self) -> str:
        return self.kind.precision

    @property
    def label_names(self) -> list[str] | None:
        id2label = getattr(self.config, "id2label", None)
        return None if is_text_stream(self.task) else [id2label[i] for i in sorted(id2label)]

    def evolve(self, record: dict[str, Any], **changes: Any) -> Artifact:
        """A new artifact with `changes` applied and `record` (what a pass did) added to the history."""
        return dataclasses.replace(self, history=[*self.history, record], **changes)

    def save(self, directory: Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self._check_holds_its_kind()
        self.config.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)
        if self.kind.weights in QUANTIZED_TORCH:
            _save_quantized(self.model, self.kind, directory)
        elif self.format == "torch":
            self.model.save_pretrained(directory, safe_serialization=True)
        else:
            _copy_graph(Path(self.onnx_path), directory)
        manifest = {
            "format": FORMAT,
            "task": self.task,
            "kind": self.kind.to_json(),
            "source": self.source,
            "files": {name: sha256_file(directory / name) for name in deployed_weights(directory, self.kind)},
            "history": self.history,
            "versions": library_versions(),
        }
        (directory / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str) + "\n")
        return directory

    @classmethod
    def load(cls, directory: Path) -> Artifact:
        from transformers import AutoConfig, AutoTokenizer

        from compress.arch import auto_class

        directory = Path(directory)
        manifest = read_manifest(directory)
        kind = Kind.from_json(manifest["kind"])
        model = onnx_path = None
        if kind.weights in QUANTIZED_TORCH:
            model = _load_quantized(directory, manifest["task"], kind)
        elif kind.format == "torch":
            dtype = TORCH_DTYPES.get(kind.weights, "float32")
            model = auto_class(manifest["task"]).from_pretrained(directory, dtype=dtype, use_safetensors=True).eval()
        else:
            onnx_path = directory / GRAPH
        return cls(
            task=manifest["task"],
            config=AutoConfig.from_pretrained(directory),
            tokenizer=AutoTokenizer.from_pretrained(directory),
            model=model,
            onnx_path=onnx_path,
            kind=kind,
            source=manifest.get("source", ""),
            history=manifest["history"],
        )

    @property
    def fingerprint(self) -> str:
        """Identifies what this artifact computes (weights or graph, config, tokenizer), for stage caching."""
        self._check_holds_its_kind()
        digest = hashlib.sha256(self.task.encode())
        config = self.config.to_dict()
        for provenance in ("_name_or_path", "architectures", "transformers_version"):  # not what it computes
            config.pop(provenance, None)
        digest.update(json.dumps(config, sort_keys=True, default=str).encode())
        digest.update(tokenizer_fingerprint(self.tokenizer).encode())
        if self.format == "torch":
            import torch

            for name, tensor in sorted(self.model.state_dict().items()):
                digest.update(name.encode())
                digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())
        else:
            for path in graph_files(Path(self.onnx_path)):
                digest.update(sha256_file(path).encode())
        return digest.hexdigest()

    def _check_holds_its_kind(self) -> None:
        held = self.model if self.format == "torch" else self.onnx_path
        if held is None:
            raise ArtifactError(f"artifact of kind {self.kind.describe()} holds no "
                                f"{'torch model' if self.format == 'torch' else 'ONNX graph'}")


def step_record(step: Any, **effect: Any) -> dict[str, Any]:
    """A history entry: the step's resolved settings and what the pass measured doing it."""
    return {"kind": step.kind, "config": step.model_dump(mode="json", by_alias=True), "effect": effect}


def read_manifest(directory: Path) -> dict[str, Any]:
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"{directory}: not a compress artifact (no {MANIFEST})")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ArtifactError(f"{path}: unreadable ({err})") from None
    if manifest.get("format") != FORMAT:
        raise ArtifactError(f"{path}: unknown format {manifest.get('format')!r} (expected {FORMAT}); "
                            "re-create it with this version of compress")
    return manifest


def graph_files(graph: Path) -> list[Path]:
    """The graph and, when its weights are external, their file beside it."""
    data = graph.with_name(GRAPH_DATA)
    return [graph, data] if data.is_file() else [graph]


def deployed_weights(directory: Path, kind: Kind) -> list[str]:
    """The weight or graph files of a stage, whose hashes `compress.json` records."""
    if kind.format == "torch":
        return sorted(path.name for path in directory.glob("model*.safetensors"))
    return [path.name for path in graph_files(directory / GRAPH)]


def tokenizer_fingerprint(tokenizer: Any) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        described = json.dumps(sorted(tokenizer.get_vocab().items()))
    else:
        state = json.loads(backend.to_str())
        for per_call in ("padding", "truncation"):  # set by the last call that padded or truncated
            state.pop(per_call, None)
        described = json.dumps(state, sort_keys=True)
    return hashlib.sha256(f"{described}|{tokenizer.pad_token_id}".encode()).hexdigest()


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _save_quantized(model: Any, kind: Kind, directory: Path) -> None:
    """Our own safetensors file: the libraries' quantized modules save by pickling, which we never load."""
    from importlib import import_module

    from safetensors.torch import save_model

    spec = import_module(QUANTIZED_MODULES[kind.weights]).quantization_spec(model)
    save_model(model, str(directory / WEIGHTS))
    (directory / QUANTIZATION).write_text(json.dumps(spec, indent=2) + "\n")


def _load_quantized(directory: Path, task: str, kind: Kind) -> Any:
    from importlib import import_module

    from safetensors.torch import load_model
    from transformers import AutoConfig

    from compress.arch import auto_class

    try:
        spec = json.loads((directory / QUANTIZATION).read_text())
    except (OSError, ValueError) as err:
        raise ArtifactError(f"{directory / QUANTIZATION}: unreadable ({err}); a {kind.describe()} stage needs it")
    model = auto_class(task).from_config(AutoConfig.from_pretrained(directory))
    import_module(QUANTIZED_MODULES[kind.weights]).apply_quantization_spec(model, spec)
    load_model(model, str(directory / WEIGHTS))
    return model.eval()


def _copy_graph(graph: Path, directory: Path) -> None:
    for path in graph_files(graph):
        target = directory / (GRAPH if path == graph else GRAPH_DATA)
        if path.resolve() != target.resolve():
            shutil.copyfile(path, target)
