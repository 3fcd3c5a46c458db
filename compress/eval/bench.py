"""Benchmark variants of one model side by side: a worker process each, timed in interleaved rounds."""

from __future__ import annotations

import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from compress.arch import is_text_stream
from compress.errors import BenchError
from compress.eval.latency import summarize
from compress.eval.metrics import compare_paired
from compress.eval.size import deployed_files, disk_size
from compress.eval.targets import DEFAULT, TARGETS, Target, targets_for
from compress.eval.worker import shape_input
from compress.eval.workers import WorkerProcess, started_workers
from compress.evalset import EvalSet
from compress.kinds import Kind
from compress.settings import BenchConfig
from compress.sysinfo import library_versions, machine_info

RESULTS_FORMAT = "compress-results/2"  # 2: runtimes, roofline, per-row metric outcomes, the eval fingerprint
METRIC_BATCH_SIZE = 32
# The inputs every variant is timed on, as the worker names them, and the row column each one fills.
LATENCY_COLUMNS = {"fixed": "latency_ms", "padded": "latency_padded_ms", "real": "latency_real_ms"}
# What a generation is timed by, as the worker names it and as the row does.
GENERATION_COLUMNS = ("ttft_ms", "per_token_ms")
# One whole generation warms a variant up again after the others have taken the caches: it runs every step.
GENERATION_WARMUP = 1


@dataclass
class Variant:
    name: str
    artifact_dir: Path
    format: str  # "torch" or "onnx": what the artifact deploys
    precision: str
    parent: str | None = None  # the variant this one was made from that deploys on the same runtime
    target: str | None = None  # where it runs (targets.py); default: its format's default runtime
    not_run: str | None = None  # why this machine cannot run it: it becomes a row that says so

    @property
    def runs_on(self) -> Target:
        return TARGETS[self.target or DEFAULT[self.format]]


@dataclass(frozen=True)
class BenchStage:
    name: str
    directory: Path
    kind: Kind
    parent: str | None  # the stage it was made from that deploys the same format


def on_targets(stages: list[BenchStage], targets: list[Target]) -> list[Variant]:
    """Every stage on each listed target that runs its format (its format's default when none does). The first
    such target keeps the stage's name, the others add theirs: `01-export@openvino-bf16`. A variant's parent is
    its stage's parent on the same target (a row that cannot run is nobody's parent: see `_row`)."""
    variants = []
    for stage in stages:
        for index, target in enumerate(targets_for(stage.kind.format, targets)):
            def named(stage_name: str, index: int = index, target: Target = target) -> str:
                return stage_name if index == 0 else f"{stage_name}@{target.name}"

            variants.append(Variant(named(stage.name), stage.directory, stage.kind.format, stage.kind.precision,
                                    None if stage.parent is None else named(stage.parent), target.name,
                                    target.rejects(stage.kind) or target.unavailable()))
    return variants


def run_bench(variants: list[Variant], evalset: EvalSet, cfg: BenchConfig, baseline: str, quiet: bool = False) -> dict:
    """Metric, latency, size and peak memory of every variant, with speed-ups and metric change vs `baseline`
    and vs each variant's parent; for a causal LM also its generation speed, or why it cannot generate. A variant
    this machine cannot run, or whose runtime cannot load it, is a row that says why."""
    _check_variants(variants, baseline)
    inputs = (["fixed", "padded"] + (["real"] if min(cfg.real_length_samples, len(evalset)) else [])
              + [shape_input(batch, length) for batch, length in cfg.shapes[1:]])
    generation = is_text_stream(evalset.task)
    not_run = {variant.name: variant.not_run for variant in variants if variant.not_run}
    if baseline in not_run:
        raise BenchError(f"the baseline {baseline!r} cannot run here: {not_run[baseline]}")
    runnable = [variant for variant in variants if variant.name not in not_run]
    with tempfile.TemporaryDirectory(prefix="compress-bench-") as scratch:  # the eval arrays, the workers' stderr
        evalset_path = Path(scratch) / "evalset.npz"
        evalset.save(evalset_path)
        with started_workers([v.name for v in runnable], cfg.threads, cfg.timeout_s, Path(scratch)) as workers:
            measured = _measure(workers, runnable, evalset_path, inputs, generation, cfg, quiet)
    not_run |= {name: own["error"] for name, own in measured.items() if "error" in own}
    if baseline in not_run:
        raise BenchError(f"the baseline {baseline!r} cannot run here: {not_run[baseline]}")
    rows = [_not_run_row(variant, not_run[variant.name]) if variant.name in not_run
            else _row(variant, measured, baseline, generation, cfg, not_run) for variant in variants]
    _add_rooflines(variants, rows, evalset.real_token_inputs(cfg.batch, cfg.seq), cfg.threads)
    if not quiet:
        for row in rows:
            tqdm.write(_summary_line(row), file=sys.stderr)
    return {
        "format": RESULTS_FORMAT,
        "baseline": baseline,
        "data": {"fingerprint": evalset.fingerprint(), "eval_rows": len(evalset)},
        "machine": machine_info(),
        "versions": library_versions(),
        "bench": cfg.model_dump(),
        "rows": rows,
    }


def _check_variants(variants: list[Variant], baseline: str) -> None:
    by_name = {variant.name: variant for variant in variants}
    if len(by_name) != len(variants):
        raise ValueError(f"variant names must be unique: {', '.join(v.name for v in variants)}")
    if baseline not in by_name:
        raise ValueError(f"baseline {baseline!r} is not among the variants ({', '.join(by_name)})")
    for variant in variants:
        if variant.parent is None:
            continue
        parent = by_name.get(variant.parent)
        if parent is None or parent is variant:
            raise ValueError(f"{variant.name}: parent {variant.parent!r} is not another of the variants")
        if parent.format != variant.format:
            raise ValueError(f"{variant.name}: parent {parent.name!r} deploys on {parent.format}, not {variant.format}")


def _measure(workers: dict[str, WorkerProcess], variants: list[Variant], evalset_path: Path, inputs: list[str],
             generation: bool, cfg: BenchConfig, quiet: bool) -> dict[str, dict]:
    """Each worker's measurements, or {"error": why} for one whose runtime could not load its artifact."""
    for variant in variants:  # all load at once: nothing is timed yet
        workers[variant.name].send(_load_request(variant, evalset_path, cfg))
    measured = {name: worker.receive() for name, worker in workers.items()}
    for name in [name for name, own in measured.items() if "error" in own]:
        workers.pop(name).stop(graceful=True)
    generating = [name for name in workers if generation and measured[name]["cannot_generate"] is None]
    with tqdm(total=cfg.rounds * (len(inputs) * len(workers) + len(generating)), desc="bench latency",
              unit="request", disable=quiet, leave=False) as bar:
        timings = _interleaved_rounds(workers, inputs, generating, cfg, bar)
    for name, worker in workers.items():
        measured[name]["latency"] = {kind: summarize(rounds) for kind, rounds in timings[name].items()}
        # Before the metric's large batches, which would inflate the figure beyond what deployment needs.
        measured[name]["peak_rss_mb"] = worker.request({"op": "rss"})["peak_rss_mb"]
    for name, worker in tqdm(workers.items(), desc="bench metric", unit="variant", disable=quiet, leave=False):
        measured[name]["metric"] = worker.request({"op": "metric", "batch_size": METRIC_BATCH_SIZE})
    return measured


def _load_request(variant: Variant, evalset_path: Path, cfg: BenchConfig) -> dict:
    return {"op": "load", "artifact_dir": str(Path(variant.artifact_dir).resolve()), "evalset": str(evalset_path),
            "threads": cfg.threads, "batch_size": cfg.batch, "seq_len": cfg.seq,
            "real_length_samples": cfg.real_length_samples, "target": variant.runs_on.name,
            "shapes": cfg.shapes[1:]}


def _interleaved_rounds(workers: dict[str, WorkerProcess], inputs: list[str], generating: list[str],
                        cfg: BenchConfig, bar: tqdm) -> dict[str, dict[str, list[list[float]]]]:
    """Each round times every variant in turn (A B C, A B C, ...), so a machine that drifts (thermal limits,
    other load) weighs on all variants alike instead of on whichever ran at the time. Timings are keyed by
    input kind, then by generation column for the variants in `generating`."""
    timings: dict[str, dict[str, list[list[float]]]] = {
        name: {kind: [] for kind in [*inputs, *(GENERATION_COLUMNS if name in generating else ())]}
        for name in workers}
    for runs, generations in zip(_shares(cfg.runs, cfg.rounds), _shares(cfg.generation_runs, cfg.rounds)):
        for kind in inputs:
            for name, worker in workers.items():
                # Warm-up in every round: the variants timed in between have taken the caches.
                request = {"op": "latency", "inputs": kind, "warmup": cfg.warmup, "runs": runs}
                timings[name][kind].append(worker.request(request)["timings_ms"])
                bar.update()
        for name in generating:
            request = {"op": "generate", "new_tokens": cfg.new_tokens, "warmup": GENERATION_WARMUP,
                       "runs": generations}
            for column, values in workers[name].request(request).items():
                timings[name][column].append(values)
            bar.update()
    return timings


def _shares(total: int, parts: int) -> list[int]:
    """`total` split into `parts` near-equal whole numbers."""
    return [total // parts + (index < total % parts) for index in range(parts)]


def _row(variant: Variant, measured: dict[str, dict], baseline: str, generation: bool, cfg: BenchConfig,
         not_run: dict[str, str]) -> dict:
    own = measured[variant.name]
    parent = None if variant.parent in not_run else variant.parent
    metric = own["metric"]
    change = compare_paired(metric["name"], _rows(measured[baseline]), _rows(own))
    latency = own["latency"]
    return {
        "name": variant.name,
        "format": variant.format,
        "precision": variant.precision,
        "target": variant.runs_on.name,
        "parent": parent,
        "runtime": own["runtime"],
        "metric": {"name": metric["name"], "value": metric["value"]},
        "metric_rows": metric["rows"],  # per eval row, so another run on the same rows compares paired (gate)
        "metric_delta": change.delta,
        "metric_delta_ci95": list(change.delta_ci95),
        "metric_change_rel": change.rel,
        "metric_change_rel_ci95": None if change.rel_ci95 is None else list(change.rel_ci95),
        **{column: latency.get(kind) for kind, column in LATENCY_COLUMNS.items()},
        "batch_size": cfg.batch,
        "seq_len": cfg.seq,
        "throughput_per_s": cfg.batch * 1000 / latency["fixed"]["p50"],  # sequences a second at the main shape
        "speedup_vs_baseline": _speedup(measured[baseline], own),
        "speedup_vs_parent": None if parent is None else _speedup(measured[parent], own),
        **disk_size(deployed_files(variant.artifact_dir, variant.format)),
        "peak_rss_mb": own["peak_rss_mb"],
        **(_generation(own) if generation else {}),
        **({"latency_by_shape": _by_shape(latency, cfg)} if len(cfg.shapes) > 1 else {}),
    }


def _by_shape(latency: dict, cfg: BenchConfig) -> list[dict]:
    """Latency and throughput at every shape timed, the main one first."""
    found = []
    for index, (batch, length) in enumerate(cfg.shapes):
        summary = latency["fixed" if index == 0 else shape_input(batch, length)]
        found.append({"batch_size": batch, "seq_len": length, **summary,
                      "throughput_per_s": batch * 1000 / summary["p50"]})
    return found


def _add_rooflines(variants: list[Variant], rows: list[dict], features: dict[str, np.ndarray],
                   threads: int) -> None:
    """Each measured row's place on the roofline of the device it ran on: FLOPs and bytes of one fixed-length
    forward pass (counted once per artifact) against the peak of the unit its precision computes on."""
    from compress.eval import roofline

    costs: dict[Path, roofline.Cost] = {}
    cpu = {"ghz": roofline.cpu_ghz(), "bandwidth": roofline.copy_bandwidth(), "isa": machine_info()["isa"]}
    for variant, row in zip(variants, rows, strict=True):
        if "not_run" in row:
            continue
        if variant.artifact_dir not in costs:
            costs[variant.artifact_dir] = _cost(variant, features)
        row["roofline"] = _roofline(costs[variant.artifact_dir], variant, row, threads, cpu)


def _cost(variant: Variant, features: dict[str, np.ndarray]) -> Any:
    from compress.artifact import GRAPH, Artifact
    from compress.eval import roofline

    if variant.format == "onnx":
        return roofline.onnx_cost(Path(variant.artifact_dir) / GRAPH, features)
    return roofline.torch_cost(Artifact.load(variant.artifact_dir).model, features)


def _roofline(cost: Any, variant: Variant, row: dict, threads: int, cpu: dict) -> dict | None:
    from compress.eval import roofline

    target = variant.runs_on
    compute = target.computes(variant.precision)
    if target.device == "cuda":
        peak = roofline.gpu_peak(row["runtime"].get("device_name") or "", compute)
        if peak is None:
            return None  # a GPU without a datasheet entry: no roofline rather than a made-up one
        peak_flops, bandwidth, label = peak
    elif cpu["ghz"] is None:
        return None
    else:
        peak_flops, label = roofline.cpu_peak(cpu["isa"], compute, threads, cpu["ghz"])
        bandwidth = cpu["bandwidth"]
    width = 2 if compute in ("bf16", "fp16") else 4
    return roofline.roofline(cost, compute, width, row["latency_ms"]["p50"], peak_flops, bandwidth, label)


def _not_run_row(variant: Variant, reason: str) -> dict:
    target = variant.runs_on
    return {"name": variant.name, "format": variant.format, "precision": variant.precision, "target": target.name,
            "parent": None, "runtime": {"name": target.engine, "device": target.device}, "not_run": reason,
            **disk_size(deployed_files(variant.artifact_dir, variant.format))}


def _generation(measured: dict) -> dict:
    """Time to first token and per token after it, both None where the variant cannot generate, and why not."""
    return {**{column: measured["latency"].get(column) for column in GENERATION_COLUMNS},
            "cannot_generate": measured["cannot_generate"]}


def _rows(measured: dict) -> dict[str, np.ndarray]:
    return {key: np.asarray(values) for key, values in measured["metric"]["rows"].items()}


def _speedup(reference: dict, measured: dict) -> float:
    return reference["latency"]["fixed"]["p50"] / measured["latency"]["fixed"]["p50"]


def _summary_line(row: dict) -> str:
    if "not_run" in row:
        return f"bench {row['name']}: not run: {row['not_run']}"
    metric = row["metric"]
    generation = ""
    if row.get("ttft_ms"):
        generation = (f", first token {row['ttft_ms']['p50']:.2f} ms then {row['per_token_ms']['p50']:.2f} ms "
                      "per token")
    return (
        f"bench {row['name']}: {metric['name']} {metric['value']:.4f}, p50 {row['latency_ms']['p50']:.2f} ms "
        f"({row['speedup_vs_baseline']:.2f}x baseline){generation}, peak RSS {row['peak_rss_mb']:.0f} MiB"
    )
