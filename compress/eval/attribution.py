"""Where the gain came from: the chain of stages that made the final artifact, one row per technique, each
measured on the same runtime, so a reader sees what each pass bought (speed, size) and what it cost (metric).

A training stage is shown by its deployed form on that runtime: the stage itself where the runtime runs torch,
else the export made from it (the recipe's `export` step in the chain, or a branch `export` with `from`).
"""

from __future__ import annotations

from compress.eval.metrics import metric_value


def chain(passes: list[dict]) -> list[dict]:
    """The longest line of stages, each made from the one before (following each stage's input): the stacked
    artifact's lineage, whatever branches the recipe adds beside it."""
    by_stage = {record["stage"]: record for record in passes if "input" in record}
    longest: list[dict] = []
    for record in by_stage.values():
        lineage, stage = [], record["stage"]
        while stage in by_stage:
            lineage.append(by_stage[stage])
            stage = by_stage[stage]["input"]
        if len(lineage) >= len(longest):
            longest = lineage
    return longest[::-1]


def attribution_rows(results: dict, target: str) -> list[dict]:
    """One entry per chain stage that has a row on `target` (itself, or the export made from it): {stage,
    technique, row}."""
    passes = results.get("passes", [])
    rows = {(row["name"].split("@")[0], row["target"]): row for row in results["rows"] if "not_run" not in row}
    exported_as = {record["input"]: record["stage"] for record in passes
                   if record["pass"] == "export" and record.get("input")}
    if any(record["stage"] == "baseline-export" for record in passes):
        exported_as[results["baseline"]] = "baseline-export"
    found: list[dict] = []
    lineage = chain(passes)
    baseline = results["baseline"]
    if lineage and lineage[0]["input"] == baseline:  # the chain starts from the baseline itself (no fine-tune)
        shown = baseline if (baseline, target) in rows else exported_as.get(baseline)
        if (shown, target) in rows:
            found.append({"stage": baseline, "technique": "baseline" + (f" (as {shown})" if shown != baseline else ""),
                          "row": rows[(shown, target)]})
    for index, record in enumerate(lineage):
        stage = record["stage"]
        if (stage, target) in rows:
            shown_before = bool(found) and found[-1]["stage"] == lineage[index - 1]["stage"]
            technique = record["pass"] if record["pass"] != "export" or shown_before or not index \
                else f"{lineage[index - 1]['pass']}, exported"
            found.append({"stage": stage, "technique": technique, "row": rows[(stage, target)]})
        elif (exported_as.get(stage), target) in rows and not _next_is_export(lineage, index):
            found.append({"stage": stage, "technique": f"{record['pass']} (as {exported_as[stage]})",
                          "row": rows[(exported_as[stage], target)]})
    return found


def _next_is_export(lineage: list[dict], index: int) -> bool:
    return index + 1 < len(lineage) and lineage[index + 1]["pass"] == "export"


def attribution_section(results: dict) -> list[str]:
    """`## Where the gain came from`: a table per runtime the chain was measured on; empty for no chain."""
    lineage = chain(results.get("passes", []))
    if len(lineage) < 2:
        return []
    reference = next((row for row in results["rows"] if row["name"] == results["baseline"]), None)
    if reference is None or "not_run" in reference:
        return []
    targets = list(dict.fromkeys(row["target"] for row in results["rows"] if "not_run" not in row))
    tables = [(target, attribution_rows(results, target)) for target in targets]
    tables = [(target, entries) for target, entries in tables if len(entries) >= 2]
    if not tables:
        return []
    metric = reference["metric"]["name"]
    lines = ["## Where the gain came from", "",
             (f"The chain of stages that made `{lineage[-1]['stage']}`, one row per technique, "
              f"each on one runtime; ratios against `{reference['name']}` ({reference['target']}, "
              f"{reference['latency_ms']['p50']:.2f} ms) and against the row above, from this benchmark's "
              "fixed-length p50s."), ""]
    for target, entries in tables:
        lines += [f"On **{target}**:", "",
                  (f"| Stage | Technique | p50 ms | ×baseline | ×previous | {metric} | Δ vs baseline | "
                   "Δ vs previous | Size MiB | ×smaller |"),
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        previous = None
        for entry in entries:
            lines.append(_line(entry, reference, previous))
            previous = entry["row"]
        lines.append("")
    return lines[:-1]


def _line(entry: dict, reference: dict, previous: dict | None) -> str:
    row = entry["row"]
    p50 = row["latency_ms"]["p50"]
    step = "-" if previous is None else f"{previous['latency_ms']['p50'] / p50:.2f}x"
    return (f"| {entry['stage']} | {entry['technique']} | {p50:.2f} | {reference['latency_ms']['p50'] / p50:.2f}x | "
            f"{step} | {metric_value(row['metric'])} | {_change(row, reference)} | "
            f"{'-' if previous is None else _change(row, previous)} | {row['size_bytes'] / 2**20:.1f} | "
            f"{reference['size_bytes'] / row['size_bytes']:.1f}x |")


def _change(row: dict, other: dict) -> str:
    """Accuracy in points; perplexity relative, as the results table gives them."""
    now, then = row["metric"]["value"], other["metric"]["value"]
    if row["metric"]["name"] == "accuracy":
        return f"{(now - then) * 100:+.2f} pt"
    return f"{now / then - 1:+.2%}"
