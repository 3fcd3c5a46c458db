import subprocess
import sys

PARENT = """
import subprocess, sys
ballast = bytearray(600 * 1024 * 1024)
ballast[::4096] = b"x" * len(ballast[::4096])
print(subprocess.run([sys.executable, "-c", "from compress.eval.worker import peak_rss_mb; print(peak_rss_mb())"],
                     capture_output=True, text=True, check=True).stdout)
"""


def test_a_worker_reports_its_own_peak_not_its_parents():
    child_peak = float(subprocess.run([sys.executable, "-c", PARENT], capture_output=True, text=True,
                                      check=True).stdout)
    assert 5 < child_peak < 300  # the parent held 600 MB; Linux's ru_maxrss would have reported that
