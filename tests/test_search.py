from __future__ import annotations

import json
import re

import pytest

from compress.cli import main
from compress.errors import RecipeError
from compress.search import LADDERS, ladder

FINETUNE = {"kind": "finetune", "batch_size": 16, "lr": 1e-3, "max_steps": 3}


@pytest.fixture
def recipe(write_recipe) -> str:
    return write_recipe([FINETUNE])


def test_the_ladders_go_from_quantization_to_pruning_to_distillation():
    assert list(LADDERS["classification"]) == ["int8-dynamic", "int8-static", "prune-30-int8", "prune-50-int8",
                                               "distill-half-int8"]
    assert list(ladder("causal-lm")) == ["int8-dynamic", "int4-weight-only", "prune-mlp-30-int8"]
    with pytest.raises(RecipeError, match="--rungs: unknown rung 'int2'"):
        ladder("sequence-classification", ["int2"])


def test_a_missing_recipe_or_unknown_rung_is_one_line_before_any_work(tmp_path, recipe, capsys):
    assert main(["search", str(tmp_path / "nope.yaml"), "--out", str(tmp_path / "s"), "--max-drop", "1"]) == 2
    assert "nope.yaml: recipe file not found" in capsys.readouterr().err
    assert main(["search", recipe, "--out", str(tmp_path / "s"), "--max-drop", "1", "--rungs", "int2"]) == 2
    assert "--rungs: unknown rung 'int2'" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


def test_search_returns_the_fastest_rung_within_budget_with_its_eval_evidence(tmp_path, recipe, capsys):
    out = tmp_path / "search"
    rungs = ("int8-dynamic", "int8-static", "prune-30-int8")
    assert main(["-q", "search", recipe, "--out", str(out), "--max-drop", "100", "--rungs", ",".join(rungs)]) == 0
    record = json.loads((out / "search.json").read_text())
    assert set(record["verdicts"]) == set(rungs)
    validation = record["validation"]
    # Each rung is judged by its own last step, int8 (not the fp32 export of the base a pruning run adds).
    assert validation["prune-30-int8"]["size_bytes"] < validation["int8-dynamic"]["size_bytes"] < (
        validation["base"]["size_bytes"])
    fastest = min(rungs, key=lambda name: validation[name]["p50_ms"])
    assert record["chosen"] == fastest
    assert re.search(rf"rungs/{fastest}/0[2-4]-ptq$", record["artifact"])
    assert set(record["eval"]) == {"base", fastest}
    assert f"chosen: {fastest} -> " in capsys.readouterr().out
    report = (out / "report.md").read_text()
    assert "Chosen by compress search (fastest, max drop 100) on the validation split" in report
    # The base model was made once: both rungs took it from the stage store.
    statuses = [json.loads((out / "rungs" / name / "manifest.json").read_text())["stages"][0]["status"]
                for name in rungs]
    assert statuses == ["shared"] * len(rungs)


def test_a_budget_no_rung_meets_exits_4_with_each_rungs_reason(tmp_path, recipe, capsys):
    out = tmp_path / "search"
    assert main(["-q", "search", recipe, "--out", str(out), "--max-drop", "100", "--max-latency-ms", "0.0001",
                 "--rungs", "int8-dynamic"]) == 4
    err = capsys.readouterr().err
    assert "no rung met the budget on the validation split: int8-dynamic runs" in err and "(allowed 0.0001)" in err
    assert json.loads((out / "search.json").read_text())["verdicts"]["int8-dynamic"].startswith("runs ")
