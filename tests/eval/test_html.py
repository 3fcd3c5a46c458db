from __future__ import annotations

import re

from compress.eval.html import pareto_front, render_html
from compress.eval.report import render_report

from .test_report import perplexity_results


def test_the_frontier_keeps_what_nothing_beats_on_both_axes():
    points = {"slow-good": (10.0, 0.90), "fast-poor": (2.0, 0.80), "dominated": (5.0, 0.79), "mid": (5.0, 0.85),
              "tie-worse": (5.0, 0.84)}
    assert pareto_front(points, higher_is_better=True) == ["fast-poor", "mid", "slow-good"]
    perplexities = {"base": (10.0, 12.5), "int8": (5.0, 12.75), "worse": (6.0, 13.0)}
    assert pareto_front(perplexities, higher_is_better=False) == ["int8", "base"]


def test_the_page_holds_both_plots_the_table_and_nothing_from_the_network():
    results = perplexity_results()
    page = render_html(results, render_report(results, ["int8 needs VNNI"], "compress run r.yaml --out o"))
    assert page.count("<svg") == 2
    assert "perplexity vs latency" in page and "perplexity vs size" in page
    assert "<h2>Results</h2>\n<div class='plots'>" in page
    # fp32-torch (12.5 at 40 ms) is beaten by fp32-onnx (12.5 at 20 ms); int8-onnx is faster but worse.
    assert re.findall(r"<tr class=frontier><td>([^<]+)</td>", page) == ["fp32-onnx", "int8-onnx"]
    assert "<li>int8 needs VNNI</li>" in page and "<pre><code>compress run r.yaml --out o</code></pre>" in page
    assert not re.search(r"<script|<link|<img|url\((?!#)|@import", page)  # self-contained: opens from disk


def test_the_plots_draw_the_stacked_chain_on_each_runtime():
    from .test_attribution import PASSES, ROWS

    engines = {"torch": "torch", "openvino": "openvino"}
    rows = [{**row, "runtime": {"name": engines[row["target"]]}} for row in ROWS]
    page = render_html({"baseline": "00-finetune", "rows": rows, "passes": PASSES}, "# Report\n\n## Results\n")
    assert page.count("the chain on openvino") == 2 and page.count("the chain on torch") == 2  # one per plot
    without = render_html({"baseline": "00-finetune", "rows": rows, "passes": []}, "# Report\n\n## Results\n")
    assert "the chain on" not in without
