"""Run a recipe: one stage directory per step, written atomically and cached by what went into it."""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from compress import models
from compress.artifact import Artifact
from compress.context import Context
from compress.data import TaskData, build_eval_set, load_task_data
from compress.errors import OutDirError
from compress.evalset import EvalSet
from compress.recipe import Recipe, Step, step_pass_module
from compress.sysinfo import library_versions, machine_info

log = logging.getLogger("compress")
RUN_FORMAT = "compress-run/1"
RUN_MANIFEST = "manifest.json"
STAGE_RECORD = "stage.json"
STAGE_NAME = re.compile(r"^(base|\d\d-[a-z_]+)$")
GGUF_NOTE = ("smollm2-135m is dequantized from a Q4_1 GGUF: its 'fp32' weights lie on a 4-bit grid, so its "
             "int8 results need not match what int8 does to a model trained in full precision.")


@dataclass
class Stage:
    name: str
    key: str
    directory: Path
    status: str  # "computed" or "reused"
    seconds: float
    format: str
    precision: str


def prepare_out(out: Path, overwrite: bool) -> None:
    """`--out` must be empty, absent, or a previous compress run (which is resumed)."""
    if not out.exists() or _is_run(out):
        return
    if not out.is_dir():
        raise OutDirError(f"--out: {out} is a file, not a directory")
    if any(out.iterdir()):
        if not overwrite:
            raise OutDirError(f"--out: {out} is not empty and not a compress run; pick another or pass --overwrite")
        shutil.rmtree(out)


def _is_run(out: Path) -> bool:
    try:
        return json.loads((out / RUN_MANIFEST).read_text()).get("format") == RUN_FORMAT
    except (OSError, ValueError):
        return False


def run_pipeline(recipe: Recipe, out: Path, overwrite: bool = False, quiet: bool = False,
                 command: str | None = None) -> dict[str, Any]:
    out = Path(out)
    prepare_out(out, overwrite)
    data = load_task_data(recipe.data, recipe.task, recipe.seed)
    models.resolve(recipe.model, recipe.trust_remote_code)  # fail on a bad model before writing anything
    out.mkdir(parents=True, exist_ok=True)
    for stale in ("results.json", "report.md"):
        (out / stale).unlink(missing_ok=True)
    (out / "recipe.resolved.yaml").write_text(yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False))
    manifest = {"format": RUN_FORMAT, "status": "running", "started": _now(), "command": command,
                "data": {"fingerprint": data.fingerprint, **data.notes}, "versions": library_versions(),
                "machine": machine_info(), "stages": []}
    _write_json(out / RUN_MANIFEST, manifest)

    eval_sets: dict[str, EvalSet] = {}

    def eval_set(tokenizer: Any) -> EvalSet:
        key = _tokenizer_key(tokenizer)  # each stage reloads its tokenizer: same vocabulary, same eval set
        if key not in eval_sets:
            eval_sets[key] = build_eval_set(data, tokenizer, recipe.data)
        return eval_sets[key]

    runner = _StageRunner(recipe, out, data, eval_set, quiet)
    base = runner.base()
    stages = [base] if base.status != "skipped" else []
    for index, step in enumerate(recipe.steps):
        stages.append(runner.step(index, step))
    _remove_stale_stages(out, {s.name for s in stages})
    manifest["stages"] = [_stage_summary(s) for s in stages]
    _write_json(out / RUN_MANIFEST, manifest)

    results = None
    if recipe.bench.enabled:
        results = _bench(recipe, out, stages, runner, eval_set, quiet, command, data)
    manifest |= {"status": "complete", "finished": _now()}
    _write_json(out / RUN_MANIFEST, manifest)
    return {"stages": manifest["stages"], "results": results}


class _StageRunner:
    """Walks the steps, keeping the current artifact in memory only when a stage has to be computed."""

    def __init__(self, recipe: Recipe, out: Path, data: TaskData, eval_set: Callable, quiet: bool):
        self.recipe, self.out, self.data, self.eval_set, self.quiet = recipe, out, data, eval_set, quiet
        self.artifact: Artifact | None = None
        self.directory: Path | None = None
        self.key = ""

    def current(self) -> Artifact:
        if self.artifact is None:
            self.artifact = Artifact.load(self.directory)
        return self.artifact

    def base(self) -> Stage:
        started = time.perf_counter()
        loaded = models.load(self.recipe.model, self.recipe.task, self.data.label_names,
                             self.recipe.trust_remote_code, self.recipe.seed)
        self.artifact = loaded.artifact()
        self.key = _hash(self.artifact.fingerprint, self.recipe.task, self.recipe.seed, self.data.label_names)
        if loaded.new_head and self.recipe.steps:
            return Stage("base", self.key, Path(), "skipped", 0.0, "torch", "fp32")
        return self._stage("base", None, lambda ctx: self.artifact, started)

    def step(self, index: int, step: Step) -> Stage:
        name = f"{index:02d}-{step.kind}"
        self.key = _hash(self.key, step.model_dump(mode="json"), self.data.fingerprint, library_versions())
        module = importlib.import_module(step_pass_module(step))
        return self._stage(name, step, lambda ctx: module.run(self.current(), step, ctx), time.perf_counter())

    def _stage(self, name: str, step: Step | None, compute: Callable[[Context], Artifact], started: float) -> Stage:
        final = self.out / name
        if _stage_key(final) == self.key:
            log.info("%s: reused (inputs unchanged, key %s)", name, self.key[:12])
            record = json.loads((final / STAGE_RECORD).read_text())
            self.artifact, self.directory = None, final
            return Stage(name, self.key, final, "reused", record["seconds"], record["format"], record["precision"])
        log.info("%s: computing", name)
        partial = self.out / f".{name}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir()
        ctx = Context(self.recipe, partial, self.data, self.eval_set, quiet=self.quiet)
        artifact = compute(ctx)
        seconds = round(time.perf_counter() - started, 2)
        if step is not None:
            artifact.history[-1] = {**artifact.history[-1], "stage": name, "seconds": seconds}
        artifact.save(partial)
        _write_json(partial / STAGE_RECORD, {"key": self.key, "seconds": seconds, "format": artifact.format,
                                              "precision": artifact.precision})
        shutil.rmtree(final, ignore_errors=True)
        partial.rename(final)  # only a complete stage ever carries the final name
        log.info("%s: computed in %.1f s", name, seconds)
        # The next step reads the stage back from disk, exactly as it would after a cache hit.
        self.artifact, self.directory = None, final
        return Stage(name, self.key, final, "computed", seconds, artifact.format, artifact.precision)


def _bench(recipe: Recipe, out: Path, stages: list[Stage], runner: _StageRunner, eval_set: Callable, quiet: bool,
           command: str | None, data: TaskData) -> dict[str, Any]:
    from compress.eval.bench import Variant, default_baseline, run_bench
    from compress.eval.report import write_results

    variants = [Variant(s.name, s.directory, s.format, s.precision) for s in stages]
    baseline = default_baseline(variants)
    evals = eval_set(runner.current().tokenizer)
    results = run_bench(variants, evals, recipe.bench, baseline, quiet=quiet)
    results["data"] = {"eval_rows": len(evals), **evals.meta, **data.notes}
    notes = [f"Baseline: {baseline} (the last torch fp32 model before export)."]
    if recipe.model == "smollm2-135m":
        notes.append(GGUF_NOTE)
    if recipe.task == "causal-lm":
        notes.append(f"Perplexity over {evals.meta['tokens']} tokens, context {evals.meta['context']}, "
                     f"stride {evals.meta['stride']}; latency is one forward pass of {recipe.bench.seq_len} tokens.")
    if "eval_split" in data.notes:
        notes.append(f"Eval rows carved from train: {data.notes['eval_split']}.")
    write_results(results, out, notes=notes, command=command)
    return results


def _stage_key(directory: Path) -> str | None:
    try:
        return json.loads((directory / STAGE_RECORD).read_text())["key"]
    except (OSError, ValueError, KeyError):
        return None


def _stage_summary(stage: Stage) -> dict[str, Any]:
    return {"name": stage.name, "key": stage.key, "status": stage.status, "seconds": stage.seconds,
            "format": stage.format, "precision": stage.precision}


def _remove_stale_stages(out: Path, keep: set[str]) -> None:
    for path in out.iterdir():
        if path.is_dir() and (STAGE_NAME.match(path.name) or path.name.endswith(".partial")) and path.name not in keep:
            shutil.rmtree(path)


def _tokenizer_key(tokenizer: Any) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    described = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(f"{described}|{tokenizer.pad_token_id}".encode()).hexdigest()


def _hash(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _write_json(path: Path, value: Any) -> None:
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(json.dumps(value, indent=2, default=str) + "\n")
    os.replace(partial, path)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
