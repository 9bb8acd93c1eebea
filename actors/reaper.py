"""A watchdog that stops a process's children once that process is gone.

When a rollout actor is killed (Ray's `kill`, the OOM killer) nothing in it runs, and vLLM's
engine core, which does not watch its parent, lives on with its workers, holding their
memory: on a GPU, the actor started in its place then fails vLLM's free-memory check. The
watchdog (`reap_when_gone`) is a small process of its own that outlives the actor and kills
them. It imports nothing of the project (it runs as a script, from any working directory).
"""

from __future__ import annotations

import subprocess
import sys
import time


def reap_when_gone(pid: int) -> subprocess.Popen | None:
    """Start a watchdog that SIGKILLs process `pid`'s children (as they are now, with their
    own children) once `pid` is gone; None when it has none."""
    import psutil

    children = psutil.Process(pid).children(recursive=True)
    if not children:
        return None
    targets = [f"{c.pid}:{c.create_time()!r}" for c in children]
    return subprocess.Popen([sys.executable, __file__, str(pid), *targets], stdin=subprocess.DEVNULL,
                            start_new_session=True)


def _alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def reap(pid: int, targets: list[str], poll_s: float = 0.5) -> None:
    """Wait for `pid` to go, then SIGKILL every target ("pid:create_time") that is still the
    process it was (a pid may be reused by a new process)."""
    import psutil

    while _alive(pid):
        time.sleep(poll_s)
    for target in targets:
        child, created = target.split(":")
        try:
            process = psutil.Process(int(child))
            if process.create_time() == float(created):
                process.kill()
        except psutil.NoSuchProcess:
            pass


if __name__ == "__main__":
    reap(int(sys.argv[1]), sys.argv[2:])
