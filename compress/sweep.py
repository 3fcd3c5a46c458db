"""`compress sweep`: every combination of a grid of recipe values, their common stages computed once (a stage
store keyed by content), then all of them benchmarked side by side in one report.

A stage that every point shares keeps its name; one that differs is named after the grid values it was made
with (`02-prune [steps.2.sparsity=0.5]`). Points run one after another, each in `OUT/points/<values>`.
"""

from __future__ import annotations

import itertools
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from compress.errors import ExportMismatch, OutDirError, RecipeError
from compress.kinds import Kind
from compress.plan import baseline, baseline_export, plan_stages
from compress.recipe_loader import load_recipe

log = logging.getLogger("compress")
SWEEP_RECORD = "sweep.json"
STORE = ".stages"


@dataclass(frozen=True)
class Point:
    values: dict[str, Any]  # grid key -> this point's value

    @property
    def overrides(self) -> list[str]:
        return [f"{key}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}"
                for key, value in self.values.items()]

    @property
    def name(self) -> str:
        return ",".join(f"{key}={value}" for key, value in self.values.items())


def grid_points(grid: list[str], max_runs: int) -> list[Point]:
    """`--grid KEY=V1,V2` flags (values read as YAML) into every combination, refused over `max_runs`."""
    axes: dict[str, list[Any]] = {}
    for flag in grid:
        key, sep, text = flag.partition("=")
        if not sep or not key or not text:
            raise RecipeError(f"--grid {flag!r}: expected KEY=V1,V2,..., e.g. steps.2.sparsity=0.3,0.5")
        if key in axes:
            raise RecipeError(f"--grid {key}: given twice")
        try:
            values = yaml.safe_load(f"[{text}]")
        except yaml.YAMLError:
            raise RecipeError(f"--grid {flag!r}: the values are not a comma-separated list") from None
        axes[key] = values
    count = 1
    for values in axes.values():
        count *= len(values)
    if count > max_runs:
        raise RecipeError(f"--grid: {count} combinations, over --max-runs {max_runs}; narrow the grid or raise it")
    return [Point(dict(zip(axes, combination, strict=True))) for combination in itertools.product(*axes.values())]


def run_sweep(recipe_path: Path, grid: list[str], out: Path, overrides: list[str] = (), max_runs: int = 16,
              quiet: bool = False, command: str | None = None, seeds: int = 1) -> dict[str, Any]:
    """`seeds` > 1 runs every combination with that many seeds (the recipe's and the ones after it), so two
    settings whose accuracy intervals overlap can be told apart by more than one training run."""
    from compress.pipeline import run_pipeline

    out = Path(out)
    seed = load_recipe(recipe_path, list(overrides)).seed
    if seeds > 1:
        grid = [*grid, "seed=" + ",".join(str(seed + offset) for offset in range(seeds))]
    points = grid_points(grid, max_runs)
    # Every point validated before any work: a grid key the recipe lacks fails here, naming it.
    recipes = {point.name: _point_recipe(recipe_path, overrides, point) for point in points}
    _check_out(out)
    outcomes, failed = {}, {}
    for point in points:
        run_overrides = [*overrides, *point.overrides, "bench.enabled=false"]
        try:
            outcomes[point.name] = run_pipeline(load_recipe(recipe_path, run_overrides), out / "points" / _slug(point),
                                                quiet=quiet, stage_store=out / STORE)["stages"]
        except ExportMismatch as err:  # a point the verification refuses is a result of the sweep, not its end
            log.warning("%s: failed verification: %s", point.name, err)
            failed[point.name] = str(err)
    (out / SWEEP_RECORD).write_text(json.dumps({"grid": grid, "overrides": list(overrides), "points": [
        {"name": p.name, "values": p.values, "failed": failed.get(p.name),
         "stages": {s["name"]: s["key"] for s in outcomes.get(p.name, [])}} for p in points]}, indent=2))
    finished = [point for point in points if point.name in outcomes]
    if not finished:
        raise ExportMismatch(f"every point of the sweep failed verification; the first: {next(iter(failed.values()))}")
    first = recipes[finished[0].name]
    if not first.bench.enabled:
        return {"points": outcomes, "failed": failed, "results": None}
    results = _bench(first, finished, recipes, outcomes, failed, out, quiet, command, seeds)
    return {"points": outcomes, "failed": failed, "results": results}


def _bench(recipe: Any, points: list[Point], recipes: dict[str, Any], outcomes: dict[str, list[dict]],
           failed: dict[str, str], out: Path, quiet: bool, command: str | None, seeds: int) -> dict:
    from compress.eval.bench import BenchStage
    from compress.eval.report import write_results
    from compress.pipeline import Stage, bench_on_split, bench_stages

    names = _row_names(points, outcomes)
    rows: dict[str, BenchStage] = {}
    reference = None
    for point in points:
        steps = recipes[point.name].steps
        plan = plan_stages(steps)
        planned_reference = baseline(plan, recipe.bench.baseline)
        extra = baseline_export(plan, planned_reference)
        directory = out / "points" / _slug(point)
        stages = [Stage(s["name"], s["input"], s["key"], directory / s["name"], s["status"], s["seconds"],
                        Kind.from_json(s["kind"]), s["reproducible"]) for s in outcomes[point.name]]
        keys = {stage.name: stage.key for stage in stages}
        for found in bench_stages(plan + ([extra] if extra else []), stages, planned_reference.name):
            row = names[keys[found.name]]
            parent = None if found.parent is None else names[keys[found.parent]]
            rows.setdefault(row, BenchStage(row, found.directory, found.kind, parent))
        reference = reference or names[keys[planned_reference.name]]
    results = bench_on_split(recipe, list(rows.values()), reference, recipe.bench, quiet=quiet)
    results["sweep"] = {"grid": [point.values for point in points], "failed": failed}
    notes = [(f"Sweep over {len(points) + len(failed)} points; a stage all points share keeps its name, one that "
              "differs carries the grid values it was made with. Each point's stages: points/<values>/ beside this "
              "report.")]
    notes += [f"{name}: not benchmarked, it failed verification: {error}" for name, error in failed.items()]
    if seeds == 1:
        notes += undecided(results["rows"])
    write_results(results, out, notes=notes, command=command)
    return results


def undecided(rows: list[dict]) -> list[str]:
    """Grid variants of one stage whose intervals against the baseline overlap: one seed does not rank them."""
    groups: dict[str, list[dict]] = {}
    for row in rows:
        if " [" in row["name"] and "not_run" not in row and "@" not in row["name"].split("]")[-1]:
            groups.setdefault(row["name"].split(" [")[0], []).append(row)
    notes = []
    for stage, variants in groups.items():
        low = max(row["metric_delta_ci95"][0] for row in variants)
        high = min(row["metric_delta_ci95"][1] for row in variants)
        if len(variants) > 1 and low <= high:
            notes.append(f"{stage}: the metric intervals of its {len(variants)} grid variants overlap, so one "
                         "training run does not rank them; --seeds 2 (or more) runs every point with more seeds.")
    return notes


def _point_recipe(recipe_path: Path, overrides: list[str], point: Point) -> Any:
    try:
        return load_recipe(recipe_path, [*overrides, *point.overrides])
    except RecipeError as err:  # the --set flags were checked on their own: this one is the grid's
        raise RecipeError(str(err).replace("--set ", "--grid ", 1) + f" (grid point {point.name})") from None


def _row_names(points: list[Point], outcomes: dict[str, list[dict]]) -> dict[str, str]:
    """Stage key -> row name: the stage's own name when every point made it, else with the grid values all the
    points that made it share."""
    holders: dict[str, list[Point]] = {}
    stage_names: dict[str, str] = {}
    for point in points:
        for stage in outcomes[point.name]:
            holders.setdefault(stage["key"], []).append(point)
            stage_names.setdefault(stage["key"], stage["name"])
    names = {}
    for key, held in holders.items():
        if len(held) == len(points):
            names[key] = stage_names[key]
            continue
        common = {k: v for k, v in held[0].values.items() if all(p.values.get(k) == v for p in held)}
        names[key] = f"{stage_names[key]} [{','.join(f'{k}={v}' for k, v in common.items())}]"
    return names


def _slug(point: Point) -> str:
    return re.sub(r"[^\w.=,-]", "_", point.name)


def _check_out(out: Path) -> None:
    if out.exists() and any(out.iterdir()) and not (out / SWEEP_RECORD).is_file() and not (out / STORE).is_dir():
        raise OutDirError(f"--out: {out} is not empty and not a compress sweep; pick another")
