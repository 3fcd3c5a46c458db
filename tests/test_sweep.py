from __future__ import annotations

import json

import pytest

from compress.cli import main
from compress.errors import RecipeError
from compress.sweep import grid_points

FINETUNE = {"kind": "finetune", "batch_size": 16, "lr": 1e-3, "max_steps": 3}


@pytest.fixture
def recipe(write_recipe) -> str:
    return write_recipe([FINETUNE, {"kind": "export"},
                         {"kind": "ptq", "verify": {"max_metric_drop": 1.0, "min_agreement": 0.0}}])


def test_a_grid_is_every_combination_and_refused_over_max_runs():
    points = grid_points(["steps.2.sparsity=0.3,0.5", "steps.3.mode=dynamic,static"], max_runs=4)
    assert [p.name for p in points] == ["steps.2.sparsity=0.3,steps.3.mode=dynamic",
                                        "steps.2.sparsity=0.3,steps.3.mode=static",
                                        "steps.2.sparsity=0.5,steps.3.mode=dynamic",
                                        "steps.2.sparsity=0.5,steps.3.mode=static"]
    assert points[0].overrides == ["steps.2.sparsity=0.3", "steps.3.mode=dynamic"]
    with pytest.raises(RecipeError, match="--grid: 4 combinations, over --max-runs 3"):
        grid_points(["steps.2.sparsity=0.3,0.5", "steps.3.mode=dynamic,static"], max_runs=3)
    with pytest.raises(RecipeError, match="expected KEY=V1,V2"):
        grid_points(["steps.2.sparsity"], max_runs=3)


def test_a_sweep_runs_shared_stages_once_and_reports_every_point(tmp_path, recipe, capsys):
    out = tmp_path / "sweep"
    assert main(["-q", "sweep", recipe, "--out", str(out), "--grid", "steps.2.reduce_range=true,false"]) == 0
    shown = capsys.readouterr().out
    assert "steps.2.reduce_range=True: 00-finetune computed, 01-export computed, 02-ptq computed" in shown
    assert "steps.2.reduce_range=False: 00-finetune shared, 01-export shared, 02-ptq computed" in shown
    rows = [row["name"] for row in json.loads((out / "results.json").read_text())["rows"]]
    assert rows == ["00-finetune", "01-export", "02-ptq [steps.2.reduce_range=True]",
                    "02-ptq [steps.2.reduce_range=False]"]
    assert (out / "report.html").read_text().count("<svg") == 2
    # On the tiny model both int8 graphs predict alike: one seed cannot rank them, and the report says so.
    assert "02-ptq: the metric intervals of its 2 grid variants overlap" in (out / "report.md").read_text()
    # Run again: every stage of every point is reused, nothing computed.
    assert main(["-q", "sweep", recipe, "--out", str(out), "--grid", "steps.2.reduce_range=true,false"]) == 0
    assert "computed" not in capsys.readouterr().out


def test_a_grid_key_the_recipe_lacks_is_named_before_any_work(tmp_path, recipe, capsys):
    out = tmp_path / "sweep"
    assert main(["sweep", recipe, "--out", str(out), "--grid", "steps.2.sparsity=0.3,0.5"]) == 2
    assert "steps.2.sparsity" in capsys.readouterr().err
    assert not out.exists()
    assert main(["sweep", recipe, "--out", str(out), "--grid", "steps.0.lr=1,2,3", "--max-runs", "2"]) == 2
    assert "--grid: 3 combinations, over --max-runs 2" in capsys.readouterr().err


def test_a_point_that_fails_verification_is_reported_and_the_others_benchmarked(tmp_path, recipe, capsys):
    out = tmp_path / "sweep"
    # No tolerance at all: the exported graph's float rounding fails that point; the default passes.
    assert main(["-q", "sweep", recipe, "--out", str(out), "--grid",
                 "steps.1.verify={atol: 0.0001},{atol: 0.0, rtol: 0.0}"]) == 0
    shown = capsys.readouterr().out
    assert "{'atol': 0.0, 'rtol': 0.0}: failed verification (logits of eval rows" in shown
    record = json.loads((out / "sweep.json").read_text())
    assert [point["failed"] is None for point in record["points"]] == [True, False]
    assert "not benchmarked, it failed verification" in (out / "report.md").read_text()


def test_seeds_run_every_combination_with_several_seeds(tmp_path, recipe, capsys):
    out = tmp_path / "sweep"
    assert main(["-q", "sweep", recipe, "--out", str(out), "--grid", "steps.2.reduce_range=true", "--seeds", "2"]) == 0
    rows = [row["name"] for row in json.loads((out / "results.json").read_text())["rows"]]
    # Training differs by seed, so every stage from the fine-tune on is made twice.
    assert {"00-finetune [steps.2.reduce_range=True,seed=0]", "00-finetune [steps.2.reduce_range=True,seed=1]",
            "02-ptq [steps.2.reduce_range=True,seed=1]"} <= set(rows)
    assert main(["sweep", recipe, "--out", str(out), "--grid", "steps.2.reduce_range=true", "--seeds", "0"]) == 2
    assert "--seeds: at least 1" in capsys.readouterr().err


def test_only_grid_variants_whose_intervals_overlap_are_calledundecided():
    from compress.sweep import undecided

    def row(name: str, low: float, high: float) -> dict:
        return {"name": name, "metric_delta_ci95": [low, high]}

    apart = [row("03-ptq [a=1]", -0.05, -0.03), row("03-ptq [a=2]", -0.01, 0.01), row("00-finetune", 0.0, 0.0)]
    assert undecided(apart) == []
    close = [row("03-ptq [a=1]", -0.02, 0.0), row("03-ptq [a=2]", -0.01, 0.01)]
    assert undecided(close) == [("03-ptq: the metric intervals of its 2 grid variants overlap, so one training run "
                                 "does not rank them; --seeds 2 (or more) runs every point with more seeds.")]
