"""Write a benchmark's results as `results.json` (the record) and `report.md` (for people)."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

RESULTS = "results.json"
REPORT = "report.md"
MIB = 1 << 20  # peak RSS is reported in MiB too, so sizes and memory compare directly


def write_results(results: dict, out_dir: Path, notes: Iterable[str] = (), command: str | None = None) -> None:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_atomic(out_dir / RESULTS, json.dumps(results, indent=2, default=str) + "\n")
    _write_atomic(out_dir / REPORT, render_report(results, list(notes), command))


def render_report(results: dict, notes: list[str], command: str | None) -> str:
    bench = results["bench"]
    lines = ["# Benchmark report", ""]
    if command:
        lines += ["Reproduce with:", "", "```", command, "```", ""]
    lines += _machine_section(results["machine"], bench["threads"])
    lines += [
        "## Results",
        "",
        (
            f"Latency at a fixed length: batch {bench['batch_size']} x {bench['seq_len']} tokens, "
            f"p50 / p90 over {bench['runs']} runs after {bench['warmup']} warm-up runs. "
            f"Real lengths: batch 1, up to {bench['real_length_samples']} eval rows each at its own length. "
            f"Baseline: `{results['baseline']}`. Sizes and peak RSS in MiB."
        ),
        "",
    ]
    lines += _table(results["rows"])
    if notes:
        lines += ["", "## Notes", "", *(f"- {note}" for note in notes)]
    lines += ["", "## Library versions", "", *(f"- {name} {v}" for name, v in results["versions"].items())]
    return "\n".join(lines) + "\n"


def _machine_section(machine: dict, threads: int) -> list[str]:
    return [
        "## Machine",
        "",
        f"- CPU: {machine['cpu']} ({machine['arch']}), {machine['cores']} cores, benchmarked with {threads} threads",
        f"- ISA: {', '.join(machine['isa']) or 'none of the tracked flags'}",
        f"- Python {machine['python']} on {machine['os']}",
        "",
    ]


def _table(rows: list[dict]) -> list[str]:
    metric_name = rows[0]["metric"]["name"] if rows else "metric"
    header = ["Variant", "Format", "Precision", f"{metric_name} (vs baseline)", "p50 ms", "p90 ms", "Speed-up",
              "p50 ms, real lengths", "Size MB", "Peak RSS MB"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * 3 + ["---:"] * 7) + "|"]
    for row in rows:
        real = row["latency_real_ms"]
        cells = [
            row["name"],
            row["format"],
            row["precision"],
            _metric_cell(row["metric"], row["metric_delta"]),
            f"{row['latency_ms']['p50']:.2f}",
            f"{row['latency_ms']['p90']:.2f}",
            f"{row['speedup_p50']:.2f}x",
            "-" if real is None else f"{real['p50']:.2f}",
            f"{row['size_bytes'] / MIB:.1f}",
            f"{row['peak_rss_mb']:.0f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _metric_cell(metric: dict, delta: float) -> str:
    if metric["name"] == "accuracy":
        return f"{metric['value']:.2%} ({delta * 100:+.2f} pt)"
    baseline = metric["value"] - delta  # perplexity: the relative change is what compares across models
    return f"{metric['value']:.2f} ({delta / baseline:+.2%})"


def _write_atomic(path: Path, text: str) -> None:
    handle, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w") as temp:
            temp.write(text)
        os.replace(temp_name, path)
    except BaseException:
        os.unlink(temp_name)
        raise
