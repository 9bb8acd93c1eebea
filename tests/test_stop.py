"""Stopping: a signal while the actors start ends the run within seconds, and nothing of a
local cluster outlives its driver, however the driver ends (SIGTERM, Ctrl-C, SIGKILL).

The runs are real (`python -m r1ray train`, Ray, vLLM, DeepSpeed). Which processes are the
run's is decided by ancestry alone: every process found under the driver while it runs
(walking /proc), so that other Ray clusters on the machine (another test process's) are never
looked at.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.test_e2e import REPO, SHORT


def _stat(pid: int) -> tuple[int, int, str] | None:
    """(parent pid, start time in clock ticks, state) of a process, or None when there is none."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return int(fields[1]), int(fields[19]), fields[0]


def descendants(root: int) -> dict[int, int]:
    """Every process under `root` now: pid -> start time."""
    table = {int(p): _stat(int(p)) for p in os.listdir("/proc") if p.isdigit()}
    children: dict[int, list[int]] = {}
    for pid, stat in table.items():
        if stat:
            children.setdefault(stat[0], []).append(pid)
    found, todo = {}, [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found[child] = table[child][1]
            todo.append(child)
    return found


def running(procs: dict[int, int]) -> dict[int, str]:
    """The processes of `procs` (pid -> start time) still running (a zombie has ended), with
    their command lines."""
    out = {}
    for pid, started in procs.items():
        stat = _stat(pid)
        if stat and stat[1] == started and stat[2] != "Z":
            try:
                out[pid] = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
            except OSError:
                pass
    return out


def gone_within(procs: dict[int, int], timeout_s: float) -> float:
    """Seconds until none of `procs` runs; fails naming those left after `timeout_s`."""
    start = time.monotonic()
    while running(procs):
        assert time.monotonic() - start < timeout_s, f"still running after {timeout_s:.0f}s: {running(procs)}"
        time.sleep(0.2)
    return time.monotonic() - start


def kill_group(proc: subprocess.Popen) -> None:
    """Kill what is left of a test's process group (nothing, when the test passed)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


# ---- the watchdog, on plain processes ----------------------------------------------------------

HEAD = """
import os, subprocess, sys, time
time.sleep(3)  # a head slowed by a loaded machine: the watchdog's first looks find nothing under it
subprocess.Popen(["sleep", "300"])  # recorded by the watchdog, under the head
time.sleep(1.5)
# Orphaned at once, never under the head (as a worker the raylet started just before it died
# with the driver), and named by its environment as Ray names a worker's raylet.
subprocess.Popen([sys.executable, "-c", "import subprocess; print(subprocess.Popen(['sleep', '301']).pid)"],
                 env={**os.environ, "RAY_RAYLET_PID": str(os.getpid())}).wait()
time.sleep(300)
"""

DRIVER = """
import os, subprocess, sys, time
sys.path.insert(0, {repo!r})
from actors.reaper import reap_session
head = subprocess.Popen([sys.executable, "-c", {head!r}])
other = subprocess.Popen(["sleep", "302"])  # started by the driver, not under the head (as wandb's process)
reap_session(os.getpid(), [head.pid])
print(head.pid, other.pid, flush=True)
time.sleep(300)
"""


@pytest.mark.parametrize("gone", ["driver", "head"])
def test_the_watchdog_kills_what_the_head_started_once_the_driver_or_the_head_is_gone(gone):
    # "driver": the driver is SIGKILLed, and with it the head (as Ray's head processes share
    # its fate): what the head started is orphaned, adopted by init. "head": the head alone ends
    # (ray.shutdown) and the driver goes on. Either way what the head started is killed, the
    # process orphaned before it could be recorded too, and nothing else is.
    driver = subprocess.Popen([sys.executable, "-c", DRIVER.format(repo=str(REPO), head=HEAD)],
                              stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        head, other = map(int, driver.stdout.readline().split())
        orphan = int(driver.stdout.readline())
        deadline = time.monotonic() + 30
        while len(descendants(head)) != 1:  # until the orphan's parent has exited
            assert time.monotonic() < deadline, descendants(head)
            time.sleep(0.05)
        started = {**descendants(head), orphan: _stat(orphan)[1]}
        assert len(started) == 2
        if gone == "driver":
            driver.kill()
        os.kill(head, signal.SIGKILL)
        gone_within(started, 20)  # the watchdog looks once a second; a loaded machine slows its scan of /proc
        assert running({other: _stat(other)[1]}) and (gone == "head") == (driver.poll() is None)
    finally:
        kill_group(driver)


# ---- what a stopped run says --------------------------------------------------------------------

SIGNALLED = """
import os, signal, sys
from pathlib import Path
from cluster.train import StopRequest
run, phase, signals = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
stop = StopRequest(run)  # a resumed run's folder
if phase == "steps":
    stop.actors_up(run)
for name in signals:
    os.kill(os.getpid(), getattr(signal, name))
print("not stopped", flush=True)
"""

CONTINUE = "continue from its checkpoint step-000003 with: r1ray train --resume {run}"


@pytest.mark.parametrize("phase, signals, saved, says", [
    ("start-up", ["SIGTERM"], True, f"stopped by SIGTERM during start-up; {CONTINUE}"),
    ("start-up", ["SIGINT"], False, "stopped by SIGINT during start-up; no checkpoint was saved, nothing to resume"),
    ("steps", ["SIGINT", "SIGINT"], True, f"stopped by SIGINT at once (a second signal); {CONTINUE}"),
    ("steps", ["SIGTERM", "SIGINT"], True, f"stopped by SIGINT at once (a second signal); {CONTINUE}"),
])
def test_a_run_stopped_at_once_says_so_in_one_line_and_how_to_go_on(tmp_path, phase, signals, saved, says):
    if saved:
        (tmp_path / "checkpoints" / "step-000003").mkdir(parents=True)
    proc = subprocess.run([sys.executable, "-c", SIGNALLED, str(tmp_path), phase, *signals], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 128 + getattr(signal, signals[-1]), proc.stderr
    assert proc.stderr == f"r1ray: {says.format(run=tmp_path)}\n"
    first = f"r1ray: {signals[0]}: stopping after this step, with a checkpoint (a second signal stops at once)\n"
    assert proc.stdout == (first if phase == "steps" else "")


# ---- real runs -----------------------------------------------------------------------------------

def start(tmp_path: Path, model: str, *overrides: str) -> subprocess.Popen:
    """`python -m r1ray train` of a short run, in a session of its own (so a Ctrl-C can be sent to
    its process group, as a terminal does); stdout and stderr go to tmp_path/out, err."""
    cmd = [sys.executable, "-m", "r1ray", "train", *SHORT, f"model.path={model}", "logging.wandb_mode=disabled",
           "logging.run_name=stop", f"cluster.runs_dir={tmp_path / 'runs'}", f"cluster.cache_dir={tmp_path / 'cache'}",
           *overrides]
    with (tmp_path / "out").open("w") as out, (tmp_path / "err").open("w") as err:
        return subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=err, text=True, start_new_session=True)


def watch(proc: subprocess.Popen, seen: dict[int, int], until, timeout_s: float = 600) -> None:
    """Record `proc`'s descendants in `seen` every 0.1 s until `until()` holds."""
    deadline = time.monotonic() + timeout_s
    while not until():
        assert proc.poll() is None, f"the run ended first: {proc.returncode}"
        assert time.monotonic() < deadline, "timed out waiting"
        seen.update(descendants(proc.pid))
        time.sleep(0.1)
    seen.update(descendants(proc.pid))


def ray_names(seen: dict[int, int]) -> set[str]:
    """The names Ray gives the processes of `seen` that still run (ray::Learner, not the method it
    runs: ray::Learner.__init__)."""
    return {cmd.split()[0].split(".")[0] for cmd in running(seen).values() if cmd.startswith("ray::")}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["SIGTERM", "SIGINT"])
def test_a_signal_while_the_actors_start_stops_the_run_at_once_and_leaves_no_process(tmp_path, tiny_model, name):
    # Two vLLM engines (as in the report that found it), signalled once the actors are being
    # built: SIGTERM to the driver (as `kill` or `ray job stop`), SIGINT to its process group
    # (as Ctrl-C in a terminal).
    signum = getattr(signal, name)
    proc, seen = start(tmp_path, tiny_model, "rollout.num_engines=2", "rollout.num_cpus=0.4"), {}
    try:
        watch(proc, seen, lambda: "r1ray: placement:" in (tmp_path / "out").read_text()
              and {"ray::RolloutActor", "ray::Learner"} & ray_names(seen))
        signalled = time.monotonic()
        if signum == signal.SIGINT:
            os.killpg(proc.pid, signum)
        else:
            proc.send_signal(signum)
        proc.wait(timeout=10)
        exited = time.monotonic() - signalled
        left = gone_within(seen, 10)
    finally:
        kill_group(proc)
    out, err = (tmp_path / "out").read_text(), (tmp_path / "err").read_text()
    assert proc.returncode == 128 + signum, err[-3000:]
    assert err.strip().splitlines() == [f"r1ray: stopped by {name} during start-up; no checkpoint was saved, "
                                        "nothing to resume"], err[-3000:]
    assert "Traceback" not in out + err
    print(f"{name}: exited {exited:.1f}s after the signal; its {len(seen)} processes gone "
          f"{exited + left:.1f}s after it")


@pytest.mark.slow
def test_a_driver_killed_mid_run_leaves_no_process_of_its_cluster(tmp_path, tiny_model):
    # The smallest run with every kind of actor, killed once it has logged a step: the actors,
    # Ray's agents and the reward worker's checker processes must all end with it.
    proc, seen = start(tmp_path, tiny_model, "cold_start.steps=0", "algorithm.steps=50"), {}
    metrics = tmp_path / "runs" / "stop" / "metrics.jsonl"
    try:
        watch(proc, seen, lambda: metrics.exists() and metrics.read_text().strip())
        names = ray_names(seen)
        reward = next(pid for pid, cmd in running(seen).items() if cmd.startswith("ray::RewardWorker"))
        assert {"ray::Learner", "ray::RolloutActor", "ray::RewardWorker", "ray::DashboardAgent"} <= names, names
        assert descendants(reward), "the reward worker has no checker process; the test would say nothing of them"
        proc.kill()
        left = gone_within(seen, 20)
    finally:
        kill_group(proc)
    print(f"SIGKILL: the run's {len(seen)} processes gone {left:.1f}s after it")
