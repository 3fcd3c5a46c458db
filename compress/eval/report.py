"""Write a benchmark's results as `results.json` (the record) and `report.md` (for people)."""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from compress.eval.attribution import attribution_section
from compress.eval.gains import losses
from compress.eval.html import render_html
from compress.eval.metrics import BOOTSTRAP_RESAMPLES, metric_value
from compress.eval.roofline import roofline_line
from compress.rundir import atomic_write_json, atomic_write_text

RESULTS = "results.json"
REPORT = "report.md"
HTML_REPORT = "report.html"
MIB = 1 << 20  # peak RSS is reported in MiB too, so sizes and memory compare directly


def write_results(results: dict, out_dir: Path, notes: Iterable[str] = (), command: str | None = None) -> None:
    """results.json, report.md, and report.html (the same report with its trade-off plots)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_dir / RESULTS, results)
    markdown = render_report(results, list(notes), command)
    atomic_write_text(out_dir / REPORT, markdown)
    atomic_write_text(out_dir / HTML_REPORT, render_html(results, markdown))


def render_report(results: dict, notes: list[str], command: str | None) -> str:
    lines = ["# Benchmark report", ""]
    if command:
        lines += ["Reproduce with:", "", "```", command, "```", ""]
    lines += _machine_section(results["machine"], results["bench"]["threads"])
    generation = any("ttft_ms" in row for row in results["rows"])  # a causal LM's bench
    lines += ["## Results", "", _method(results["bench"], results["baseline"], generation), ""]
    lines += _table(results["rows"], results["baseline"], generation)
    lines += ["", *_gains_section(results["rows"])]
    attribution = attribution_section(results)
    if attribution:
        lines += ["", *attribution]
    if any(row.get("latency_by_shape") for row in results["rows"]):
        lines += ["", *_shapes_section(results["rows"])]
    if results.get("passes"):
        lines += ["", *_passes_section(results["passes"])]
    if any(row.get("roofline") for row in results["rows"]):
        lines += ["", *_roofline_section(results["rows"])]
    for stage, record in results.get("sparsity", {}).items():
        lines += ["", *_sparsity_section(stage, record)]
    if notes:
        lines += ["", "## Notes", "", *(f"- {note}" for note in notes)]
    lines += ["", "## Library versions", "", *(f"- {name} {v}" for name, v in results["versions"].items())]
    return "\n".join(lines) + "\n"


def _first(value: int | list[int]) -> int:
    return value[0] if isinstance(value, list) else value


def _shapes_section(rows: list[dict]) -> list[str]:
    """p50 and throughput of every row at every (batch, length) timed, in the same interleaved rounds."""
    measured = [row for row in rows if row.get("latency_by_shape")]
    shapes = [(shape["batch_size"], shape["seq_len"]) for shape in measured[0]["latency_by_shape"]]
    lines = ["## Latency by shape", "", ("p50 ms (sequences per second) of each row at each batch size × length of "
             "real tokens, timed in the same interleaved rounds; the first is the main shape of the table above."), "",
             "| Variant | " + " | ".join(f"{batch} × {length}" for batch, length in shapes) + " |",
             "|---|" + "---:|" * len(shapes)]
    for row in measured:
        lines.append(f"| {row['name']} | " + " | ".join(
            f"{shape['p50']:.2f} ({shape['throughput_per_s']:.0f}/s)" for shape in row["latency_by_shape"]) + " |")
    return lines


def _gains_section(rows: list[dict]) -> list[str]:
    """Each row against the row it was made from on the same runtime, flagged where it lost speed or size."""
    if not any(row.get("parent") for row in rows):
        return []
    found = losses(rows)
    lines = ["## Gains are real?", "",
             ("Each row against the row it was made from on the same runtime ('From'), from this benchmark's own "
             "measurements:"), ""]
    return lines + ([f"- **{line}**" for line in found] or
                    [("- every row with a 'From' is at least as fast (within the rounds' spread) and as small as "
                      "the row it was made from.")])


def effect_line(effect: dict) -> str:
    """A pass's recorded effect on one line: `key=value` for each entry worth showing."""
    return ", ".join(f"{key}={brief(value)}" for key, value in effect.items() if brief(value))


def brief(value: Any) -> str:
    """Scalars as they are (floats to 4 significant digits), lists of numbers (per-block sizes) whole, a list of
    evaluations as its last one, per-layer sparsity records as their range."""
    if isinstance(value, dict) and value and all(isinstance(v, dict) and "sparsity" in v for v in value.values()):
        shares = [layer["sparsity"] for layer in value.values()]
        return f"{len(shares)} layers, sparsity {min(shares):.1%} to {max(shares):.1%}"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list) and value and all(isinstance(item, int | float) for item in value):
        return "[" + ", ".join(brief(item) for item in value) + "]"
    if isinstance(value, list) and value and isinstance(value[-1], dict):
        return "{" + ", ".join(f"{k} {brief(v)}" for k, v in value[-1].items()) + "}"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} {brief(v)}" for k, v in value.items()) + "}" if value else ""
    return "" if isinstance(value, list) else str(value)


def _passes_section(passes: list[dict]) -> list[str]:
    lines = ["## What each pass did", "", ("As each pass recorded it when its stage was made (its own measurements; the "
             "table above is the benchmark's):"), ""]
    return lines + [f"- {entry['stage']} ({entry['pass']}, {entry['seconds']:.0f} s): {effect_line(entry['effect'])}"
                    for entry in passes]


def _roofline_section(rows: list[dict]) -> list[str]:
    bandwidth = next(row["roofline"]["bandwidth"] for row in rows if row.get("roofline"))
    lines = ["## Roofline", "",
             ("One fixed-length forward pass per row: FLOPs of every matrix product and the bytes it must move "
             "(each weight read once, embedding tables only the rows gathered, the products' inputs and outputs "
             "at the compute width), against the nominal peak of the unit its precision computes on (Intel's "
             "per-cycle figures × the threads × the clock /proc/cpuinfo reports; NVIDIA's datasheets for GPUs) "
             f"and memory bandwidth measured by a one-thread copy ({bandwidth / 1e9:.1f} GB/s on CPU). "
             "'x the floor' is the measured p50 over the time the slower of the two limits allows."), ""]
    lines += [f"- {row['name']}: {roofline_line(row['roofline'])}" for row in rows if row.get("roofline")]
    return lines


def _sparsity_section(stage: str, record: dict) -> list[str]:
    """Per block, each pruned layer's share of zeros (blocks as rows, the layers inside a block as columns);
    layers outside the blocks (embeddings, the task head) follow on their own."""
    blocks: dict[str, dict[str, float]] = {}
    others = {}
    for name, sparsity in record["layers"].items():
        found = re.search(r"\.(\d+)\.", name)
        if found is None:
            others[name] = sparsity
        else:
            blocks.setdefault(found.group(1), {})[name[found.end():]] = sparsity
    lines = [f"## Sparsity of {stage}", "",
             f"{record['achieved']:.2%} of the pruned weights are zero (target {record['target']:.2%})."]
    columns = list(dict.fromkeys(column for layers in blocks.values() for column in layers))
    if blocks:
        lines += ["", "| Block | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
        lines += [f"| {block} | " + " | ".join(f"{layers[c]:.1%}" if c in layers else "-" for c in columns) + " |"
                  for block, layers in blocks.items()]
    if others:
        lines += ["", *(f"- {name}: {sparsity:.1%}" for name, sparsity in others.items())]
    return lines


def _machine_section(machine: dict, threads: int) -> list[str]:
    return [
        "## Machine",
        "",
        f"- CPU: {machine['cpu']} ({machine['arch']}), {machine['cores']} cores, benchmarked with {threads} threads",
        f"- ISA: {', '.join(machine['isa']) or 'none of the tracked flags'}",
        *([f"- GPU: {', '.join(machine['gpus'])}"] if machine.get("gpus") else []),
        f"- Python {machine['python']} on {machine['os']}",
        "",
    ]


def _method(bench: dict, baseline: str, generation: bool) -> str:
    batch, seq_len = _first(bench["batch_size"]), _first(bench["seq_len"])
    method = (
        f"Latency in {bench['rounds']} interleaved rounds (each round times every variant in turn), "
        f"{bench['runs']} timed runs per variant and input over all rounds, after {bench['warmup']} warm-up runs "
        f"in each round. Fixed length: batch {batch} × {seq_len} real tokens (the eval rows' tokens one after "
        f"another, no padding); padded: batch {batch} of eval rows right-padded to {seq_len}; real lengths: "
        f"batch 1, up to {bench['real_length_samples']} eval rows each at its own length. p50 over all rounds, "
        "± the spread of the rounds' p50s ((max - min) / p50); ×baseline and ×parent are ratios of fixed-length "
        f"p50s taken in this one interleaved run. Metric change vs the baseline `{baseline}` with a "
        f"paired-bootstrap 95 % interval over the eval rows ({BOOTSTRAP_RESAMPLES} resamples). Size: the files "
        "each variant deploys; zipped: each of them deflated (zlib level 1)."
    )
    if generation:
        method += (
            f" Generation: greedy with the KV cache, batch {batch}, a prompt of {seq_len} real tokens, then "
            f"{bench['new_tokens']} new tokens; first token ms is the prompt's prefill up to the first new token, "
            f"ms/token the mean of the {bench['new_tokens'] - 1} steps after it; p50s over "
            f"{bench['generation_runs']} timed generations per variant in the same interleaved rounds, after one "
            "warm-up generation in each round."
        )
    return method


def _table(rows: list[dict], baseline: str, generation: bool) -> list[str]:
    metric_name = rows[0]["metric"]["name"] if rows else "metric"
    header = ["Variant", "From", "Runtime", "Precision", f"{metric_name} (Δ vs baseline, 95 % CI)",
              "p50 ms (± spread)", "×baseline", "×parent", "padded p50 ms", "real-length p50 ms",
              *(["first token ms", "ms/token"] if generation else []), "Size MiB", "Zipped MiB", "Peak RSS MiB"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * 4 + ["---:"] * (len(header) - 4)) + "|"]
    for row in rows:
        if "not_run" in row:
            lines.append(_not_run_line(row, len(header)))
            continue
        real = row["latency_real_ms"]
        cells = [
            row["name"],
            row["parent"] or "-",
            _runtime_cell(row["runtime"]),
            row["precision"],
            _metric_cell(row) if row["name"] != baseline else metric_value(row["metric"]) + " (baseline)",
            f"{row['latency_ms']['p50']:.2f} ±{row['latency_ms']['spread']:.1%}",
            f"{row['speedup_vs_baseline']:.2f}x",
            "-" if row["speedup_vs_parent"] is None else f"{row['speedup_vs_parent']:.2f}x",
            f"{row['latency_padded_ms']['p50']:.2f}",
            "-" if real is None else f"{real['p50']:.2f}",
            *(_generation_cells(row) if generation else []),
            f"{row['size_bytes'] / MIB:.1f}",
            f"{row['size_zipped_bytes'] / MIB:.1f}",
            f"{row['peak_rss_mb']:.0f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _not_run_line(row: dict, columns: int) -> str:
    cells = [row["name"], "-", _runtime_cell(row["runtime"]), row["precision"], f"not run: {row['not_run']}",
             *["-"] * (columns - 8), f"{row['size_bytes'] / MIB:.1f}", f"{row['size_zipped_bytes'] / MIB:.1f}", "-"]
    return "| " + " | ".join(cells) + " |"


def _generation_cells(row: dict) -> list[str]:
    """Time to first token and per token after it, or why the variant cannot generate."""
    if row["ttft_ms"] is None:
        return [row["cannot_generate"], "-"]
    return [f"{row['ttft_ms']['p50']:.2f}", f"{row['per_token_ms']['p50']:.2f}"]


def _runtime_cell(runtime: dict) -> str:
    """Engine, device, the precision it was told to compute in when that is not the artifact's own, threads."""
    name = runtime["name"]
    if "version" not in runtime:  # a row that never ran: what it was meant to run on
        return f"{name} {runtime['device'].upper() if name == 'openvino' else runtime['device']}"
    if name == "onnxruntime":
        provider = runtime["execution_provider"].removesuffix("ExecutionProvider")
        return f"onnxruntime {provider}, {_threads(runtime['intra_op_threads'])}"
    if name == "openvino":
        return f"openvino {runtime['device']}, {runtime['precision']}, {_threads(runtime['threads'])}"
    device = runtime.get("device_name") or runtime.get("device", "cpu")
    autocast = f", {runtime['autocast']} autocast" if runtime.get("autocast") else ""
    return f"torch {device}{autocast}, {_threads(runtime['threads'])}"


def _threads(count: int) -> str:
    return f"{count} thread" if count == 1 else f"{count} threads"


def _metric_cell(row: dict) -> str:
    """Accuracy: the change in points; perplexity: the relative change, which compares across models."""
    if row["metric"]["name"] == "accuracy":
        low, high = row["metric_delta_ci95"]
        change = f"{row['metric_delta'] * 100:+.2f} pt, {low * 100:+.2f} to {high * 100:+.2f}"
    else:
        low, high = row["metric_change_rel_ci95"]
        change = f"{row['metric_change_rel']:+.2%}, {low:+.2%} to {high:+.2%}"
    return f"{metric_value(row['metric'])} ({change})"
