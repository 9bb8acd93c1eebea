"""The machine a benchmark ran on, as one line for its table: date, CPU, cores, memory, OS,
and whether the CPU does bf16 matmuls natively."""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path

from cluster.precision import BF16_FLAGS, cpu_flags


def bf16_native() -> tuple[bool, str]:
    """(whether this CPU has bf16 matmul instructions, which ones or what it lacks). Without
    them torch emulates bf16 matmuls (cluster/precision.py), so a bf16 timing there measures
    the emulation, not the code around it."""
    found = [flag for flag in BF16_FLAGS if flag in cpu_flags()]
    if found:
        return True, "bf16 native (" + ", ".join(found) + ")"
    return False, "bf16 emulated (no " + "/".join(BF16_FLAGS) + " in /proc/cpuinfo)"


def describe(software: str) -> str:
    """Date, CPU model, cores, memory, bf16 support and platform, then `software` (the
    versions that matter)."""
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    mem = int(Path("/proc/meminfo").read_text().split()[1]) / 2**20
    return (f"{time.strftime('%Y-%m-%d')}, {cpu}, {os.cpu_count()} cores, {mem:.0f} GiB, {bf16_native()[1]}, "
            f"{platform.platform()}; Python {platform.python_version()}, {software}")
