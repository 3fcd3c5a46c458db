"""Every file a run writes stays inside --out (and the temporary directory, emptied by the end); no user string
names a path outside it, and a step's model reference names a stage of this run or what the user wrote."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from compress.errors import RecipeError
from compress.recipe_loader import load_recipe

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("step", [
    {"kind": "export", "name": "../../outside"},
    {"kind": "export", "name": "/etc"},
    {"kind": "export", "name": "a/b"},
    {"kind": "export", "name": "."},
    {"kind": "export", "from": "@../base"},
    {"kind": "export", "from": "@/tmp/elsewhere"},
    {"kind": "distill", "student": {"layers": [0]}, "teacher": "@../../base"},
])
def test_names_and_stage_references_cannot_leave_the_run(step, tmp_path, tiny_recipe):
    with pytest.raises(RecipeError):
        load_recipe(tiny_recipe(tmp_path, [step]))


def test_a_run_writes_nothing_outside_out_and_its_emptied_temporary_directory(tmp_path, tiny_recipe):
    steps = [{"kind": "finetune", "epochs": 1, "batch_size": 16, "lr": 1e-3, "checkpoint_every": 3},
             {"kind": "export"}, {"kind": "ort-fuse"},
             {"kind": "ptq", "mode": "dynamic", "verify": {"max_metric_drop": 1.0, "min_agreement": 0.0}},
             {"kind": "ptq", "from": "@01-export", "mode": "static", "calibration": {"samples": 8},
              "verify": {"max_metric_drop": 1.0, "min_agreement": 0.0}}]
    recipe = tiny_recipe(tmp_path, steps, {"runs": 10, "warmup": 1, "real_length_samples": 2, "seq_len": 16,
                                           "runtimes": ["torch", "onnxruntime"]})
    places = {name: tmp_path / name for name in ("cwd", "home", "tmp")}
    for place in places.values():
        place.mkdir()
    out = tmp_path / "out"
    env = {**os.environ, "HOME": str(places["home"]), "TMPDIR": str(places["tmp"]),
           "XDG_CACHE_HOME": str(places["home"] / ".cache"), "PYTHONPATH": str(ROOT)}
    env.pop("HF_HOME", None)
    done = subprocess.run([sys.executable, "-m", "compress.cli", "-q", "run", str(recipe), "--out", str(out)],
                          cwd=places["cwd"], env=env, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    left = {name: sorted(str(path.relative_to(place)) for path in place.rglob("*")
                         if "matplotlib" not in path.parts)
            for name, place in places.items()}
    # matplotlib's font list (~/.cache/matplotlib, ~/.config/matplotlib) is the one library cache left: it holds
    # nothing of the user's. datasets' Arrow copies of the data and ONNX Runtime's device id are kept out.
    assert left == {"cwd": [], "home": [".cache", ".config"], "tmp": []}
    assert (out / "report.md").is_file()
