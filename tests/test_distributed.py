"""A recipe under a two-process launch (torchrun, gloo on the CPU): both train, rank 0 alone writes."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_two_processes_train_together_and_one_writes(tmp_path, tiny_bert_dir, sentiment_files):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "model": str(tiny_bert_dir), "task": "sequence-classification",
        "data": {"train": {"path": str(sentiment_files["train"]), "text": "sentence"},
                 "eval": {"path": str(sentiment_files["dev"]), "text": "sentence"}, "max_length": 32},
        "steps": [{"kind": "finetune", "max_steps": 4, "batch_size": 8},
                  {"kind": "distill", "student": {"layers": [1]}, "max_steps": 4, "batch_size": 8},
                  {"kind": "export"}],
        "bench": {"enabled": False}}))
    out = tmp_path / "run"
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
              "-m", "compress.cli", "-q", "run", str(recipe), "--out", str(out)]
    done = subprocess.run(launch, cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    assert [s["name"] for s in manifest["stages"]] == ["00-finetune", "01-distill", "02-export", "baseline-export"]
    effect = json.loads((out / "00-finetune" / "compress.json").read_text())["history"][-1]["effect"]
    assert effect["steps"] == 4 and effect["samples"] == 4 * 8 * 2  # each optimizer step saw both processes' rows
    assert not [p for p in out.iterdir() if p.name.endswith((".partial", ".old"))]
    assert done.stdout.count("00-finetune") == 1  # only rank 0 reports
