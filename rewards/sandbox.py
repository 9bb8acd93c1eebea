"""Run untrusted Python (a policy's program and its tests) in a bubblewrap sandbox.

    result = run_python({"main.py": source}, limits=Limits(timeout_s=10, memory_mb=512))
    result.status   # "exited" | "timeout" | "memory" | "output" | "error"

Each run is one process chain, every link exec'ing the next:

    unshare --mount  (root: mount a size-capped tmpfs, private to this run, for /tmp)
    setpriv          (drop to a random unprivileged uid/gid for this run)
    prlimit          (CPU seconds, address space, file size, process count, open files)
    bwrap            (new user, pid, net, ipc, uts, mount namespaces; minimal read-only binds)
    python3 -I /sandbox/main.py

Threat model. Covered: a program that loops forever (wall-clock timeout, then the whole
process group is killed; the pid namespace takes every descendant with it, double-forked
daemons included), allocates without bound (address-space limit: MemoryError), forks
without bound (process limit, counted for this run's own uid), writes big or many files
(file-size limit, and /tmp is a tmpfs capped in size; nothing else is writable), floods
its output (read while it runs and cut at a cap: the run is killed), reads the host's
files (only /usr is visible, read-only: no /etc, no /root, no /home, no project files),
opens network connections (its own network namespace has only an unconfigured loopback),
or signals processes outside (other pid namespace, other uid).
Not covered: kernel exploits and CPU side channels (namespaces are not a VM); a run can
use its share of CPU and memory up to its limits; the Python standard library is there.
The processes of one run share a uid: one can ptrace another or read its memory and
descriptors through /proc unless that one is not dumpable (which is why the test harness
in rewards/code.py makes itself so).
Needs: root (for the private tmpfs and uid switch) and the `bubblewrap` package, which
setup.sh installs.
"""

from __future__ import annotations

import os
import random
import selectors
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

PYTHON = "/usr/bin/python3"  # the system interpreter: the sandbox sees /usr only


@dataclass(frozen=True)
class Limits:
    timeout_s: float = 10.0
    """Wall-clock limit; the run is killed with its whole process tree after it."""
    memory_mb: int = 512
    """Address space per process."""
    cpu_s: int = 10
    """CPU seconds per process."""
    file_mb: int = 16
    """Largest file a process may write."""
    tmp_mb: int = 32
    """Size of the private /tmp."""
    processes: int = 32
    """Processes (and threads) the run's uid may have at once."""
    output_bytes: int = 64 * 1024
    """stdout and stderr are each cut here; more output kills the run."""


@dataclass(frozen=True)
class SandboxResult:
    status: str
    """ "exited" (see returncode), "timeout", "memory", "output" (flooded) or "error"."""
    returncode: int | None
    stdout: str
    stderr: str
    duration_s: float
    side_channel: bytes = b""
    """What the program wrote to its report descriptor (see `run_python`)."""


def available() -> str | None:
    """None if sandboxed runs can work here, else why not."""
    if os.geteuid() != 0:
        return "the sandbox needs root (for its private /tmp and the uid switch)"
    missing = [tool for tool in ("bwrap", "unshare", "setpriv", "prlimit") if shutil.which(tool) is None]
    if missing:
        return f"missing {', '.join(missing)} (setup.sh installs bubblewrap; util-linux has the rest)"
    return None


def _command(code_dir: str, tmp_dir: str, limits: Limits, uid: int, report_fd: int) -> list[str]:
    mount = ('mount -t tmpfs -o size=%dm,mode=1777,nosuid,nodev tmpfs "$0" && exec "$@"' % limits.tmp_mb)
    return [
        "unshare", "--mount", "--propagation", "private", "--", "sh", "-c", mount, tmp_dir,
        "setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--",
        "prlimit", f"--as={limits.memory_mb * 2**20}", f"--cpu={limits.cpu_s}",
        f"--fsize={limits.file_mb * 2**20}", f"--nproc={limits.processes}", "--nofile=256", "--",
        "bwrap", "--unshare-all", "--die-with-parent", "--new-session", "--clearenv",
        "--setenv", "PATH", "/usr/bin", "--setenv", "HOME", "/tmp", "--setenv", "PYTHONDONTWRITEBYTECODE", "1",
        "--ro-bind", "/usr", "/usr", "--symlink", "usr/lib", "/lib", "--symlink", "usr/lib64", "/lib64",
        "--symlink", "usr/bin", "/bin", "--proc", "/proc", "--dev", "/dev",
        "--bind", tmp_dir, "/tmp", "--ro-bind", code_dir, "/sandbox", "--chdir", "/tmp",
        "--remount-ro", "/",  # bwrap's root is an uncapped tmpfs: only /tmp may be written
        "--", PYTHON, "-I", "/sandbox/main.py", str(report_fd),
    ]


def run_python(files: dict[str, str], stdin: str = "", limits: Limits = Limits()) -> SandboxResult:
    """Run `files["main.py"]` (other files beside it, read-only under /sandbox) in a sandbox.

    `main.py` gets one argument: the number of an open file descriptor for a private report
    (`side_channel`), which a harness uses to prove it ran to the end.
    """
    why = available()
    if why:
        raise RuntimeError(f"sandbox unavailable: {why}")
    with tempfile.TemporaryDirectory(prefix="r1ray-sandbox-") as root:
        code_dir, tmp_dir = Path(root, "code"), Path(root, "tmp")
        code_dir.mkdir()
        tmp_dir.mkdir()
        for name, text in files.items():
            (code_dir / name).write_text(text)
        os.chmod(root, 0o755)
        uid = random.randrange(100_000, 1_000_000)  # its own uid: the process limit counts this run only
        report_r, report_w = os.pipe()
        start = time.monotonic()
        try:
            proc = subprocess.Popen(_command(str(code_dir), str(tmp_dir), limits, uid, report_w),
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    pass_fds=(report_w,), start_new_session=True)
        finally:
            os.close(report_w)
        try:
            return _collect(proc, report_r, stdin, limits, start)
        finally:
            _kill(proc)
            os.close(report_r)


def _collect(proc: subprocess.Popen, report_r: int, stdin: str, limits: Limits, start: float) -> SandboxResult:
    """Feed stdin, read outputs with caps until exit or the deadline; classify the end."""
    try:
        proc.stdin.write(stdin.encode())
        proc.stdin.close()
    except BrokenPipeError:
        pass
    sel = selectors.DefaultSelector()
    out_fd, err_fd = proc.stdout.fileno(), proc.stderr.fileno()
    buffers = {out_fd: bytearray(), err_fd: bytearray(), report_r: bytearray()}
    for fd in buffers:
        os.set_blocking(fd, False)
        sel.register(fd, selectors.EVENT_READ)
    deadline = start + limits.timeout_s
    status = None
    while sel.get_map() and status is None:
        left = deadline - time.monotonic()
        if left <= 0:
            status = "timeout"
            break
        for key, _ in sel.select(timeout=min(left, 0.5)):
            chunk = os.read(key.fd, 65536)
            if not chunk:
                sel.unregister(key.fd)
                continue
            buffers[key.fd] += chunk
            if len(buffers[key.fd]) > limits.output_bytes:
                status = "output"
    sel.close()
    if status is None:
        try:
            proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            status = "timeout"
    _kill(proc)
    out, err = (bytes(buffers[fd][:limits.output_bytes]).decode("utf-8", "replace") for fd in (out_fd, err_fd))
    code = None
    if status is None:
        status, code = ("memory" if "MemoryError" in err else "exited"), proc.returncode
    return SandboxResult(status, code, out, err, time.monotonic() - start, bytes(buffers[report_r][:4096]))


def _kill(proc: subprocess.Popen) -> None:
    """Kill the run's whole process group and reap it (bwrap's death ends its pid namespace)."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
    for stream in (proc.stdout, proc.stderr):
        stream.close()
