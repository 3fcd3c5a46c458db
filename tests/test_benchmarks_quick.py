"""`benchmarks/run.py --quick`, the CI check that the benchmark machinery runs end to end on the real model."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_quick_benchmark_writes_its_section_with_command_machine_and_rows(tmp_path):
    results = tmp_path / "RESULTS.md"
    done = subprocess.run([sys.executable, "benchmarks/run.py", "--quick", "--results", str(results)], cwd=ROOT,
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    section = results.read_text()
    assert "<!-- bench:quick -->" in section and "<!-- /bench:quick -->" in section
    assert "python benchmarks/run.py --quick   # = compress run pipelines/quickstart.yaml" in section
    assert "- ISA: " in section and "Measured 20" in section
    for row in ("| 00-finetune |", "| 01-export@openvino |", "| 03-ptq@openvino | - | openvino CPU | int8 | not run",
                "| 04-int8-portable |"):
        assert row in section
