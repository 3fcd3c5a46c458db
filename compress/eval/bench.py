"""Benchmark variants of one model, each in its own worker process, one after another on the same machine."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

import compress
from compress.artifact import GRAPH, WEIGHTS
from compress.evalset import EvalSet
from compress.recipe import BenchConfig
from compress.sysinfo import library_versions, machine_info

METRIC_BATCH_SIZE = 32
STDERR_TAIL = 3000  # characters of a failed worker's stderr put in the error


@dataclass
class Variant:
    name: str
    artifact_dir: Path
    format: str  # "torch" or "onnx": what the artifact deploys
    precision: str


def default_baseline(variants: list[Variant]) -> str:
    """The last torch model (the one that got exported), or the first variant when none is torch."""
    torch_variants = [v for v in variants if v.format == "torch"]
    return torch_variants[-1].name if torch_variants else variants[0].name


def run_bench(variants: list[Variant], evalset: EvalSet, cfg: BenchConfig, baseline: str, quiet: bool = False) -> dict:
    """Metric, latency, size and peak memory of every variant, with speed-up and metric change vs `baseline`."""
    names = [variant.name for variant in variants]
    if baseline not in names:
        raise ValueError(f"baseline {baseline!r} is not among the variants ({', '.join(names)})")
    if len(set(names)) != len(names):
        raise ValueError(f"variant names must be unique: {', '.join(names)}")
    measured = {}
    with tempfile.TemporaryDirectory(prefix="compress-bench-") as scratch:  # requests, results, the eval arrays
        workdir = Path(scratch)
        evalset_path = workdir / "evalset.npz"
        evalset.save(evalset_path)
        for variant in tqdm(variants, desc="bench", unit="variant", disable=quiet):
            measured[variant.name] = _run_worker(variant, evalset_path, cfg, workdir)
            if not quiet:
                tqdm.write(_summary_line(variant, measured[variant.name]), file=sys.stderr)
    reference = measured[baseline]
    return {
        "baseline": baseline,
        "machine": machine_info(),
        "versions": library_versions(),
        "bench": cfg.model_dump(),
        "rows": [_row(variant, measured[variant.name], reference, cfg) for variant in variants],
    }


def _run_worker(variant: Variant, evalset_path: Path, cfg: BenchConfig, workdir: Path) -> dict:
    request = {
        "artifact_dir": str(Path(variant.artifact_dir).resolve()),
        "evalset": str(evalset_path.resolve()),
        "threads": cfg.threads,
        "batch_size": cfg.batch_size,
        "seq_len": cfg.seq_len,
        "warmup": cfg.warmup,
        "runs": cfg.runs,
        "real_length_samples": cfg.real_length_samples,
        "metric_batch_size": METRIC_BATCH_SIZE,
    }
    stem = re.sub(r"[^\w.-]", "_", variant.name)
    request_path = workdir / f"{stem}.request.json"
    result_path = workdir / f"{stem}.result.json"
    request_path.write_text(json.dumps(request, indent=2) + "\n")
    result_path.unlink(missing_ok=True)
    done = subprocess.run(
        [sys.executable, "-m", "compress.eval.worker", str(request_path), str(result_path)],
        env=_worker_env(cfg.threads),
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0 or not result_path.is_file():
        raise RuntimeError(
            f"bench worker for {variant.name!r} failed (exit {done.returncode}):\n{done.stderr[-STDERR_TAIL:]}"
        )
    return json.loads(result_path.read_text())


def _worker_env(threads: int) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    # The worker must import this same checkout of compress, wherever the caller's working directory is.
    package_root = str(Path(compress.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    return env


def _row(variant: Variant, measured: dict, reference: dict, cfg: BenchConfig) -> dict:
    return {
        "name": variant.name,
        "format": variant.format,
        "precision": variant.precision,
        "metric": measured["metric"],
        "latency_ms": measured["latency_ms"],
        "latency_real_ms": measured["latency_real_ms"],
        "batch_size": cfg.batch_size,
        "seq_len": cfg.seq_len,
        "threads": cfg.threads,
        "size_bytes": _size_bytes(variant),
        "peak_rss_mb": measured["peak_rss_mb"],
        "speedup_p50": reference["latency_ms"]["p50"] / measured["latency_ms"]["p50"],
        "metric_delta": measured["metric"]["value"] - reference["metric"]["value"],
    }


def _size_bytes(variant: Variant) -> int:
    return (Path(variant.artifact_dir) / (GRAPH if variant.format == "onnx" else WEIGHTS)).stat().st_size


def _summary_line(variant: Variant, measured: dict) -> str:
    metric = measured["metric"]
    return (
        f"bench {variant.name}: {metric['name']} {metric['value']:.4f}, "
        f"p50 {measured['latency_ms']['p50']:.2f} ms, peak RSS {measured['peak_rss_mb']:.0f} MB"
    )
