"""A watchdog: a small process of its own that SIGKILLs what a process leaves behind once that
process is gone (a process that is SIGKILLed runs nothing, so it cannot clean up after itself).
It imports nothing of the project (it runs as a script, from any working directory).

Two kinds of process start one:
- a rollout actor whose vLLM engine core runs in subprocesses (`reap_when_gone`): when the actor
  is killed (Ray's `kill`, the OOM killer), vLLM's engine core, which does not watch its parent,
  lives on with its workers, holding their memory: on a GPU, the actor started in its place then
  fails vLLM's free-memory check.
- a driver that starts a private Ray cluster (`reap_session`, from `cluster.placement.connect`,
  which says what Ray leaves behind).
"""

from __future__ import annotations

import subprocess
import sys
import time

SESSION_LOOK_MAX_S = 8.0
"""A session's watchdog looks at every process (to record those under the head processes) each
second for its first `SESSION_SETTLE_S` and whenever new ones appear there, then less and less
often while none do, down to once in this long: a look costs ~5-15 ms of CPU (it grows with the
machine's processes), and most of a session's processes start with it and live as long as it."""

SESSION_SETTLE_S = 60.0
"""How long a session's watchdog looks each second, however quiet the head processes seem: the
head starts its agents in its first seconds, and on a loaded machine a look may come before the
head has started anything; backing off then would leave the first processes it starts unseen for
seconds, and a head killed meanwhile would orphan them unrecorded."""


def reap_when_gone(pid: int) -> subprocess.Popen | None:
    """Start a watchdog that SIGKILLs process `pid`'s children (as they are now, with their
    own children) once `pid` is gone; None when it has none."""
    import psutil

    children = psutil.Process(pid).children(recursive=True)
    if not children:
        return None
    return _start([str(pid), *[f"{c.pid}:{c.create_time()!r}" for c in children]])


def reap_session(pid: int, heads: list[int]) -> subprocess.Popen | None:
    """Start a watchdog that SIGKILLs a local Ray cluster's processes once its driver `pid`, or
    all its `heads` (the processes the driver started: gcs_server, raylet, ...), are gone: the
    heads, every process started under them (recorded as they appear), and every process
    the raylet started (found as it kills, by the RAY_RAYLET_PID that Ray puts in the
    environment of a worker, which its children inherit): a worker started since the last look,
    whose raylet died with the driver, was adopted by init before it could be recorded. None
    when no head is left."""
    import psutil

    targets = []
    for head in heads:
        try:
            targets.append(f"{head}:{psutil.Process(head).create_time()!r}")
        except psutil.NoSuchProcess:
            pass
    return _start([str(pid), "--session", *targets]) if targets else None


def _start(args: list[str]) -> subprocess.Popen:
    # A session of its own: a Ctrl-C in a terminal, or a signal to the caller's process group,
    # does not reach it.
    return subprocess.Popen([sys.executable, __file__, *args], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            start_new_session=True)


def _running(pid: int, created: float | None = None) -> bool:
    """Whether process `pid` runs (a zombie has ended), and is the one created at `created`."""
    import psutil

    try:
        process = psutil.Process(pid)
        return process.status() != psutil.STATUS_ZOMBIE and created in (None, process.create_time())
    except psutil.NoSuchProcess:
        return False


def _table() -> dict[int, tuple[int, float]]:
    """Every process running now (a zombie has ended; its parent has not yet waited for it):
    pid -> (parent pid, create time)."""
    import psutil

    return {p.pid: (p.info["ppid"], p.info["create_time"])
            for p in psutil.process_iter(["ppid", "create_time", "status"]) if p.info["status"] != psutil.STATUS_ZOMBIE}


def _same(known: dict[int, float], table: dict[int, tuple[int, float]]) -> dict[int, float]:
    """The `known` processes (pid -> create time) that are still the process they were (a pid
    may be reused by a new process), with every process now under them."""
    alive = {pid: created for pid, created in known.items() if pid in table and table[pid][1] == created}
    children: dict[int, list[int]] = {}
    for pid, (parent, _) in table.items():
        children.setdefault(parent, []).append(pid)
    todo = list(alive)
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in alive:
                alive[child] = table[child][1]
                todo.append(child)
    return alive


def _started_by(raylets: dict[int, float], table: dict[int, tuple[int, float]]) -> dict[int, float]:
    """The processes started since the `raylets` (pid -> create time) whose environment names
    one of them as RAY_RAYLET_PID: what those raylets started, and the children of that."""
    import psutil

    found = {}
    for pid, (_, created) in table.items():
        if created < min(raylets.values()):
            continue
        try:
            raylet = psutil.Process(pid).environ().get("RAY_RAYLET_PID", "")
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        if raylet.isdigit() and int(raylet) in raylets:
            found[pid] = created
    return found


def reap(pid: int, targets: list[str], session: bool = False, poll_s: float = 0.5) -> None:
    """Wait for process `pid` to go (or every target to), then SIGKILL every target
    ("pid:create_time") that is still the process it was (a pid may be reused by a new process),
    with the processes under it. For a `session` (see `reap_session`), what is started under the
    targets meanwhile is recorded too (by the time `pid` is gone, a process may have lost its
    parent and been adopted by init), and so is what a target started as a raylet."""
    import psutil

    roots = {int(p): float(t) for p, t in (target.split(":") for target in targets)}
    known, looked, every, start = dict(roots), 0.0, poll_s, time.monotonic()
    while _running(pid) and any(_running(p, t) for p, t in roots.items()):
        if session and time.monotonic() - looked >= every:
            seen = _same(known, _table())
            settled = time.monotonic() - start > SESSION_SETTLE_S and not seen.keys() - known.keys()
            every = min(2 * every, SESSION_LOOK_MAX_S) if settled else poll_s
            known, looked = seen, time.monotonic()
        time.sleep(poll_s)
    for _ in range(3):  # and again, for what was started while the others were being killed
        table = _table()
        victims = _same({**known, **(_started_by(roots, table) if session else {})}, table)
        if not victims:
            return
        for victim in victims:
            try:
                psutil.Process(victim).kill()
            except psutil.Error:  # gone already, or not ours to kill
                pass
        known = victims
        time.sleep(0.1)


if __name__ == "__main__":
    session = "--session" in sys.argv[2:]
    reap(int(sys.argv[1]), [a for a in sys.argv[2:] if a != "--session"], session, 1.0 if session else 0.5)
