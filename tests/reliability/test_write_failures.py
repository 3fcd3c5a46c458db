"""An output that stops taking writes (full disk, read-only filesystem): one line naming the stage, exit 5, every
stage finished before it intact, and a re-run with room resumes from the first unfinished one."""

from __future__ import annotations

import errno
import json
import os
import subprocess

import pytest

from compress import rundir
from compress.artifact import Artifact, read_manifest
from compress.cli import main
from compress.rundir import verify_files

STEPS = [{"kind": "finetune", "epochs": 1, "batch_size": 16, "lr": 1e-3}, {"kind": "export"},
         {"kind": "ptq", "mode": "dynamic", "verify": {"max_metric_drop": 1.0, "min_agreement": 0.0}}]


@pytest.fixture
def recipe(tmp_path, tiny_recipe):
    return tiny_recipe(tmp_path, STEPS)


def run(recipe, out, capsys) -> tuple[int, list[str]]:
    capsys.readouterr()
    code = main(["-q", "run", str(recipe), "--out", str(out)])
    return code, capsys.readouterr().err.strip().splitlines()


def assert_refused_then_resumed(recipe, out, capsys, failing_stage: str, monkeypatch) -> None:
    code, err = run(recipe, out, capsys)
    assert code == 5 and len(err) == 1, err
    assert err[0].startswith(f"error: --out: {failing_stage}: cannot write"), err
    finished = sorted(path.name for path in out.iterdir() if path.is_dir() and not path.name.startswith("."))
    assert failing_stage not in finished and not list(out.glob(f".{failing_stage}.partial"))
    for name in finished:
        assert verify_files(out / name, read_manifest(out / name)["files"]) is None, name
    assert json.loads((out / "manifest.json").read_text())["status"] == "failed"

    monkeypatch.undo()  # room again
    capsys.readouterr()
    assert main(["run", str(recipe), "--out", str(out)]) == 0
    log = capsys.readouterr().err
    assert all(f"{name}: reused" in log for name in finished) and f"{failing_stage}: computing" in log


@pytest.mark.parametrize("stage", ["00-finetune", "01-export", "02-ptq"])
def test_a_disk_filling_up_while_a_stage_is_saved(stage, recipe, tmp_path, capsys, monkeypatch):
    save = Artifact.save

    def save_half_then_fill_up(self, directory):
        if directory.name == f".{stage}.partial":
            save(self, directory)  # most files are on disk when the disk runs out: none may count as a stage
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory / "model.safetensors"))
        return save(self, directory)

    monkeypatch.setattr(Artifact, "save", save_half_then_fill_up)
    assert_refused_then_resumed(recipe, tmp_path / "out", capsys, stage, monkeypatch)


def test_a_filesystem_turning_read_only_between_stages(recipe, tmp_path, capsys, monkeypatch):
    replace = rundir.replace_dir

    def read_only_from_the_export_on(partial, final):
        if final.name == "01-export":
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(partial))
        return replace(partial, final)

    monkeypatch.setattr("compress.pipeline.replace_dir", read_only_from_the_export_on)
    assert_refused_then_resumed(recipe, tmp_path / "out", capsys, "01-export", monkeypatch)


def test_a_library_reporting_the_full_disk_in_its_own_words(recipe, tmp_path, capsys, monkeypatch):
    from safetensors import SafetensorError

    def full(self, directory):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(Artifact, "save", full)
    code, err = run(recipe, tmp_path / "out", capsys)
    assert code == 5 and "00-finetune: cannot write" in err[0] and "No space left on device" in err[0]


def test_an_unwritable_out_is_refused_before_any_work(recipe, tmp_path, capsys):
    if os.geteuid() == 0:
        pytest.skip("root writes through file permissions; the read-only cases above are simulated")
    parent = tmp_path / "locked"
    parent.mkdir(mode=0o555)
    code, err = run(recipe, parent / "out", capsys)
    assert code == 5 and "Permission denied" in err[0]


def _mount_tmpfs(target, size: str) -> bool:
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(target)],
                          capture_output=True, check=False).returncode == 0


def test_a_real_full_disk_then_room_again(recipe, tmp_path, capsys):
    disk = tmp_path / "disk"
    disk.mkdir()
    if not _mount_tmpfs(disk, "300k"):
        pytest.skip("mounting a small tmpfs needs root with CAP_SYS_ADMIN; the simulated cases above still run")
    try:
        out = disk / "run"
        code, err = run(recipe, out, capsys)
        assert code == 5 and "No space left on device" in err[0], err
        finished = [path for path in out.iterdir() if path.is_dir() and not path.name.startswith(".")]
        assert finished and not list(out.glob(".*.partial"))
        subprocess.run(["mount", "-o", "remount,size=4m", str(disk)], check=True)
        assert main(["-q", "run", str(recipe), "--out", str(out)]) == 0
        assert all(f"{path.name}" in os.listdir(out) for path in finished)
    finally:
        subprocess.run(["umount", "--lazy", str(disk)], check=False)  # sessions of this process may hold files
