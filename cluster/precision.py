"""The learner's precision where a config says `learner.dtype: auto`: bf16 only where it is fast.

GPUs from Ampere on and x86 CPUs with AMX or AVX512-BF16 multiply in bf16 natively; elsewhere
torch emulates it. On 2 cores of an AVX2-only AMD EPYC (2026-12-01) a bf16 matmul ran at
0.9 GFLOP/s against fp32's 112, and a SmolLM2-135M run in bf16 did not finish its first step in
8 minutes. `choose_dtype` is the rule, a function of the facts; `resolve_dtype` gathers them on
this machine, the driver's, when the config is loaded (cluster/config.py), so every component
and the run folder's config.yaml see the concrete dtype. On a CPU cluster the learner's nodes
are assumed to be the driver's kind of CPU.
"""

from __future__ import annotations

import functools
import subprocess
import sys
from collections.abc import Collection
from pathlib import Path

BF16_FLAGS = {"amx_bf16": "AMX", "avx512_bf16": "AVX512-BF16"}
"""/proc/cpuinfo flags of x86 CPUs with bf16 matmul instructions, and their names."""


def choose_dtype(num_gpus: float, cpu_flags: Collection[str], gpu_bf16: bool | None) -> tuple[str, str]:
    """(dtype, why) for a learner with `num_gpus` GPUs per rank, on a machine whose CPU has
    `cpu_flags` and whose GPU does bf16 natively (`gpu_bf16`; None: no GPU is visible here)."""
    if num_gpus > 0:
        if gpu_bf16 is None:
            return "bfloat16", ("the learner trains on GPUs, which this machine cannot see: assuming they do "
                                "bf16 natively (Ampere or later; set learner.dtype=float32 if not)")
        if gpu_bf16:
            return "bfloat16", "the learner trains on GPUs and this machine's GPU does bf16 natively"
        return "float32", "the learner trains on GPUs and this machine's GPU has no native bf16 (before Ampere)"
    found = [name for flag, name in BF16_FLAGS.items() if flag in cpu_flags]
    if found:
        return "bfloat16", f"this CPU has {' and '.join(found)} (native bf16 matmuls)"
    return "float32", "this CPU has no AMX or AVX512-BF16 (bf16 matmuls are emulated, ~100x slower)"


def resolve_dtype(dtype: str, num_gpus: float) -> str:
    """`dtype` as given, or for "auto" this machine's choice (printed with its reason, once)."""
    return _machine_choice(num_gpus > 0) if dtype == "auto" else dtype


@functools.cache
def _machine_choice(gpu: bool) -> str:
    dtype, why = choose_dtype(1.0 if gpu else 0.0, cpu_flags(), gpu_bf16() if gpu else None)
    print(f"r1ray: learner.dtype auto -> {dtype}: {why}", flush=True)
    return dtype


def cpu_flags() -> set[str]:
    """The CPU's flags from /proc/cpuinfo (empty where there is none)."""
    path = Path("/proc/cpuinfo")
    text = path.read_text() if path.exists() else ""
    return set(next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), []))


def gpu_bf16() -> bool | None:
    """Whether this machine's GPU does bf16 natively; None if torch sees no GPU. Asked in a child
    process, so that the driver never holds a CUDA context on a GPU the engines will fill."""
    probe = ("import torch; print(torch.cuda.is_bf16_supported(including_emulation=False) "
             "if torch.cuda.is_available() else None)")
    try:
        out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return {"True": True, "False": False}.get(out.strip().rsplit("\n", 1)[-1])
