"""`report.html`: the markdown report as one self-contained page, with the trade-off plots inlined as SVG, so it
opens from disk with no network. The page is rendered from `report.md`'s own text: one source for both."""

from __future__ import annotations

import html
import io
import itertools
import re

from compress.eval.attribution import attribution_rows, chain

MIB = 1 << 20
ENGINE_COLOURS = {"torch": "#ee4c2c", "onnxruntime": "#1f6fb4", "openvino": "#6a3d9a"}
STYLE = """
body{font-family:system-ui,sans-serif;margin:2rem auto;max-width:1200px;padding:0 1rem;color:#222}
table{border-collapse:collapse;font-size:.85rem;margin:1rem 0}td,th{border:1px solid #ccc;padding:.25rem .5rem}
th{background:#f3f3f3}td:nth-child(n+5){text-align:right}tr.frontier td:first-child{font-weight:bold}
.plots{display:flex;flex-wrap:wrap;gap:1rem}.plots svg{flex:1 1 45%;min-width:420px;width:45%;height:auto}
code,pre{background:#f6f6f6}pre{padding:.5rem;overflow-x:auto}
"""


def pareto_front(points: dict[str, tuple[float, float]], higher_is_better: bool) -> list[str]:
    """Names of the points no other point beats on both cost (lower is better) and metric, cheapest first."""
    def better(a: float, b: float) -> bool:
        return a > b if higher_is_better else a < b

    sign = -1 if higher_is_better else 1  # among equal costs, the best metric first
    front, best = [], None
    for name, (cost, metric) in sorted(points.items(), key=lambda item: (item[1][0], sign * item[1][1])):
        if best is None or better(metric, best):
            front.append(name)
            best = metric
    return front


def render_html(results: dict, markdown: str) -> str:
    rows = [row for row in results["rows"] if "not_run" not in row]
    plots = _plots(rows, results["baseline"], chains(results)) if rows else ""
    front = _front(rows, "latency") if rows else []
    body = _markdown_to_html(markdown, plots, set(front))
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>compress benchmark report</title>"
            f"<style>{STYLE}</style></head><body>{body}</body></html>\n")


def _front(rows: list[dict], axis: str) -> list[str]:
    higher = rows[0]["metric"]["name"] == "accuracy"
    return pareto_front({row["name"]: (_cost(row, axis), row["metric"]["value"]) for row in rows}, higher)


def _cost(row: dict, axis: str) -> float:
    return row["latency_ms"]["p50"] if axis == "latency" else row["size_bytes"] / MIB


def chains(results: dict) -> dict[str, list[dict]]:
    """Per runtime, the rows of the stacked chain in order (the report's "Where the gain came from" tables)."""
    if len(chain(results.get("passes", []))) < 2:
        return {}
    targets = dict.fromkeys(row["target"] for row in results["rows"] if "not_run" not in row)
    found = {target: [entry["row"] for entry in attribution_rows(results, target)] for target in targets}
    return {target: rows for target, rows in found.items() if len(rows) >= 2}


def _plots(rows: list[dict], baseline: str, lines: dict[str, list[dict]]) -> str:
    return ("<div class='plots'>" + _plot(rows, baseline, "latency", "p50 latency, ms (fixed length)", lines) +
            _plot(rows, baseline, "size", "size on disk, MiB", lines) + "</div>")


def _plot(rows: list[dict], baseline: str, axis: str, label: str, lines: dict[str, list[dict]]) -> str:
    import matplotlib

    matplotlib.use("Agg")  # no display: the figure is written as SVG text
    import matplotlib.pyplot as plt

    metric = rows[0]["metric"]["name"]
    front = _front(rows, axis)
    figure, ax = plt.subplots(figsize=(6.4, 4.4))
    for row in rows:
        engine = row["runtime"]["name"]
        ax.scatter(_cost(row, axis), _metric(row), s=36, color=ENGINE_COLOURS.get(engine, "#555"),
                   edgecolor="black" if row["name"] in front else "none", zorder=3)
        if row["name"] in front or row["name"] == baseline:  # the others are in the table: labels would pile up
            ax.annotate(row["name"], (_cost(row, axis), _metric(row)), fontsize=7, xytext=(4, 3),
                        textcoords="offset points")
    for index, (target, path) in enumerate(lines.items()):  # each technique's step, as arrows
        colour = ENGINE_COLOURS.get(path[0]["runtime"]["name"], "#555")
        style = ("-", ":", "-.")[index % 3]
        for before, after in itertools.pairwise(path):
            ax.annotate("", xy=(_cost(after, axis), _metric(after)), xytext=(_cost(before, axis), _metric(before)),
                        arrowprops={"arrowstyle": "->", "color": colour, "linestyle": style, "alpha": 0.7}, zorder=1)
        ax.plot([], [], color=colour, linestyle=style, label=f"the chain on {target}")
    ordered = sorted((row for row in rows if row["name"] in front), key=lambda row: _cost(row, axis))
    ax.step([_cost(r, axis) for r in ordered], [_metric(r) for r in ordered], where="post", color="black",
            linewidth=1, linestyle="--", label="Pareto frontier", zorder=2)
    for engine, colour in ENGINE_COLOURS.items():
        if any(row["runtime"]["name"] == engine for row in rows):
            ax.scatter([], [], color=colour, label=engine)
    ax.set_xlabel(label)
    ax.set_ylabel("accuracy, %" if metric == "accuracy" else metric)
    ax.set_title(f"{metric} vs {axis} (labelled: the frontier and the baseline)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    figure.tight_layout()
    svg = io.StringIO()
    figure.savefig(svg, format="svg")
    plt.close(figure)
    return svg.getvalue()[svg.getvalue().index("<svg"):]


def _metric(row: dict) -> float:
    value = row["metric"]["value"]
    return value * 100 if row["metric"]["name"] == "accuracy" else value


def _markdown_to_html(markdown: str, plots: str, front: set[str]) -> str:
    """The subset report.md uses: headings, pipe tables, bullet lists, fenced code, paragraphs. The plots go
    right after the Results heading; frontier rows of the table are marked."""
    out, table, listing, code = [], [], False, None
    for line in [*markdown.splitlines(), ""]:
        if code is not None:
            if line.startswith("```"):
                out.append(f"<pre><code>{html.escape(chr(10).join(code))}</code></pre>")
                code = None
            else:
                code.append(line)
            continue
        if table and not line.startswith("|"):
            out.append(_table(table, front))
            table = []
        if listing and not line.startswith("- "):
            out.append("</ul>")
            listing = False
        if line.startswith("```"):
            code = []
        elif line.startswith("|"):
            table.append(line)
        elif line.startswith("- "):
            out.append(("" if listing else "<ul>") + f"<li>{_inline(line[2:])}</li>")
            listing = True
        elif heading := re.match(r"(#+) (.*)", line):
            level = len(heading.group(1))
            out.append(f"<h{level}>{_inline(heading.group(2))}</h{level}>")
            if heading.group(2) == "Results":
                out.append(plots)
        elif line.strip():
            out.append(f"<p>{_inline(line)}</p>")
    return "\n".join(out)


def _table(lines: list[str], front: set[str]) -> str:
    cells = [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in lines]
    header, body = cells[0], [row for row in cells[1:] if not set("".join(row)) <= set("-: ")]
    rows = [f"<tr{' class=frontier' if row[0] in front else ''}>" + "".join(f"<td>{_inline(c)}</td>" for c in row)
            + "</tr>" for row in body]
    return ("<table><tr>" + "".join(f"<th>{_inline(c)}</th>" for c in header) + "</tr>" + "".join(rows)
            + "</table>")


def _inline(text: str) -> str:
    text = re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(text))
    return re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", text)
