"""`compress search`: a ladder of compression recipes after a base recipe, cheapest first; each rung is judged on
the validation split against the budget, and the fastest (or smallest) rung that meets it is returned with
its evidence on the eval split.

The base recipe supplies the model, the data and the steps that make the model to compress (a fine-tune, or
none). Rungs share its stages through a stage store, so the base is made once.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from compress.arch import is_text_stream
from compress.errors import ExportMismatch, GateFailed, RecipeError
from compress.kinds import Kind
from compress.plan import plan_stages
from compress.recipe_loader import parse_recipe, read_raw

SEARCH_RECORD = "search.json"
ANY_DROP = {"max_metric_drop": 1.0, "min_agreement": 0.0}
EXPORT = [{"kind": "export"}]
FUSED_INT8 = [*EXPORT, {"kind": "ort-fuse"}, {"kind": "ptq", "mode": "dynamic"}]
# Cheapest first: quantization (seconds), then structured pruning with a recovery epoch, then distillation.
LADDERS = {
    "classification": {
        "int8-dynamic": FUSED_INT8,
        "int8-static": [*EXPORT, {"kind": "ptq", "mode": "static"}],
        "prune-30-int8": [{"kind": "prune", "method": "structured", "heads": 0.3, "ffn": 0.3,
                           "recover": {"epochs": 1}}, *FUSED_INT8],
        "prune-50-int8": [{"kind": "prune", "method": "structured", "heads": 0.5, "ffn": 0.5,
                           "recover": {"epochs": 1, "hidden_weight": 1.0}}, *FUSED_INT8],
        "distill-half-int8": [{"kind": "distill", "epochs": 2, "hidden_weight": 1.0}, *FUSED_INT8],
    },
    "text-stream": {
        "int8-dynamic": FUSED_INT8,
        "int4-weight-only": [*EXPORT, {"kind": "ptq", "mode": "weight-only", "bits": 4}],
        "prune-mlp-30-int8": [{"kind": "prune", "method": "structured", "heads": 0.0, "ffn": 0.3,
                               "recover": {"epochs": 1}}, *FUSED_INT8],
    },
}
VALIDATION_BENCH = {"runs": 30, "rounds": 3, "warmup": 3, "real_length_samples": 0, "runtimes": ["torch", "onnxruntime"]}


def ladder(task: str, names: list[str] = ()) -> dict[str, list[dict]]:
    rungs = LADDERS["text-stream" if is_text_stream(task) else "classification"]
    unknown = [name for name in names if name not in rungs]
    if unknown:
        raise RecipeError(f"--rungs: unknown rung {unknown[0]!r} (for this task: {', '.join(rungs)})")
    return {name: rungs[name] for name in names} if names else dict(rungs)


def run_search(recipe_path: Path, out: Path, max_drop: float, max_latency_ms: float | None = None,
               objective: str = "fastest", rungs: list[str] = (), quiet: bool = False) -> dict[str, Any]:
    from compress.pipeline import run_pipeline

    recipe_path, out = Path(recipe_path), Path(out)
    raw = read_raw(recipe_path)
    base = parse_recipe(raw, recipe_path.resolve().parent, str(recipe_path))
    recipes = {name: _rung_recipe(raw, steps, recipe_path) for name, steps in
               ladder(base.task, list(rungs)).items()}  # every rung validated before any work
    store = out / ".stages"
    base_stage = _last_step(base, run_pipeline(_without_bench(base), out / "base", quiet=quiet, stage_store=store))
    finished, failed = {}, {}
    for name, recipe in recipes.items():
        try:
            made = run_pipeline(recipe, out / "rungs" / name, quiet=quiet, stage_store=store)
        except ExportMismatch as err:  # an export that does not compute what torch does: no rung at all
            failed[name] = str(err)
            continue
        finished[name] = _last_step(recipe, made)
    directories = {"base": out / "base" / base_stage["name"],
                   **{name: out / "rungs" / name / stage["name"] for name, stage in finished.items()}}
    kinds = {"base": base_stage["kind"], **{name: stage["kind"] for name, stage in finished.items()}}
    decided = _bench(base, directories, kinds, "validation", VALIDATION_BENCH, quiet)
    verdicts = {row["name"]: _verdict(row, max_drop, max_latency_ms) for row in decided["rows"] if row["name"] != "base"}
    passing = [name for name, verdict in verdicts.items() if verdict is None]
    record = {"budget": {"max_drop": max_drop, "max_latency_ms": max_latency_ms, "objective": objective},
              "validation": {row["name"]: _evidence(row) for row in decided["rows"]},
              "verdicts": verdicts, "failed_verification": failed}
    if not passing:
        (out / SEARCH_RECORD).write_text(json.dumps(record, indent=2))
        raise GateFailed(f"no rung met the budget on the validation split: {_reasons(verdicts, failed)}")
    rows = {row["name"]: row for row in decided["rows"]}
    chosen = min(passing, key=lambda name: rows[name]["latency_ms"]["p50"] if objective == "fastest"
                 else rows[name]["size_bytes"])
    evidence = _bench(base, {name: directories[name] for name in ("base", chosen)}, kinds, "eval", {}, quiet,
                      out, notes=[f"Chosen by compress search ({objective}, max drop {max_drop:g}"
                                  + (f", max latency {max_latency_ms:g} ms" if max_latency_ms else "")
                                  + f") on the validation split: {chosen}; rungs tried: {', '.join(recipes)}."])
    record |= {"chosen": chosen, "artifact": str(directories[chosen]),
               "eval": {row["name"]: _evidence(row) for row in evidence["rows"]}}
    (out / SEARCH_RECORD).write_text(json.dumps(record, indent=2))
    return record


def _last_step(recipe: Any, made: dict) -> dict:
    """The stage of the recipe's last step (a run may add `baseline-export` after it)."""
    last = plan_stages(recipe.steps)[-1].name
    return next(stage for stage in made["stages"] if stage["name"] == last)


def _rung_recipe(raw: dict, steps: list[dict], recipe_path: Path) -> Any:
    """The base recipe with the rung's steps after its own. The rung's quantization checks accept any drop:
    they verify on the eval split, and the search decides on the validation split alone."""
    rung = copy.deepcopy(raw)
    rung["steps"] = [*rung.get("steps", []), *({**step, "verify": ANY_DROP} if step["kind"] == "ptq" else step
                                               for step in copy.deepcopy(steps))]
    rung.setdefault("bench", {})["enabled"] = False
    return parse_recipe(rung, recipe_path.resolve().parent, str(recipe_path))


def _without_bench(recipe: Any) -> Any:
    return recipe.model_copy(update={"bench": recipe.bench.model_copy(update={"enabled": False})})


def _bench(base: Any, directories: dict[str, Path], kinds: dict[str, dict], split: str, settings: dict,
           quiet: bool, out: Path | None = None, notes: list[str] = ()) -> dict:
    from compress.eval.bench import BenchStage
    from compress.eval.report import write_results
    from compress.pipeline import bench_on_split
    from compress.settings import BenchConfig

    cfg = BenchConfig(**{**base.bench.model_dump(), **settings, "enabled": True})
    stages = [BenchStage(name, directory, Kind.from_json(kinds[name]), None) for name, directory in directories.items()]
    results = bench_on_split(base, stages, "base", cfg, split, quiet)
    if out is not None:
        write_results(results, out, notes=notes)
    return results


def _verdict(row: dict, max_drop: float, max_latency_ms: float | None) -> str | None:
    """Why the row misses the budget, or None."""
    if "not_run" in row:
        return f"not run: {row['not_run']}"
    metric = row["metric"]
    drop = -row["metric_delta"] * 100 if metric["name"] == "accuracy" else row["metric_change_rel"] * 100
    if drop > max_drop:
        return f"loses {drop:.2f} {'pt' if metric['name'] == 'accuracy' else '%'} (allowed {max_drop:g})"
    if max_latency_ms is not None and row["latency_ms"]["p50"] > max_latency_ms:
        return f"runs {row['latency_ms']['p50']:.2f} ms (allowed {max_latency_ms:g})"
    return None


def _evidence(row: dict) -> dict:
    if "not_run" in row:
        return {"not_run": row["not_run"]}
    return {"metric": row["metric"], "metric_delta": row["metric_delta"], "metric_delta_ci95": row["metric_delta_ci95"],
            "p50_ms": row["latency_ms"]["p50"], "size_bytes": row["size_bytes"]}


def _reasons(verdicts: dict[str, str | None], failed: dict[str, str]) -> str:
    return "; ".join([*(f"{name} {why}" for name, why in verdicts.items()),
                      *(f"{name} failed verification" for name in failed)])
