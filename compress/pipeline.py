"""Run a recipe: one stage directory per step, written atomically under a lock, cached by what went into it."""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

import compress
from compress import models
from compress.arch import is_text_stream
from compress.artifact import STAGE_RECORD, Artifact, read_manifest, tokenizer_fingerprint
from compress.context import Context
from compress.data import TaskData, build_eval_set, load_task_data
from compress.depths import base_depth, check_depths
from compress.errors import CompressError, OutDirError, RecipeError
from compress.evalset import EvalSet
from compress.kinds import Kind
from compress.plan import (
    BASE,
    STAGE_NAME,
    PlannedStage,
    baseline,
    baseline_export,
    parent_on_same_format,
    plan_stages,
    used_as_input,
)
from compress.ranks import Ranks
from compress.recipe import Recipe, own_train_data, step_pass_module
from compress.reproducibility import files_digest, reproducibility
from compress.rundir import (
    RunLock,
    atomic_write_json,
    atomic_write_text,
    code_fingerprint,
    output_errors,
    replace_dir,
    sweep_leftovers,
    verify_files,
)
from compress.settings import TrainSettings
from compress.sysinfo import library_versions, machine_info

if TYPE_CHECKING:
    from compress.eval.bench import BenchStage

log = logging.getLogger("compress")
RUN_FORMAT = "compress-run/2"
RUN_MANIFEST = "manifest.json"
NOT_IN_KEY = {"checkpoint_every"}
UNSET_NOT_IN_KEY = {"train_data"}  # settings newer than some cached stages: while unset, those stages' keys hold
GGUF_NOTE = ("smollm2-135m is dequantized from a Q4_1 GGUF: its 'fp32' weights lie on a 4-bit grid, so its "
             "int8 results need not match what int8 does to a model trained in full precision.")


@dataclass
class Stage:
    name: str
    input: str | None
    key: str
    directory: Path
    # "computed", "reused", "shared" (copied from a stage store) or "skipped" (a base model neither benchmarked
    # nor read)
    status: str
    seconds: float
    kind: Kind
    reproducible: str  # as recorded when it was computed (compress.reproducibility)


def run_pipeline(recipe: Recipe, out: Path, overwrite: bool = False, quiet: bool = False,
                 command: str | None = None, stage_store: Path | None = None) -> dict[str, Any]:
    """`stage_store`: a directory of finished stages by key, shared between runs (a sweep's points): a stage
    found there is copied in instead of computed, and each stage computed is added to it."""
    out = Path(out)
    plan = plan_stages(recipe.steps)
    reference = baseline(plan, recipe.bench.baseline)
    extra = baseline_export(plan, reference)
    check_out(out, overwrite)
    data = load_task_data(recipe.data, recipe.task, recipe.seed, recipe.train_data_sources())
    check_depths(plan, base_depth(models.resolve(recipe.model)))  # a bad model or student fails before any write
    ranks = Ranks()
    runner = _StageRunner(recipe, out, data, quiet, used_as_input(plan) | {reference.name}, ranks, stage_store)
    if not ranks.main:  # trains alongside rank 0, which alone locks, writes and benchmarks
        _compute_stages(runner, plan, extra)
        return {"stages": [], "results": None}
    with RunLock(out):
        if overwrite and not _is_run(out):
            _clear(out)
        sweep_leftovers(out)
        for stale in ("results.json", "report.md"):
            (out / stale).unlink(missing_ok=True)
        atomic_write_text(out / "recipe.resolved.yaml",
                          yaml.safe_dump(recipe.model_dump(mode="json", by_alias=True), sort_keys=False))
        manifest = {"format": RUN_FORMAT, "status": "running", "started": _now(), "command": command,
                    "data": {"fingerprint": data.fingerprint, **data.notes}, "versions": library_versions(),
                    "machine": machine_info(), "baseline": reference.name, "stages": []}
        atomic_write_json(out / RUN_MANIFEST, manifest)
        try:
            results = _run(runner, plan, reference, extra, manifest, command)
        except BaseException as err:
            manifest |= {"status": "failed", "finished": _now(), "error": f"{type(err).__name__}: {err}"}
            with contextlib.suppress(OSError):  # a full disk may refuse this record too: the error says more
                atomic_write_json(out / RUN_MANIFEST, manifest)
            raise
        manifest |= {"status": "complete", "finished": _now()}
        atomic_write_json(out / RUN_MANIFEST, manifest)
    return {"stages": manifest["stages"], "results": results}


def _run(runner: _StageRunner, plan: list[PlannedStage], reference: PlannedStage, extra: PlannedStage | None,
         manifest: dict, command: str | None) -> dict | None:
    recipe, out, data, quiet = runner.recipe, runner.out, runner.data, runner.quiet
    stages = _compute_stages(runner, plan, extra)
    _remove_stale_stages(out, {stage.name for stage in stages})
    manifest["stages"] = [_stage_summary(stage) for stage in stages]
    manifest["torch_threads"] = _torch_threads()  # bit-exact re-runs need as many threads: sums split by them
    atomic_write_json(out / RUN_MANIFEST, manifest)
    if not recipe.bench.enabled:
        return None
    return _bench(recipe, out, plan + ([extra] if extra else []), stages, reference.name, runner, quiet, command,
                  data)


def _compute_stages(runner: _StageRunner, plan: list[PlannedStage], extra: PlannedStage | None) -> list[Stage]:
    stages = [runner.base(), *(runner.step(planned) for planned in plan[1:])]
    if extra is not None:
        stages.append(runner.step(extra))
    return [stage for stage in stages if stage.status != "skipped"]


class _StageRunner:
    """Walks the planned stages, loading an input from disk only when a stage has to be computed.

    Under a multi-process launch every process walks them in step: a training stage is computed by all
    (data parallel), any other by rank 0 alone, and only rank 0 writes; the processes meet between stages.
    """

    def __init__(self, recipe: Recipe, out: Path, data: TaskData, quiet: bool, needed_on_disk: set[str],
                 ranks: Ranks, store: Path | None = None):
        self.recipe, self.out, self.data, self.quiet, self.ranks = recipe, out, data, quiet, ranks
        self.store = store
        self.needed_on_disk = needed_on_disk
        self.keys: dict[str, str] = {}
        self.in_memory: dict[str, Artifact] = {}  # only the unsaved base model lives here
        self.eval_sets: dict[tuple[str, str], EvalSet] = {}
        self.specs: dict[str, Artifact] = {}
        self.new_head = False

    def base(self) -> Stage:
        started = time.perf_counter()
        loaded = models.load(self.recipe.model, self.recipe.task, self.data.label_names, self.recipe.seed,
                             **self.recipe.load_trust)
        check_lengths(loaded.model.config, self.recipe)
        artifact = loaded.artifact()
        self.new_head = loaded.new_head
        key = _hash(artifact.fingerprint, self.recipe.task, self.recipe.seed, self.data.label_names,
                    compress.__version__)
        self.keys[BASE] = key
        if loaded.new_head and self.recipe.steps and BASE not in self.needed_on_disk:
            self.in_memory[BASE] = artifact  # a fresh task head means nothing on its own: not worth a stage
            return Stage(BASE, None, key, self.out / BASE, "skipped", 0.0, artifact.kind, self._reproducible())
        return self._stage(PlannedStage(BASE, None, None, artifact.kind), key, lambda ctx: artifact, started)

    def step(self, planned: PlannedStage) -> Stage:
        step = planned.step
        module_name = step_pass_module(step)
        settings = _what_computes(step.model_dump(mode="json", by_alias=True, exclude={"from_"}))
        refs = {field: self._ref_key(ref, planned) for field, ref in step.model_refs().items()}
        key = _hash(self.keys[planned.input], settings, step.key_facts(), refs, self.data.fingerprint,
                    library_versions(), compress.__version__, code_fingerprint(module_name))
        self.keys[planned.name] = key

        def compute(ctx: Context) -> Artifact:
            return importlib.import_module(module_name).run(self._artifact(planned.input), step, ctx)

        return self._stage(planned, key, compute, time.perf_counter())

    def _stage(self, planned: PlannedStage, key: str, compute: Any, started: float) -> Stage:
        name, final = planned.name, self.out / planned.name
        self.ranks.wait()  # every process sees the earlier stages on disk
        reason = _why_not_reusable(final, key)
        if reason is None:
            log.info("%s: reused (inputs unchanged, key %s)", name, key[:12])
            return _finished(planned, key, final, "reused")
        if self.store is not None and self.ranks.main and _why_not_reusable(self.store / key, key) is None:
            _copy_stage(self.store / key, final)
            log.info("%s: shared (the same stage from the stage store, key %s)", name, key[:12])
            return _finished(planned, key, final, "shared")
        if not (self.ranks.main or isinstance(planned.step, TrainSettings)):
            self.ranks.wait()  # rank 0 computes a stage that does not train on its own
            return _finished(planned, key, final, "computed")
        log.info("%s: computing%s", name, "" if reason == "new" else f" ({reason})")
        scratch = self.out / f".{name}.partial" if self.ranks.main else Path(tempfile.mkdtemp(prefix="compress-"))
        shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir()
        try:
            with output_errors(self.out, name):
                artifact = compute(self._context(name, key, scratch, planned))
                _check_kind(planned, artifact.kind)
                seconds = round(time.perf_counter() - started, 2)
                if self.ranks.main:
                    self._save(planned, key, artifact, scratch, seconds)
        except BaseException:
            shutil.rmtree(scratch, ignore_errors=True)  # a failed stage leaves nothing (its checkpoints stay)
            raise
        if not self.ranks.main:
            shutil.rmtree(scratch)
        self.ranks.wait()
        return Stage(name, planned.input, key, final, "computed", seconds, artifact.kind, self._reproducible())

    def _save(self, planned: PlannedStage, key: str, artifact: Artifact, partial: Path, seconds: float) -> None:
        name = planned.name
        if planned.step is not None:
            artifact.history[-1] = {**artifact.history[-1], "stage": name, "seconds": seconds}
        artifact.save(partial)
        atomic_write_json(partial / STAGE_RECORD, {"key": key, "input": planned.input, "seconds": seconds,
                                                   "kind": artifact.kind.to_json(),
                                                   "reproducible": self._reproducible()})
        replace_dir(partial, self.out / name)  # only a complete stage ever carries the final name
        if self.store is not None:
            _copy_stage(self.out / name, self.store / key)
        for checkpoints in self.out.glob(f".{name}.checkpoint-*"):
            shutil.rmtree(checkpoints, ignore_errors=True)
        log.info("%s: computed in %.1f s", name, seconds)

    def _reproducible(self) -> str:
        return reproducibility(_device(), self.ranks.count)

    def _context(self, name: str, key: str, partial: Path, planned: PlannedStage) -> Context:
        checkpoint_dir = self.out / f".{name}.checkpoint-{key[:16]}"
        for stale in self.out.glob(f".{name}.checkpoint-*"):
            if stale != checkpoint_dir:  # made for other inputs or settings
                shutil.rmtree(stale, ignore_errors=True)
        own = own_train_data(planned.step) if planned.step else None
        return Context(stage_dir=partial, task=self.recipe.task, seed=self.recipe.seed,
                       max_length=self.recipe.data.max_length, data=self.data, make_eval_set=self.eval_set,
                       resolve_model=lambda ref: self._resolve(ref, planned), checkpoint_dir=checkpoint_dir,
                       train_data=own[1] if own else None, device=_device(), quiet=self.quiet)

    def eval_set(self, tokenizer: Any, split: str = "eval") -> EvalSet:
        # Each stage reloads its tokenizer: the same vocabulary gives the same arrays.
        key = (tokenizer_fingerprint(tokenizer), split)
        if key not in self.eval_sets:
            self.eval_sets[key] = build_eval_set(self.data, tokenizer, self.recipe.data, split)
        return self.eval_sets[key]

    def _artifact(self, name: str) -> Artifact:
        return self.in_memory.get(name) or Artifact.load(self.out / name)

    def _resolve(self, ref: str, planned: PlannedStage) -> Artifact:
        if ref in planned.stage_refs:
            return self._artifact(planned.stage_refs[ref])
        if ref not in self.specs:
            self.specs[ref] = models.load(ref, self.recipe.task, self.data.label_names, self.recipe.seed,
                                          **self.recipe.load_trust).artifact()
        return self.specs[ref]

    def _ref_key(self, ref: str, planned: PlannedStage) -> str:
        if ref in planned.stage_refs:
            return self.keys[planned.stage_refs[ref]]
        return self._resolve(ref, planned).fingerprint


def _what_computes(settings: Any) -> Any:
    """The settings without those that cannot change a stage's files (a resumed run ends where an uninterrupted
    one does), so adding checkpoints to a recipe reuses its stages."""
    if isinstance(settings, dict):  # kept as None, not dropped: keys of stages made without them stay as they were
        return {name: None if name in NOT_IN_KEY else _what_computes(value) for name, value in settings.items()
                if not (name in UNSET_NOT_IN_KEY and value is None)}
    return settings


def _finished(planned: PlannedStage, key: str, directory: Path, status: str) -> Stage:
    record = json.loads((directory / STAGE_RECORD).read_text())
    return Stage(planned.name, planned.input, key, directory, status, record["seconds"], Kind.from_json(record["kind"]),
                 record.get("reproducible", "not recorded (computed by an older compress)"))


def _copy_stage(source: Path, target: Path) -> None:
    """A finished stage copied whole under `target` (hard links where the filesystem allows: stage files are
    never changed in place), or not at all."""
    partial = target.with_name(f".{target.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        shutil.copytree(source, partial, copy_function=os.link)
    except OSError:  # another filesystem: copy the bytes
        shutil.rmtree(partial, ignore_errors=True)
        shutil.copytree(source, partial)
    replace_dir(partial, target)


def check_out(out: Path, overwrite: bool) -> None:
    """`--out` must be absent, empty, or a previous compress run (which is resumed)."""
    if not out.exists() or _is_run(out):
        return
    if not out.is_dir():
        raise OutDirError(f"--out: {out} is a file, not a directory")
    if any(path.name != ".lock" for path in out.iterdir()) and not overwrite:
        raise OutDirError(f"--out: {out} is not empty and not a compress run; pick another or pass --overwrite")


def check_lengths(config: Any, recipe: Recipe) -> None:
    """Inputs longer than the model's position table fail deep inside the model: say so up front."""
    positions = getattr(config, "max_position_embeddings", None)
    if positions is None:
        return
    if recipe.data.max_length > positions:
        raise RecipeError(f"data.max_length: {recipe.data.max_length} exceeds the model's {positions} positions")
    longest = max(length for _, length in recipe.bench.shapes)
    if recipe.bench.enabled and longest > positions:
        raise RecipeError(f"bench.seq_len: {longest} exceeds the model's {positions} positions")
    generated = recipe.bench.seq + recipe.bench.new_tokens
    if recipe.bench.enabled and is_text_stream(recipe.task) and generated > positions:
        raise RecipeError(f"bench.new_tokens: a {recipe.bench.seq}-token prompt and {recipe.bench.new_tokens} new "
                          f"tokens ({generated}) exceed the model's {positions} positions")


def _check_kind(planned: PlannedStage, made: Kind) -> None:
    """A pass must make what its step's contract promised: later steps were checked against that."""
    if made.evolve(external_data=False) != planned.kind.evolve(external_data=False):
        raise CompressError(f"{planned.name}: the pass made {made.describe()}, but its step promised "
                            f"{planned.kind.describe()}; this is a bug in the pass or its step contract")


def _why_not_reusable(directory: Path, key: str) -> str | None:
    """None when the stage there was made from the same inputs and its files are intact; else why not."""
    try:
        record = json.loads((directory / STAGE_RECORD).read_text())
    except (OSError, ValueError):
        return "new"
    if record.get("key") != key:
        return "inputs changed"
    try:
        changed = verify_files(directory, read_manifest(directory)["files"])
    except CompressError as err:
        changed = str(err)
    return None if changed is None else f"recomputing: {changed}"


def _bench(recipe: Recipe, out: Path, plan: list[PlannedStage], stages: list[Stage], reference: str,
           runner: _StageRunner, quiet: bool, command: str | None, data: TaskData) -> dict[str, Any]:
    from compress.eval.bench import on_targets, run_bench
    from compress.eval.report import write_results
    from compress.eval.targets import check_targets

    names = {stage.name for stage in stages}
    variants = on_targets(bench_stages(plan, stages, reference), check_targets(recipe.bench.runtimes))
    from transformers import AutoTokenizer

    evals = runner.eval_set(AutoTokenizer.from_pretrained(stages[-1].directory))  # not the whole model
    results = run_bench(variants, evals, recipe.bench, reference, quiet=quiet)
    results["data"] |= {**evals.meta, **data.notes}
    results["passes"] = [_pass_record(stage) for stage in stages if stage.name != BASE]
    notes = [(f"Baseline: {reference} (the uncompressed model); 'From' is the row each one was made from on the "
              "same runtime.")]
    if runner.new_head and BASE in names:
        notes.append("base has a freshly initialised task head: its metric is chance level, and so is every row "
                     "made from it; compare their latency and their metric deltas.")
    if recipe.model == "smollm2-135m":
        notes.append(GGUF_NOTE)
    hinted = [v.name for v in variants if v.not_run is None and v.precision not in ("bf16", "fp16")
              and v.runs_on.computes(v.precision) in ("bf16", "fp16")]
    if hinted:
        notes.append(precision_hint_note(hinted))
    half = [s.name for s in stages if s.kind.format == "onnx" and s.kind.weights in ("fp16", "bf16")]
    if half:
        notes.append(half_precision_note(half))
    if is_text_stream(recipe.task):
        notes.append(f"Perplexity over {evals.meta['tokens']} tokens, context {evals.meta['context']}, "
                     f"stride {evals.meta['stride']}; latency is one forward pass of {recipe.bench.seq} tokens.")
    if "eval_split" in data.notes:
        notes.append(f"Eval rows carved from train: {data.notes['eval_split']}.")
    sparse = [stage.name for stage in stages if stage.kind.sparsity]
    if sparse:
        notes.append(sparse_speed_note(sparse))
        results["sparsity"] = {stage.name: record for stage in stages if stage.kind.sparsity
                               and (record := _sparsity_record(stage.directory)) is not None}
    write_results(results, out, notes=notes, command=command)
    return results


def bench_stages(plan: list[PlannedStage], stages: list[Stage], reference: str) -> list[BenchStage]:
    """The stages to benchmark in report order, each with the stage it was made from on the same format."""
    from compress.eval.bench import BenchStage

    names = {stage.name for stage in stages}
    onnx_reference = next((s.name for s in stages if s.input == reference and s.kind.format == "onnx"), None)
    found = []
    for stage in _in_report_order(stages, reference):
        parent = parent_on_same_format(plan, stage.name, names)
        if parent is None and stage.kind.format == "onnx" and stage.name != onnx_reference:
            parent = onnx_reference  # an ONNX row made from a compressed torch model vs the uncompressed graph
        found.append(BenchStage(stage.name, stage.directory, stage.kind, parent))
    return found


def bench_on_split(recipe: Recipe, stages: list[BenchStage], baseline: str, cfg: Any, split: str = "eval",
                   quiet: bool = False) -> dict[str, Any]:
    """Stages made outside one run (a sweep's points, a search's rungs) benchmarked together on the recipe's
    `split`, each on the runtimes `cfg` lists."""
    from transformers import AutoTokenizer

    from compress.eval.bench import on_targets, run_bench
    from compress.eval.targets import check_targets

    data = load_task_data(recipe.data, recipe.task, recipe.seed)
    evals = build_eval_set(data, AutoTokenizer.from_pretrained(stages[0].directory), recipe.data, split)
    results = run_bench(on_targets(stages, check_targets(cfg.runtimes)), evals, cfg, baseline, quiet=quiet)
    results["data"] |= {**evals.meta, **data.notes}
    return results


def sparse_speed_note(names: list[str]) -> str:
    """Unstructured zeros: say where they pay and where they do not, beside the latency that shows it."""
    return (f"{', '.join(names)}: zeros inside dense matrices (unstructured sparsity). PyTorch and ONNX Runtime's "
            "CPU provider multiply them like any other weight, so these rows gain no speed from sparsity, and "
            "none should be read into their latency; what the zeros buy here is the zipped size. 2:4 patterns "
            "run faster only on runtimes with sparse kernels (NVIDIA sparse tensor cores: see "
            "benchmarks/RESULTS.md).")


def _pass_record(stage: Stage) -> dict[str, Any]:
    """What the stage's pass recorded about itself, for the report's before/after section."""
    entry = read_manifest(stage.directory)["history"][-1]
    return {"stage": stage.name, "input": stage.input, "pass": entry["kind"], "seconds": stage.seconds,
            "effect": entry.get("effect", {})}


def _sparsity_record(directory: Path) -> dict[str, Any] | None:
    """The stage's own pruning record: achieved sparsity and each layer's, for the report."""
    history = read_manifest(directory)["history"]
    effect = history[-1].get("effect", {}) if history else {}
    if "achieved_sparsity" not in effect:
        return None
    return {"achieved": effect["achieved_sparsity"], "target": effect["target_sparsity"],
            "layers": {name: layer["sparsity"] for name, layer in effect["layers"].items()}}


def precision_hint_note(names: list[str]) -> str:
    """Rows the runtime computed in a lower precision than the artifact holds: their metric is that hint's."""
    return (f"{', '.join(names)}: the runtime was told to compute the float matrix products in bf16/fp16 (OpenVINO's "
            "inference precision hint, torch autocast); the artifact is unchanged and the metric shown is the one "
            "measured under the hint. ONNX Runtime's CPU provider has no bf16 matrix kernels, so bf16 is offered "
            "as a runtime hint, never as a bf16 graph for it.")


def half_precision_note(names: list[str]) -> str:
    """Half-precision ONNX rows timed on a CPU: say why their latency is no verdict on them."""
    return (f"{', '.join(names)}: ONNX Runtime's x86 CPU provider has few fp16 kernels and no bf16 matrix kernels, "
            "so on a CPU these rows run slower than fp32; that is not their result. They pay on GPUs and in "
            "OpenVINO. Their size and metric columns stand.")


def _in_report_order(stages: list[Stage], reference: str) -> list[Stage]:
    """Stage order, with the baseline's own export right after the baseline."""
    extra = [stage for stage in stages if stage.name == "baseline-export"]
    rest = [stage for stage in stages if stage.name != "baseline-export"]
    at = next(i for i, stage in enumerate(rest) if stage.name == reference) + 1
    return rest[:at] + extra + rest[at:]


def _stage_summary(stage: Stage) -> dict[str, Any]:
    return {"name": stage.name, "input": stage.input, "key": stage.key, "status": stage.status,
            "seconds": stage.seconds, "kind": stage.kind.to_json(),
            "files_sha256": files_digest(read_manifest(stage.directory)["files"]), "reproducible": stage.reproducible}


def _remove_stale_stages(out: Path, keep: set[str]) -> None:
    for path in out.iterdir():
        if path.is_dir() and STAGE_NAME.match(path.name) and path.name not in keep:
            shutil.rmtree(path)


def _is_run(out: Path) -> bool:
    try:
        return json.loads((out / RUN_MANIFEST).read_text()).get("format") == RUN_FORMAT
    except (OSError, ValueError):
        return False


def _clear(out: Path) -> None:
    for path in out.iterdir():
        if path.name == ".lock":
            continue  # held by this run
        shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _hash(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
