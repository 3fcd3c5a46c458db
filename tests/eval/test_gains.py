from __future__ import annotations

from compress.eval.gains import losses


def row(name: str, parent: str | None, p50: float, size: int, spread: float = 0.02) -> dict:
    return {"name": name, "parent": parent, "latency_ms": {"p50": p50, "spread": spread}, "size_bytes": size}


def test_a_row_slower_beyond_noise_or_bigger_than_its_parent_is_called_so():
    rows = [row("export", None, 10.0, 100), row("fused", "export", 11.0, 100), row("int8", "fused", 5.0, 120),
            row("noisy", "export", 10.4, 90, spread=0.05), row("gone", "export", 1.0, 1) | {"not_run": "why"},
            row("orphan", "gone", 50.0, 500)]
    assert losses(rows) == [
        ("fused is 1.10x slower than export, the row it was made from on the same runtime (beyond the rounds' "
        "spread of 2.0%): not a speed gain here"),
        "int8 is bigger on disk than fused (1.20x): not a size gain"]
