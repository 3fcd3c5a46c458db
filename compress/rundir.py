"""Crash safety for a run directory: one run at a time, atomic files and stages, checks before reuse.

Pure stdlib (plus compress.artifact's hashing), so the pipeline can use it before torch is imported.
"""

from __future__ import annotations

import ast
import errno
import fcntl
import hashlib
import importlib.machinery
import importlib.util
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from compress.artifact import sha256_file
from compress.errors import OutDirError, WriteError

LOCK = ".lock"
LEFTOVER_SUFFIXES = (".partial", ".old")
# A write failed for want of room or of permission to write, whichever library did it.
FULL_OR_READ_ONLY = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG}
DENIED = {errno.EACCES, errno.EPERM}
# Libraries written in Rust or C++ (safetensors, onnx) report the OS error inside their own message.
OS_ERROR_IN_MESSAGE = re.compile(r"\(os error (\d+)\)|\[Errno (\d+)\]")
# The packages whose code decides what a stage computes; a change anywhere else (reports, CLI) does not.
ALGORITHM_MODULES = ("compress.passes", "compress.algos", "compress.export", "compress.train",
                     "compress.loaders")


class RunLock:
    """Holds `out/.lock` for a whole run. The kernel releases it when the holder exits or is killed."""

    def __init__(self, out: Path):
        self.out = Path(out)
        self._fd: int | None = None

    def __enter__(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.out / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise OutDirError(f"--out: {self.out} is in use by another compress run (pid {holder}); "
                              "wait for it or pick another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def __exit__(self, *exc_info: object) -> None:
        # The file stays: unlinking it would let a new run lock a fresh inode while another holds the old one.
        os.close(self._fd)
        self._fd = None


@contextmanager
def output_errors(out: Path, stage: str = "") -> Iterator[None]:
    """Turns a write the output refused (disk full, read-only, permission) into a WriteError naming it (and the
    stage being written, when given)."""
    try:
        yield
    except WriteError:
        raise
    except Exception as err:
        failure = write_failure(err, Path(out), stage)
        if failure is None:
            raise
        raise failure from err


def write_failure(err: BaseException, out: Path, stage: str = "") -> WriteError | None:
    """The WriteError `err` amounts to, or None when it is no failed write under `out` (a bad read, a bug)."""
    code, target = getattr(err, "errno", None), getattr(err, "filename", None)
    if code is None:
        found = OS_ERROR_IN_MESSAGE.search(str(err))
        code = int(found.group(1) or found.group(2)) if found else None
    inside = target is None or Path(out).resolve() in (Path(target).resolve(), *Path(target).resolve().parents)
    if code in FULL_OR_READ_ONLY or (code in DENIED and target is not None and inside):
        where = target or out
        return WriteError(f"--out: {f'{stage}: ' if stage else ''}cannot write {where}: {os.strerror(code)}; the "
                          "stages finished before it are kept "
                          "and a re-run resumes from the first unfinished one")
    return None


def atomic_write_text(path: Path, text: str) -> None:
    """Readers see the old content or the new, never a torn file, even after a crash or power loss."""
    path = Path(path)
    handle, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as temp:
            temp.write(text)
            temp.flush()
            os.fsync(temp.fileno())
        os.replace(temp_name, path)
    except BaseException:
        os.unlink(temp_name)
        raise
    _fsync_dir(path.parent)


def atomic_write_json(path: Path, value: Any) -> None:
    atomic_write_text(path, json.dumps(value, indent=2, default=str) + "\n")


def replace_dir(partial: Path, final: Path) -> None:
    """Put a complete stage under its final name; a crash midway leaves no stage there, never a wrong one."""
    partial, final = Path(partial), Path(final)
    aside = final.with_name(f".{final.name}.old")
    _remove(aside)
    if final.exists():
        final.rename(aside)
    partial.rename(final)
    _fsync_dir(final.parent)
    _remove(aside)


def sweep_leftovers(out: Path) -> list[Path]:
    """Remove the hidden `.*.partial` and `.*.old` entries a crashed run left; call it under the lock."""
    leftovers = sorted(path for path in Path(out).iterdir()
                       if path.name.startswith(".") and path.name.endswith(LEFTOVER_SUFFIXES))
    for path in leftovers:
        _remove(path)
    return leftovers


def verify_files(directory: Path, expected: dict[str, str]) -> str | None:
    """None when every file still has its recorded sha256, else why not (one line, naming the file)."""
    directory = Path(directory)
    for name in sorted(expected):  # all presence checks first: cheap, before hashing gigabytes
        if not (directory / name).is_file():
            return f"{name} is missing"
    for name in sorted(expected):
        if sha256_file(directory / name) != expected[name]:
            return f"{name} changed since it was written"
    return None


def code_fingerprint(module_name: str, prefixes: tuple[str, ...] = ALGORITHM_MODULES) -> str:
    """sha256 over the source of `module_name` and of the modules under `prefixes` it imports, transitively.

    Imports are read with `ast`, never executed, so this stays cheap and never pulls in torch.
    """
    sources: dict[str, bytes] = {}
    pending = [module_name]
    while pending:
        name = pending.pop()
        origin = None if name in sources else _source_file(name)
        if origin is None:  # already read, or no module: a name from a package's __init__, or not written yet
            continue
        sources[name] = origin.read_bytes()
        package = name if origin.name == "__init__.py" else name.rpartition(".")[0]
        pending += [found for found in _imports(sources[name], package) if _covered(found, prefixes)]
    if module_name not in sources:
        raise ModuleNotFoundError(f"{module_name}: no Python source found")
    digest = hashlib.sha256()
    for name in sorted(sources):
        digest.update(f"{name}\0{hashlib.sha256(sources[name]).hexdigest()}\n".encode())
    return digest.hexdigest()


def _imports(source: bytes, package: str) -> set[str]:
    """Every module an `import` names; for `from a import b`, both `a` and `a.b` (b may be a submodule)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = importlib.util.resolve_name("." * node.level + (node.module or ""), package)
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names if alias.name != "*")
    return names


def _covered(module_name: str, prefixes: tuple[str, ...]) -> bool:
    return any(module_name == prefix or module_name.startswith(prefix + ".") for prefix in prefixes)


def _source_file(module_name: str) -> Path | None:
    spec = _find_spec(module_name)
    if spec is None or not spec.has_location or not str(spec.origin).endswith(".py"):
        return None
    return Path(spec.origin)


def _find_spec(module_name: str) -> importlib.machinery.ModuleSpec | None:
    """Like importlib.util.find_spec, but walks parent packages' paths instead of importing them."""
    parent, _, _ = module_name.rpartition(".")
    if not parent:
        return importlib.util.find_spec(module_name)
    parent_spec = _find_spec(parent)
    if parent_spec is None or parent_spec.submodule_search_locations is None:
        return None
    return importlib.machinery.PathFinder.find_spec(module_name, list(parent_spec.submodule_search_locations))


def _fsync_dir(directory: Path) -> None:
    """A rename is durable only once its directory is synced."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)
