"""A regression gate between two benchmark results: does the candidate lose more than allowed, beyond noise?

Accuracy is judged on the paired-bootstrap interval of the change over the same eval rows, perplexity on
the interval of its relative rise, latency on the p50 ratio discounted by the larger spread of the two
runs' rounds. A row fails only when even the favourable end of that range is past the limit, so noise
alone never fails it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from compress.errors import GateRefused
from compress.eval.metrics import compare_paired

MACHINE_KEYS = ("cpu", "arch", "isa", "cores", "gpus")


@dataclass(frozen=True)
class Check:
    row: str
    measure: str  # "accuracy", "perplexity" or "latency"
    baseline: float
    candidate: float
    change: str  # the change and its favourable bound, as a reader wants it
    failed: bool


def read_results(path: Path) -> dict:
    """A results.json, or a one-line error naming the file."""
    path = Path(path)
    try:
        results = json.loads(path.read_text())
    except OSError as err:
        raise GateRefused(f"{path}: cannot read ({err.strerror or err})") from None
    except ValueError as err:
        raise GateRefused(f"{path}: not JSON ({err})") from None
    if not isinstance(results, dict) or not isinstance(results.get("rows"), list):
        raise GateRefused(f"{path}: not a compress results.json (no rows)")
    return results


def gate(baseline: dict, candidate: dict, max_drop: float, max_slowdown: float, rows: list[str] = (),
         other_data: bool = False, other_machine: bool = False) -> list[Check]:
    """Every check of the rows both results hold (or `rows`); `max_drop` is in accuracy points, or percent
    of perplexity rise, `max_slowdown` a ratio of p50s. Refuses results of different eval data or machines
    unless told they may differ."""
    fingerprints = [_eval_fingerprint(results) for results in (baseline, candidate)]
    data_differs = None in fingerprints or fingerprints[0] != fingerprints[1]
    if data_differs and not other_data:
        why = ("one was written by an older compress, without an eval fingerprint" if None in fingerprints
               else "their eval fingerprints differ")
        raise GateRefused(f"the two results may come from different eval data ({why}); pass --allow-other-data to "
                          "compare their metrics by value, without a paired interval")
    machines = [{key: results["machine"].get(key) for key in MACHINE_KEYS} | {"threads": results["bench"]["threads"]}
                for results in (baseline, candidate)]
    if machines[0] != machines[1] and not other_machine:
        raise GateRefused(f"the two results come from different machines or thread counts ({_machine(machines[0])} "
                          f"vs {_machine(machines[1])}); latency does not compare across them. Pass "
                          "--allow-other-machine to compare anyway")
    names = _rows_to_compare(baseline, candidate, rows)
    by_name = [{row["name"]: row for row in results["rows"]} for results in (baseline, candidate)]
    checks = []
    for name in names:
        before, after = by_name[0][name], by_name[1][name]
        checks.append(_metric_check(name, before, after, max_drop, paired=not data_differs))
        checks.append(_latency_check(name, before, after, max_slowdown))
    return checks


def render(checks: list[Check], max_drop: float, max_slowdown: float) -> str:
    lines = [f"{'FAIL' if check.failed else 'ok  '} {check.row} {check.measure}: {_value(check.measure, check.baseline)}"
             f" -> {_value(check.measure, check.candidate)}, {check.change}" for check in checks]
    failed = sum(check.failed for check in checks)
    verdict = (f"gate failed: {failed} of {len(checks)} checks lost more than allowed" if failed else
               f"gate passed: {len(checks)} checks within the limits")
    return "\n".join([*lines, f"{verdict} (max drop {max_drop:g}, max slowdown {max_slowdown:g}x)"])


def _rows_to_compare(baseline: dict, candidate: dict, wanted: list[str]) -> list[str]:
    ran = [{row["name"] for row in results["rows"] if "not_run" not in row} for results in (baseline, candidate)]
    if wanted:
        for name in wanted:
            for results, names, side in ((baseline, ran[0], "baseline"), (candidate, ran[1], "candidate")):
                if name not in names:
                    raise GateRefused(f"--row {name}: not a measured row of the {side} "
                                      f"(it has: {', '.join(sorted(names))})")
        return list(wanted)
    common = [row["name"] for row in baseline["rows"] if row["name"] in ran[0] & ran[1]]
    if not common:
        raise GateRefused("the two results share no measured row: name one with --row")
    return common


def _metric_check(name: str, before: dict, after: dict, max_drop: float, paired: bool) -> Check:
    metric = before["metric"]["name"]
    if after["metric"]["name"] != metric:
        raise GateRefused(f"{name}: the baseline measured {metric}, the candidate {after['metric']['name']}")
    old, new = before["metric"]["value"], after["metric"]["value"]
    # Accuracy: points lost. Perplexity: percent risen.
    loss, unit = ((old - new) * 100, "pt") if metric == "accuracy" else ((new / old - 1) * 100, "%")
    if paired and "metric_rows" in before and "metric_rows" in after:
        rows = [{key: np.asarray(values) for key, values in row["metric_rows"].items()} for row in (before, after)]
        change = compare_paired(metric, *rows)
        low, high = change.delta_ci95 if metric == "accuracy" else change.rel_ci95
        favourable = -high * 100 if metric == "accuracy" else low * 100  # the smallest loss the interval allows
        basis = "95 % interval"
    else:
        favourable, basis = loss, "by value: no paired rows"
    change = f"loss {loss:+.2f} {unit} (at least {favourable:+.2f} {unit}, {basis}; allowed {max_drop:g})"
    return Check(name, metric, old, new, change, favourable > max_drop)


def _latency_check(name: str, before: dict, after: dict, max_slowdown: float) -> Check:
    old, new = before["latency_ms"], after["latency_ms"]
    slowdown = new["p50"] / old["p50"]
    noise = max(old["spread"], new["spread"])
    favourable = slowdown / (1 + noise)  # the slowdown the rounds' spread cannot explain
    change = (f"x{slowdown:.3f} (x{favourable:.3f} after the rounds' spread of {noise:.1%}; allowed "
              f"x{max_slowdown:g})")
    return Check(name, "latency", old["p50"], new["p50"], change, favourable > max_slowdown)


def _eval_fingerprint(results: dict) -> str | None:
    return results.get("data", {}).get("fingerprint")


def _machine(machine: dict) -> str:
    return f"{machine['cpu']}, {machine['cores']} cores, {machine['threads']} threads, {'/'.join(machine['isa'])}"


def _value(measure: str, value: float) -> str:
    return {"accuracy": f"{value:.2%}", "perplexity": f"{value:.2f}"}.get(measure, f"{value:.2f} ms")
