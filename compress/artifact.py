"""The one thing every pass receives and returns: model and/or ONNX graph, tokenizer, task, history.

On disk an artifact is a Hugging Face directory (config.json, model.safetensors and/or model.onnx,
tokenizer files) plus `compress.json`, so `AutoModel*.from_pretrained` and optimum's
`ORTModelFor*.from_pretrained` both load it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from compress.errors import ArtifactError
from compress.sysinfo import library_versions

MANIFEST = "compress.json"
WEIGHTS = "model.safetensors"
GRAPH = "model.onnx"
FORMAT = "compress-artifact/1"


@dataclass
class Artifact:
    task: str
    config: Any  # transformers PretrainedConfig: architecture and label names
    tokenizer: Any
    model: Any = None  # torch PreTrainedModel, or None once only the graph remains
    onnx_path: Path | None = None
    precision: str = "fp32"  # of what this artifact deploys: the graph if there is one, else the model
    source: str = ""  # the model spec the pipeline started from
    history: list[dict[str, Any]] = field(default_factory=list)

    @property
    def format(self) -> str:
        return "onnx" if self.onnx_path is not None else "torch"

    @property
    def label_names(self) -> list[str] | None:
        id2label = getattr(self.config, "id2label", None)
        return [id2label[i] for i in sorted(id2label)] if self.task == "sequence-classification" else None

    def evolve(self, record: dict[str, Any], **changes: Any) -> Artifact:
        """A new artifact with `changes` applied and `record` (what a pass did) added to the history."""
        return dataclasses.replace(self, history=[*self.history, record], **changes)

    def save(self, directory: Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.config.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)
        if self.model is not None:
            self.model.save_pretrained(directory, safe_serialization=True)
        if self.onnx_path is not None:
            target = directory / GRAPH
            if Path(self.onnx_path).resolve() != target.resolve():
                shutil.copyfile(self.onnx_path, target)
        files = {name: sha256_file(directory / name) for name in (WEIGHTS, GRAPH) if (directory / name).is_file()}
        manifest = {
            "format": FORMAT,
            "task": self.task,
            "precision": self.precision,
            "deploys": self.format,
            "source": self.source,
            "files": files,
            "history": self.history,
            "versions": library_versions(),
        }
        (directory / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str) + "\n")
        return directory

    @classmethod
    def load(cls, directory: Path) -> Artifact:
        from transformers import AutoConfig, AutoTokenizer

        from compress.models import auto_class

        directory = Path(directory)
        manifest = read_manifest(directory)
        config = AutoConfig.from_pretrained(directory)
        tokenizer = AutoTokenizer.from_pretrained(directory)
        model = None
        if (directory / WEIGHTS).is_file():
            model = auto_class(manifest["task"]).from_pretrained(directory).eval()
        graph = directory / GRAPH
        return cls(
            task=manifest["task"],
            config=config,
            tokenizer=tokenizer,
            model=model,
            onnx_path=graph if manifest["deploys"] == "onnx" else None,
            precision=manifest["precision"],
            source=manifest.get("source", ""),
            history=manifest["history"],
        )

    @property
    def fingerprint(self) -> str:
        """Identifies the weights and graph this artifact deploys, for stage caching."""
        if self.model is None and self.onnx_path is None:
            raise ArtifactError("artifact has neither a torch model nor an ONNX graph")
        digest = hashlib.sha256(self.task.encode())
        if self.model is not None:
            for name, tensor in sorted(self.model.state_dict().items()):
                digest.update(name.encode())
                digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        if self.onnx_path is not None:
            digest.update(sha256_file(self.onnx_path).encode())
        return digest.hexdigest()


def step_record(step: Any, **effect: Any) -> dict[str, Any]:
    """A history entry: the step's resolved settings and what the pass measured doing it."""
    return {"kind": step.kind, "config": step.model_dump(mode="json"), "effect": effect}


def read_manifest(directory: Path) -> dict[str, Any]:
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"{directory}: not a compress artifact (no {MANIFEST})")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ArtifactError(f"{path}: unreadable ({err})") from None
    if manifest.get("format") != FORMAT:
        raise ArtifactError(f"{path}: unknown format {manifest.get('format')!r} (expected {FORMAT})")
    return manifest


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()
