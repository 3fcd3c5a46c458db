import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from compress.artifact import sha256_file
from compress.errors import OutDirError
from compress.rundir import (
    ALGORITHM_MODULES,
    RunLock,
    atomic_write_json,
    atomic_write_text,
    code_fingerprint,
    replace_dir,
    sweep_leftovers,
    verify_files,
)

REPO = Path(__file__).resolve().parents[1]
HOLD_LOCK = ("import sys, time; from compress.rundir import RunLock; RunLock(sys.argv[1]).__enter__(); "
             "print('locked', flush=True); time.sleep(600)")


def test_a_second_lock_in_the_same_process_is_refused_until_the_first_is_released(tmp_path):
    out = tmp_path / "new" / "run"
    with RunLock(out):
        assert (out / ".lock").read_text() == f"{os.getpid()}\n"
        refused = rf"^--out: {out} is in use by another compress run \(pid {os.getpid()}\)"
        with pytest.raises(OutDirError, match=refused), RunLock(out):
            pass
    with RunLock(out):
        pass


def test_a_lock_held_by_another_process_is_refused_and_freed_when_that_process_is_killed(tmp_path):
    command = [sys.executable, "-c", HOLD_LOCK, str(tmp_path)]
    holder = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        refused = rf"\(pid {holder.pid}\); wait for it or pick another --out$"
        with pytest.raises(OutDirError, match=refused), RunLock(tmp_path):
            pass
    finally:
        holder.kill()  # SIGKILL: no cleanup code runs, only the kernel releases the lock
        holder.wait()
    with RunLock(tmp_path):
        assert (tmp_path / ".lock").read_text() == f"{os.getpid()}\n"


def test_atomic_writes_replace_the_file_and_leave_no_temporary_behind(tmp_path):
    atomic_write_text(tmp_path / "report.md", "old\n")
    atomic_write_json(tmp_path / "results.json", {"where": tmp_path, "n": 1})
    atomic_write_text(tmp_path / "report.md", "new\n")
    assert (tmp_path / "report.md").read_text() == "new\n"
    expected = json.dumps({"where": str(tmp_path), "n": 1}, indent=2) + "\n"
    assert (tmp_path / "results.json").read_text() == expected
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.md", "results.json"]


def test_a_write_that_fails_before_the_rename_keeps_the_old_file(tmp_path, monkeypatch):
    atomic_write_text(tmp_path / "report.md", "old\n")

    def crash(*args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_text(tmp_path / "report.md", "new\n")
    assert (tmp_path / "report.md").read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["report.md"]


def _stage(directory: Path, content: str) -> Path:
    directory.mkdir()
    (directory / "model.onnx").write_text(content)
    return directory


def test_replace_dir_puts_the_new_stage_in_place_of_the_old(tmp_path):
    replace_dir(_stage(tmp_path / ".01-ptq.partial", "first"), tmp_path / "01-ptq")
    replace_dir(_stage(tmp_path / ".01-ptq.partial", "second"), tmp_path / "01-ptq")
    assert (tmp_path / "01-ptq" / "model.onnx").read_text() == "second"
    assert [p.name for p in tmp_path.iterdir()] == ["01-ptq"]


def test_a_crash_between_the_renames_leaves_no_stage_under_the_final_name(tmp_path, monkeypatch):
    _stage(tmp_path / "01-ptq", "old")
    partial = _stage(tmp_path / ".01-ptq.partial", "new")
    rename = Path.rename

    def crash_on_partial(self, target):
        if self == partial:
            raise KeyboardInterrupt
        return rename(self, target)

    monkeypatch.setattr(Path, "rename", crash_on_partial)
    with pytest.raises(KeyboardInterrupt):
        replace_dir(partial, tmp_path / "01-ptq")
    assert not (tmp_path / "01-ptq").exists()
    assert sorted(p.name for p in sweep_leftovers(tmp_path)) == [".01-ptq.old", ".01-ptq.partial"]
    assert list(tmp_path.iterdir()) == []


def test_a_crash_while_deleting_the_old_stage_leaves_the_new_stage_whole(tmp_path, monkeypatch):
    (_stage(tmp_path / "01-ptq", "old") / "stage.json").write_text("old")
    (_stage(tmp_path / ".01-ptq.partial", "new") / "stage.json").write_text("new")

    def crash_after_one_file(path, *args, **kwargs):
        next(p for p in Path(path).iterdir()).unlink()
        raise KeyboardInterrupt

    monkeypatch.setattr(shutil, "rmtree", crash_after_one_file)
    with pytest.raises(KeyboardInterrupt):
        replace_dir(tmp_path / ".01-ptq.partial", tmp_path / "01-ptq")
    final = {p.name: p.read_text() for p in (tmp_path / "01-ptq").iterdir()}
    assert final == {"model.onnx": "new", "stage.json": "new"}


def test_sweep_removes_only_hidden_partial_and_old_entries(tmp_path):
    for name in (".00-base.partial", ".01-ptq.old", "01-ptq", "notes.partial"):
        (tmp_path / name).mkdir()
    for name in (".results.json.k3x9.partial", ".lock", "results.json"):
        (tmp_path / name).write_text("x")
    sweep_leftovers(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock", "01-ptq", "notes.partial", "results.json"]


def test_verify_files_names_the_first_file_that_no_longer_matches(tmp_path):
    stage = _stage(tmp_path / "01-ptq", "graph")
    (stage / "model.safetensors").write_text("weights")
    expected = {name: sha256_file(stage / name) for name in ("model.onnx", "model.safetensors")}
    assert verify_files(stage, expected) is None
    (stage / "model.onnx").write_text("grapH")
    assert verify_files(stage, expected) == "model.onnx changed since it was written"
    (stage / "model.safetensors").unlink()
    assert verify_files(stage, expected) == "model.safetensors is missing"


# A package laid out like compress, under another name; the algorithm packages refuse to be imported,
# so a fingerprint that imported anything would fail.
FAKE = "compress_fake_tree"
FAKE_PREFIXES = tuple(prefix.replace("compress", FAKE, 1) for prefix in ALGORITHM_MODULES)
FAKE_TREE = {
    "__init__.py": "",
    "cli.py": "def main(): pass\n",
    "eval/__init__.py": "",
    "eval/report.py": "def write(): pass\n",
    "passes/__init__.py": "raise RuntimeError('imported')\n",
    "passes/prune.py": f"""
        import {FAKE}.cli
        from {FAKE}.algos import magnitude
        from {FAKE}.eval.report import write
        from {FAKE}.loaders import hub  # not written yet: skipped
        def run():
            import {FAKE}.export.onnx
        """,
    "algos/__init__.py": "raise RuntimeError('imported')\n",
    "algos/magnitude.py": "from .scores import norm\n",
    "algos/scores.py": f"from {FAKE}.train import loop\nnorm = 2\n",
    "algos/unused.py": "x = 1\n",
    "export/__init__.py": "raise RuntimeError('imported')\n",
    "export/onnx.py": "def export(): pass\n",
    "train.py": "def loop(): pass\n",
}


@pytest.fixture
def fake_tree(tmp_path, monkeypatch):
    for name, source in FAKE_TREE.items():
        (tmp_path / FAKE / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / FAKE / name).write_text(textwrap.dedent(source))
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path / FAKE


def _fingerprint() -> str:
    return code_fingerprint(f"{FAKE}.passes.prune", FAKE_PREFIXES)


@pytest.mark.parametrize("changed", ["passes/prune.py", "algos/magnitude.py", "algos/scores.py",
                                     "algos/__init__.py", "export/onnx.py", "train.py"])
def test_the_fingerprint_follows_the_algorithm_code_a_pass_imports(fake_tree, changed):
    before = _fingerprint()
    with open(fake_tree / changed, "a") as source:
        source.write("# changed\n")
    assert _fingerprint() != before


@pytest.mark.parametrize("changed", ["cli.py", "eval/report.py", "algos/unused.py", "__init__.py"])
def test_the_fingerprint_ignores_code_that_cannot_change_a_stage(fake_tree, changed):
    before = _fingerprint()
    with open(fake_tree / changed, "a") as source:
        source.write("# changed\n")
    assert _fingerprint() == before


def test_the_fingerprint_does_not_depend_on_where_the_tree_lives(fake_tree, tmp_path, monkeypatch):
    before = _fingerprint()
    assert not any(name.startswith(FAKE) for name in sys.modules)
    shutil.move(tmp_path / FAKE, tmp_path / "elsewhere" / FAKE)
    monkeypatch.syspath_prepend(str(tmp_path / "elsewhere"))
    assert _fingerprint() == before


def test_a_missing_pass_module_is_an_error(fake_tree):
    with pytest.raises(ModuleNotFoundError, match=f"{FAKE}.passes.absent"):
        code_fingerprint(f"{FAKE}.passes.absent", FAKE_PREFIXES)


def test_fingerprinting_the_real_passes_imports_no_heavy_library():
    probe = """
import sys
from compress.rundir import code_fingerprint
fingerprints = {code_fingerprint(f"compress.passes.{name}") for name in ("finetune", "export", "ptq")}
imported = [name for name in ("torch", "onnx", "compress.passes", "compress.export") if name in sys.modules]
print(len(fingerprints), imported)
"""
    result = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, check=True)
    assert result.stdout == b"3 []\n"
