"""`ray job submit`, as the README gives it: a head of its own (own ports and temp dir), a
short training job that must end SUCCEEDED with its metrics written, and a job with a bad
config that must end FAILED with the config error in `ray job logs`."""

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from common.net import free_port

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SHORT = ["cold_start.steps=2", "algorithm.steps=2", "algorithm.prompts_per_step=4", "algorithm.group_size=4",
         "task.eval_prompts=4", "logging.progress=false", "rollout.max_new_tokens=8", "logging.wandb_mode=disabled",
         "rollout.engine=transformers"]


@pytest.fixture(scope="module")
def head():
    """A Ray head with a dashboard on free ports; yields (env, dashboard address)."""
    # Unix socket paths must stay short: a temp dir of its own directly under /tmp.
    temp = tempfile.mkdtemp(prefix="r1ray-", dir="/tmp")
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PATH": f"{BIN}:{os.environ['PATH']}",
           "OMP_NUM_THREADS": "1"}
    env.pop("RAY_ADDRESS", None)
    log = Path(temp) / "head.log"
    for attempt in range(3):  # a port found free may be taken before the head binds it (the other test process)
        ports = {name: free_port() for name in ("port", "dashboard-port", "ray-client-server-port",
                                                "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                                "runtime-env-agent-port", "metrics-export-port",
                                                "node-manager-port", "object-manager-port")}
        start = [str(BIN / "ray"), "start", "--head", "--block", "--num-cpus=2", "--include-dashboard=true",
                 "--dashboard-host=127.0.0.1", f"--temp-dir={temp}", "--min-worker-port=0", "--max-worker-port=0",
                 *[f"--{name}={port}" for name, port in ports.items()]]
        # --block and a session of its own: stopping it stops this head's processes only (`ray stop`
        # would also kill the test session's own cluster).
        with log.open("w") as out:
            head = subprocess.Popen(start, env=env, start_new_session=True, stdout=out, stderr=subprocess.STDOUT)
        address = f"http://127.0.0.1:{ports['dashboard-port']}"
        if _wait_for(address, head):
            break
        with contextlib.suppress(ProcessLookupError):
            os.killpg(head.pid, signal.SIGKILL)  # what it had started before it gave up
        assert attempt < 2, f"ray start --head exited 3 times; the last said:\n{log.read_text()[-3000:]}"
    try:
        yield env, address
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=5)  # a clean stop takes half a minute; nothing of this head is kept
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
        shutil.rmtree(temp, ignore_errors=True)


def _wait_for(address: str, head: subprocess.Popen, timeout_s: float = 120) -> bool:
    """Whether the head's dashboard answers; False when `ray start` exited first."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            urllib.request.urlopen(f"{address}/api/version", timeout=5).read()
            return True
        except OSError:
            if head.poll() is not None:
                return False
            assert time.monotonic() < deadline, f"no Ray dashboard at {address} after {timeout_s:.0f}s"
            time.sleep(1)


def submit(env, address, job_id, args, timeout=600):
    cmd = [str(BIN / "ray"), "job", "submit", "--address", address, "--submission-id", job_id,
           "--working-dir", str(REPO), "--", "python", "-m", "r1ray", "train", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def status(env, address, job_id):
    from ray.job_submission import JobSubmissionClient

    return str(JobSubmissionClient(address).get_job_status(job_id))


@pytest.mark.slow
def test_a_submitted_job_trains_and_succeeds(head, tmp_path):
    env, address = head
    runs = tmp_path / "runs"
    proc = submit(env, address, "r1ray-ok", [*SHORT, f"cluster.runs_dir={runs}", "logging.run_name=job",
                                             f"cluster.cache_dir={tmp_path / 'cache'}"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert status(env, address, "r1ray-ok") == "SUCCEEDED"
    rows = [json.loads(line) for line in (runs / "job" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all("reward/mean" in r for r in rows)


@pytest.mark.slow
def test_a_job_with_a_bad_config_fails_with_the_error_in_its_logs(head, tmp_path):
    env, address = head
    start = time.monotonic()
    proc = submit(env, address, "r1ray-bad", ["learner.lr=-1"], timeout=300)
    assert proc.returncode == 1
    assert status(env, address, "r1ray-bad") == "FAILED"
    logs = subprocess.run([str(BIN / "ray"), "job", "logs", "--address", address, "r1ray-bad"], env=env,
                          capture_output=True, text=True, timeout=60).stdout
    assert "r1ray: error: learner.lr=-1.0 is out of range" in logs
    assert time.monotonic() - start < 120
