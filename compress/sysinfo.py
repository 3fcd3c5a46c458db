"""What machine and which library versions produced a result: recorded beside every figure."""

from __future__ import annotations

import functools
import os
import platform
import shutil
import subprocess
from importlib import metadata

LIBRARIES = ("compress-transformers", "torch", "transformers", "optimum", "optimum-onnx", "onnx", "onnxruntime",
             "accelerate", "datasets")
# The instruction sets that decide int8 and fp32 kernel speed on x86 and Arm.
ISA_FLAGS = ("avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni",
             "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16", "asimd", "asimddp", "sve", "i8mm")


def library_versions() -> dict[str, str]:
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def machine_info() -> dict[str, object]:
    model, flags = _cpuinfo()
    return {
        "cpu": model or platform.processor() or platform.machine(),
        "arch": platform.machine(),
        "isa": [flag for flag in ISA_FLAGS if flag in flags],
        "cores": os.cpu_count(),
        "gpus": gpu_names(),
        "python": platform.python_version(),
        "os": platform.platform(terse=True),
    }


@functools.cache
def gpu_names() -> list[str]:
    """NVIDIA GPUs as nvidia-smi names them, without importing torch; none where there is no driver."""
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                              text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [line.strip() for line in done.stdout.splitlines() if line.strip()] if done.returncode == 0 else []


def has_vnni() -> bool:
    """Whether int8 dot products run natively (x86 VNNI, Arm dot product): full-range int8 weights are safe."""
    return bool({"avx512_vnni", "avx_vnni", "amx_int8", "asimddp"} & _cpuinfo()[1])


def _cpuinfo() -> tuple[str, set[str]]:
    model, flags = "", set()
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                key, _, value = line.partition(":")
                key = key.strip()
                if key in ("model name", "Model") and not model:
                    model = value.strip()
                elif key in ("flags", "Features") and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    return model, flags
