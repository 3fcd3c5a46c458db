"""SIGKILL at random points of a multi-stage pipeline, then re-run: the final stages' files equal an uninterrupted
run's bit for bit, no stage is ever left half-written under its final name, and a training stage resumes from its
last checkpoint rather than from its start.

`make test` kills KILLS times; `make reliability` sets COMPRESS_KILLS=20.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from compress.artifact import read_manifest
from compress.plan import STAGE_NAME
from compress.reproducibility import BIT_EXACT
from compress.rundir import verify_files

ROOT = Path(__file__).resolve().parents[2]
KILLS = int(os.environ.get("COMPRESS_KILLS", "3"))
KILLS_BEFORE_FINISHING = 4  # then the run is let finish and compared, and a new run is started
SEED = int(os.environ.get("COMPRESS_KILL_SEED", "13"))
LENIENT = {"max_metric_drop": 1.0, "min_agreement": 0.0}
# Every kind of stage: training ones (checkpointed), pruning, QAT, exports, calibrated and dynamic int8.
STEPS = [
    {"kind": "finetune", "epochs": 2, "batch_size": 8, "lr": 1e-3, "checkpoint_every": 5},
    {"kind": "distill", "student": {"layers": [1]}, "epochs": 1, "batch_size": 8, "lr": 1e-3, "hidden_weight": 1.0,
     "checkpoint_every": 5},
    {"kind": "prune", "method": "structured", "heads": 0.5, "ffn": 0.5,
     "recover": {"epochs": 1, "batch_size": 8, "lr": 1e-3, "checkpoint_every": 5}},
    {"kind": "qat", "max_steps": 10, "batch_size": 8, "lr": 1e-4, "calibration": {"samples": 16},
     "checkpoint_every": 5},
    {"kind": "export"},
    {"kind": "export", "from": "@prune", "name": "fp32-export"},
    {"kind": "ptq", "mode": "static", "calibration": {"samples": 16}, "verify": LENIENT},
    {"kind": "ptq", "from": "@fp32-export", "mode": "dynamic", "verify": LENIENT},
]


@pytest.fixture(scope="module")
def write_recipe(tmp_path_factory, tiny_recipe):
    return lambda steps: tiny_recipe(tmp_path_factory.mktemp("recipe"), steps)


@pytest.fixture(scope="module")
def reference(write_recipe, tmp_path_factory) -> tuple[Path, dict, float]:
    """The multi-stage recipe, its uninterrupted run's manifest, and how long that run took."""
    path, out = write_recipe(STEPS), tmp_path_factory.mktemp("reference") / "run"
    victim = start(path, out)
    began = time.monotonic()
    startup = started(out, victim) - began
    assert victim.wait() == 0
    manifest = json.loads((out / "manifest.json").read_text())
    return path, {**manifest, "startup_seconds": startup}, time.monotonic() - began


def start(recipe: Path, out: Path) -> subprocess.Popen:
    # No pipe: a victim blocked on a full one would always be killed at the same place.
    return subprocess.Popen([sys.executable, "-m", "compress.cli", "-q", "run", str(recipe), "--out", str(out)],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def started(out: Path, victim: subprocess.Popen) -> float:
    """When the victim began its run (wrote a new manifest): kills before that only cut Python's imports."""
    before = _manifest_start(out)
    while _manifest_start(out) == before and victim.poll() is None:
        time.sleep(0.01)
    return time.monotonic()


def _manifest_start(out: Path) -> str | None:
    try:
        return json.loads((out / "manifest.json").read_text())["started"] + str((out / "manifest.json").stat().st_ino)
    except (OSError, ValueError):
        return None


def finish(recipe: Path, out: Path) -> dict:
    done = subprocess.run([sys.executable, "-m", "compress.cli", "run", str(recipe), "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    return manifest


def digests(manifest: dict) -> dict[str, tuple[str, str]]:
    return {stage["name"]: (stage["files_sha256"], stage["reproducible"]) for stage in manifest["stages"]}


def in_progress(out: Path) -> str:
    partial = sorted(path.name for path in out.glob(".*.partial")) if out.exists() else []
    return partial[0].strip(".").removesuffix(".partial") if partial else "outside a stage"


def assert_nothing_half_written(out: Path) -> None:
    """Whatever carries a stage's final name is a whole stage: its record and every file it lists, unchanged."""
    if not out.exists():
        return
    json.loads((out / "manifest.json").read_text())  # never torn
    for stage in (path for path in out.iterdir() if path.is_dir() and STAGE_NAME.match(path.name)):
        assert (stage / "stage.json").is_file(), f"{stage.name} has its final name but no stage record"
        assert verify_files(stage, read_manifest(stage)["files"]) is None, f"{stage.name} is half-written"


def assert_same_as(reference: dict, manifest: dict) -> None:
    expected, found = digests(reference), digests(manifest)
    assert set(found) == set(expected)
    for name, (digest, reproducible) in expected.items():
        if reproducible == BIT_EXACT:
            assert found[name][0] == digest, f"{name} differs from the uninterrupted run"


def test_the_same_recipe_twice_gives_the_same_files_and_says_so(reference, tmp_path):
    path, first, _ = reference
    second = finish(path, tmp_path / "again")
    assert all(reproducible == BIT_EXACT for _, reproducible in digests(first).values())  # one process, a CPU
    assert digests(first) == digests(second)
    assert first["torch_threads"] == second["torch_threads"] >= 1


def test_runs_killed_at_random_points_resume_to_the_uninterrupted_result(reference, tmp_path, capsys):
    path, uninterrupted, whole = reference
    startup = uninterrupted["startup_seconds"]
    stages = [stage for stage in uninterrupted["stages"] if stage["status"] == "computed"]
    rng = random.Random(SEED)
    kills: list[str] = []
    runs = 0
    while len(kills) < KILLS:
        out = tmp_path / f"killed-{runs}"
        runs += 1
        for _ in range(KILLS_BEFORE_FINISHING):
            victim = start(path, out)
            began = started(out, victim)
            stage = rng.choice(stages + [None])  # inside a stage mostly: they are short next to the start-up
            if stage is None:
                time.sleep(max(0.0, rng.uniform(0, whole - startup) - (time.monotonic() - began)))
            else:
                while not (out / f".{stage['name']}.partial").exists() and victim.poll() is None:
                    time.sleep(0.002)
                time.sleep(rng.uniform(0, stage["seconds"]))
            if victim.poll() is not None:  # it finished first: nothing left to interrupt
                break
            where = in_progress(out)
            victim.send_signal(signal.SIGKILL)
            victim.wait()
            kills.append(where)
            assert_nothing_half_written(out)
            if len(kills) == KILLS:
                break
        assert_same_as(uninterrupted, finish(path, out))
    with capsys.disabled():
        print(f"\n{len(kills)} kills (seed {SEED}) survived in {runs} runs, by stage in progress: "
              + ", ".join(f"{name} {kills.count(name)}" for name in sorted(set(kills))))


def test_a_training_stage_killed_mid_epoch_resumes_from_its_last_checkpoint(write_recipe, tmp_path):
    path = write_recipe([{"kind": "finetune", "epochs": 3, "batch_size": 2, "lr": 1e-3, "checkpoint_every": 40}])
    reference = finish(path, tmp_path / "reference")
    out = tmp_path / "killed"
    victim = start(path, out)
    deadline = time.monotonic() + 300
    while not list(out.glob(".00-finetune.checkpoint-*/step-*")) and victim.poll() is None:
        assert time.monotonic() < deadline, "no checkpoint was written"
        time.sleep(0.02)
    assert victim.poll() is None, "the run ended before its first checkpoint could be interrupted"
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    checkpoint = int(next(out.glob(".00-finetune.checkpoint-*/step-*")).name.removeprefix("step-"))

    manifest = finish(path, out)
    effect = read_manifest(out / "00-finetune")["history"][-1]["effect"]
    assert effect["resumed_from_step"] >= checkpoint > 0
    assert effect["resumed_from_step"] % (effect["steps"] // 3), "the checkpoint fell on an epoch boundary"
    assert_same_as(reference, manifest)
    assert not list(out.glob(".00-finetune.checkpoint-*")), "a finished stage's checkpoints were kept"
