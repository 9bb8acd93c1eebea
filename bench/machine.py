"""The machine a benchmark ran on, as one line for its table: date, CPU, cores, memory, OS."""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path


def describe(software: str) -> str:
    """Date, CPU model, cores, memory and platform, then `software` (the versions that matter)."""
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    mem = int(Path("/proc/meminfo").read_text().split()[1]) / 2**20
    return (f"{time.strftime('%Y-%m-%d')}, {cpu}, {os.cpu_count()} cores, {mem:.0f} GiB, "
            f"{platform.platform()}; Python {platform.python_version()}, {software}")
