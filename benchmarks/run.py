"""Benchmarks behind benchmarks/RESULTS.md: each section is rewritten with what this machine measured.

    python benchmarks/run.py export       # ONNX fp32 (ours) vs optimum export + ORTOptimizer O2 vs PyTorch fp32
    python benchmarks/run.py quickstart   # wall time and rows of `make demo`'s pipeline
    python benchmarks/run.py llm          # the decoder quickstart
    python benchmarks/run.py llm-wikitext # the same on WikiText-2 test (needs ../shared/data)
    python benchmarks/run.py all
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS_MD = ROOT / "benchmarks" / "RESULTS.md"
DEV = ROOT / "pipelines" / "data" / "sst2-dev.tsv"  # the full SST-2 dev split, shipped with the quickstart


def export_vs_optimum(workdir: Path) -> str:
    """Same MiniLM-L6 weights, three deployments, timed one after another in one run."""
    from optimum.exporters.onnx import onnx_export_from_model
    from optimum.onnxruntime import ORTOptimizer
    from optimum.onnxruntime.configuration import OptimizationConfig

    from compress import models
    from compress.artifact import Artifact
    from compress.data import build_eval_set, load_task_data
    from compress.eval.bench import Variant, run_bench
    from compress.kinds import Kind
    from compress.recipe import BenchConfig, DataConfig

    labels = ["negative", "positive"]
    loaded = models.load("minilm-l6", "sequence-classification", labels)
    torch_dir = loaded.artifact().save(workdir / "torch-fp32")
    subprocess.run([sys.executable, "-m", "compress.cli", "-q", "export", str(torch_dir), "--fuse", "--out",
                    str(workdir / "compress-onnx")], check=True)
    onnx_export_from_model(loaded.model, workdir / "optimum-raw", task="text-classification", do_validation=False)
    ORTOptimizer.from_pretrained(workdir / "optimum-raw").optimize(
        OptimizationConfig(optimization_level=2), save_dir=workdir / "optimum-o2-raw")
    Artifact("sequence-classification", loaded.model.config, loaded.tokenizer, kind=Kind("onnx", runtime="onnxruntime"),
             onnx_path=workdir / "optimum-o2-raw" / "model_optimized.onnx").save(workdir / "optimum-o2")

    cfg = DataConfig.model_validate({"eval": {"path": str(DEV), "text": "sentence"}, "labels": labels})
    evals = build_eval_set(load_task_data(cfg, "sequence-classification"), loaded.tokenizer, cfg)
    variants = [Variant("pytorch fp32", torch_dir, "torch", "fp32"),
                Variant("compress export --fuse (ORT fp32)", workdir / "compress-onnx", "onnx", "fp32"),
                Variant("optimum export + ORTOptimizer O2", workdir / "optimum-o2", "onnx", "fp32",
                        parent="compress export --fuse (ORT fp32)")]
    bench = BenchConfig(batch_size=1, seq_len=128, threads=2, warmup=20, runs=300, rounds=5, real_length_samples=100)
    results = run_bench(variants, evals, bench, "pytorch fp32")
    rows = {r["name"]: r for r in results["rows"]}
    ours, theirs = rows["compress export --fuse (ORT fp32)"], rows["optimum export + ORTOptimizer O2"]
    return _section(
        "ONNX fp32 export vs optimum O2 vs PyTorch (MiniLM-L6, batch 1, length 128, 2 threads)",
        "python benchmarks/run.py export", results,
        [(f"compress export --fuse is {ours['speedup_vs_baseline']:.2f}x PyTorch fp32 at p50; optimum O2 is "
         f"{theirs['speedup_vs_baseline']:.2f}x; compress vs optimum O2: "
         f"{theirs['latency_ms']['p50'] / ours['latency_ms']['p50']:.2f}x."),
         ("Weights: all-MiniLM-L6-v2 with a fresh (untrained) 2-label head: latency does not depend on it, so "
         "the accuracy column is meaningless here.")])


def pipeline(recipe: str, name: str, title: str, notes: list[str], overrides: tuple[str, ...] = ()) -> str:
    """A fresh run into runs/bench-NAME (kept, so its stages and report can be inspected)."""
    out = ROOT / "runs" / f"bench-{name}"
    shutil.rmtree(out, ignore_errors=True)
    sets = [arg for override in overrides for arg in ("--set", override)]
    command = ["compress", "run", recipe, "--out", str(out), *sets]
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "compress.cli", *command[1:]], check=True, cwd=ROOT)
    wall = time.perf_counter() - started
    results = json.loads((out / "results.json").read_text())
    manifest = json.loads((out / "manifest.json").read_text())
    stages = ", ".join(f"{s['name']} {s['seconds']:.0f} s" for s in manifest["stages"])
    shown = " ".join(["compress run", recipe, "--out", f"runs/bench-{name}", *sets])
    return _section(title, f"python benchmarks/run.py {name}   # = {shown}",
                    results, [(f"Wall time, fresh run after install: {wall / 60:.1f} min ({stages}, the rest is "
                              "verification, benchmark and start-up)."), *notes])


def _shared(relative: str) -> str:
    """`relative` under ../shared/data, as a path relative to pipelines/ (where the recipes are)."""
    if not (ROOT.parent / "shared" / "data" / relative).is_file():
        sys.exit(f"../shared/data/{relative} not found: this benchmark reads ../shared/data beside the checkout")
    return f"../../shared/data/{relative}"


def _section(title: str, command: str, results: dict, notes: list[str]) -> str:
    from compress.eval.report import render_report

    body = render_report(results, notes, command).replace("# Benchmark report\n", "")
    body = re.sub(r"^## ", "#### ", body, flags=re.MULTILINE)
    return f"## {title}\n\nMeasured {time.strftime('%Y-%m-%d')}.\n{body}"


def write_section(key: str, text: str) -> None:
    begin, end = f"<!-- bench:{key} -->", f"<!-- /bench:{key} -->"
    current = RESULTS_MD.read_text() if RESULTS_MD.exists() else "# Benchmark results\n\nWritten by `benchmarks/run.py`.\n"
    block = f"{begin}\n{text}\n{end}"
    if begin in current:
        current = re.sub(re.escape(begin) + ".*?" + re.escape(end), lambda _: block, current, flags=re.DOTALL)
    else:
        current = current.rstrip() + "\n\n" + block + "\n"
    RESULTS_MD.write_text(current)


def main(which: str) -> None:
    from compress.pipeline import GGUF_NOTE

    jobs = {
        "export": lambda w: export_vs_optimum(w),
        "quickstart": lambda w: pipeline("pipelines/quickstart.yaml", "quickstart", "Encoder quickstart (make demo)",
                                         []),
        "llm": lambda w: pipeline("pipelines/llm-quickstart.yaml", "llm", "Decoder quickstart (SmolLM2-135M)",
                                  [GGUF_NOTE]),
        "llm-wikitext": lambda w: pipeline(
            "pipelines/llm-quickstart.yaml", "llm-wikitext", "Decoder quickstart on WikiText-2 test (SmolLM2-135M)",
            [GGUF_NOTE], (f"data.eval.path={_shared('wikitext2/wiki.test.raw')}",)),  # relative to the recipe
    }
    for key in jobs if which == "all" else [which]:
        with tempfile.TemporaryDirectory(prefix=f"bench-{key}-") as workdir:
            text = jobs[key](Path(workdir))
        write_section(key, text)
        print(text)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "all")
