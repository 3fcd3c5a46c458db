"""Gains are real: each row judged against the row it was made from on the same runtime, from the benchmark's
own measurements (never a pass's claims), so a step that made the model bigger or slower is called so."""

from __future__ import annotations


def losses(rows: list[dict]) -> list[str]:
    """One line per row that is slower than its parent beyond the rounds' spread, or bigger on disk."""
    by_name = {row["name"]: row for row in rows if "not_run" not in row}
    found = []
    for row in by_name.values():
        parent = by_name.get(row.get("parent"))
        if parent is None:
            continue
        slower = row["latency_ms"]["p50"] / parent["latency_ms"]["p50"]
        noise = max(row["latency_ms"]["spread"], parent["latency_ms"]["spread"])
        if slower > 1 + noise:
            found.append(f"{row['name']} is {slower:.2f}x slower than {parent['name']}, the row it was made from "
                         f"on the same runtime (beyond the rounds' spread of {noise:.1%}): not a speed gain here")
        if row["size_bytes"] > parent["size_bytes"]:
            found.append(f"{row['name']} is bigger on disk than {parent['name']} "
                         f"({row['size_bytes'] / parent['size_bytes']:.2f}x): not a size gain")
    return found
