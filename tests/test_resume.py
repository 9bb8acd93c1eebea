"""A run that resumes itself: a learner rank killed mid-step (every actor is stopped and the
run goes on from its newest checkpoint, `cluster.auto_resume` times); killed once more, it has
no resume left (it stops with one line, its checkpoints whole); and a driver started again
with the same command finds its run folder and continues it. Faults are caused with
R1RAY_INJECT_FAULTS (cluster/faults.py) in copies of tests/test_e2e.py's "learner-x2" run and
compared with it."""

import fcntl
import json

import pytest

from cluster import checkpoint
from cluster.config import ConfigError, load_config
from tests.test_e2e import read_rows, run, run_args, untimed

DIED = "learner 1 died while learning in step {}"
BECAUSE = "its process died (SYSTEM_ERROR: Worker unexpectedly exits with a connection error code 2. End of file.)"
"""What the console says when rank 1 is SIGKILLed in a step (`R1RAY_INJECT_FAULTS=learner1@learn:STEP`:
once its part of the step's optimizer step is under way)."""


def same_run(cut_dir, full_dir):
    """The metrics of every step, the prompts and the results of `cut_dir` equal those of the
    uninterrupted run, except the clock's (`untimed`) and the deaths counted (`faults/*`, which
    only the interrupted run has)."""
    def rows(d):
        return [{k: v for k, v in r.items() if not k.startswith("faults/")}
                for r in untimed(read_rows(d / "metrics.jsonl"))]

    full = rows(full_dir)
    assert [r["step"] for r in full] == [1, 2, 3, 4] and any(r.get("learner/grad_norm", 0) > 0 for r in full)
    assert rows(cut_dir) == full
    assert read_rows(cut_dir / "prompts.jsonl") == read_rows(full_dir / "prompts.jsonl")
    assert json.loads((cut_dir / "results.json").read_text()) == json.loads((full_dir / "results.json").read_text())


@pytest.mark.slow
def test_a_learner_rank_killed_mid_step_resumes_the_run_until_no_resume_is_left_then_the_command_continues_it(
        finished, tmp_path, tiny_model):
    # A copy of the "learner-x2" run, checkpointed by the clock only (after every step:
    # every_minutes is tiny), none by count. Rank 1 dies in step 2: the run resumes itself
    # from step 1 and does step 2 again; it dies in step 3, one death more than
    # cluster.auto_resume=1: the run stops.
    args = [*run_args("learner-x2", tmp_path, tiny_model), "logging.run_name=killed", "checkpoint.every=0",
            "checkpoint.every_minutes=0.0001", "cluster.auto_resume=1"]
    stopped, _ = run(args, tmp_path, env={"R1RAY_INJECT_FAULTS": "learner1@learn:2,learner1@learn:3"})
    run_dir = tmp_path / "runs" / "killed"
    assert stopped.returncode == 1, stopped.stdout[-3000:] + stopped.stderr[-3000:]
    assert stopped.stdout.count("r1ray: injecting a fault: SIGKILL to learner 1") == 2
    assert (f"r1ray: fault: {DIED.format(2)} ({BECAUSE}); resuming from step-000001 (0 restart(s) left, "
            "cluster.auto_resume)" in stopped.stdout), stopped.stdout[-3000:]
    assert f"r1ray: run folder {run_dir}, resuming from step-000001" in stopped.stdout
    # The second death has no resume left: one line, and the checkpoints whole.
    errors = [line for line in stopped.stderr.splitlines() if line.startswith("r1ray: error:")]
    assert len(errors) == 1 and errors[0].startswith(
        f"r1ray: error: {DIED.format(3)}: {BECAUSE}; cluster.auto_resume=1 used up; continue with: "
        f"r1ray train --resume {run_dir} (the actors' output: "), stopped.stderr[-3000:]
    assert "Traceback" not in stopped.stderr
    saved = checkpoint.complete(run_dir)
    assert [p.name for p in saved] == ["step-000001", "step-000002"]  # checkpoint.keep=2
    assert all(checkpoint.problem(p) is None for p in saved)

    # The same command again, as a submitter that retries a failed job runs it: the driver
    # finds its own run folder, unfinished and with the same config, and continues it.
    again, _ = run(args, tmp_path)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "unfinished and with this config: continuing it" in again.stdout
    assert f"r1ray: run folder {run_dir}, resuming from step-000002" in again.stdout
    # The same steps, learning and results as the run that nothing killed (step 2 logged by
    # the run that resumed itself, 3 and 4 by the command run again), the deaths counted.
    full_proc, full_dir = finished("learner-x2")
    assert full_proc.returncode == 0, full_proc.stderr[-3000:]
    same_run(run_dir, full_dir)
    assert [r["faults/learner"] for r in read_rows(run_dir / "metrics.jsonl")] == [0, 1, 0, 0]
    # Now finished, the folder is refused as before.
    done, _ = run(args, tmp_path, timeout=120)
    assert done.returncode == 2 and "already exists and its run finished" in done.stderr, done.stderr[-2000:]


def test_a_restarted_command_continues_its_own_unfinished_run_and_refuses_any_other(tmp_path, capsys):
    from cluster.train import _make_run_dir, _own_run

    def config(*overrides):
        return load_config(None, [f"cluster.runs_dir={tmp_path}", "logging.run_name=r", *overrides])

    assert _own_run(config()) is None  # no folder: a new run
    assert _own_run(load_config(None, [f"cluster.runs_dir={tmp_path}"])) is None  # a timestamp is never taken
    run_dir = _make_run_dir(config())
    # Keys a resume may change may differ (a retried job with more steps, another cluster).
    assert _own_run(config("algorithm.steps=300", "cluster.auto_resume=5")) == run_dir
    assert "the run folder" in capsys.readouterr().out
    with pytest.raises(ConfigError, match=r"with another config: learner.lr \(that run: 5e-05, now: 0.001\)"):
        _own_run(config("learner.lr=1e-3"))
    (run_dir / "results.json").write_text("{}")
    with pytest.raises(ConfigError, match="already exists and its run finished"):
        _own_run(config())
    (tmp_path / "mine").mkdir()
    with pytest.raises(ConfigError, match="is not a run's"):
        _own_run(config("logging.run_name=mine"))


def test_a_run_folder_another_live_process_drives_is_refused(tmp_path):
    from cluster.train import _claim

    with (tmp_path / "driver.lock").open("a") as other:  # another driver's lock, as flock sees it
        fcntl.flock(other, fcntl.LOCK_EX)
        with pytest.raises(ConfigError, match="is being driven by another live process"):
            _claim(tmp_path)
    _claim(tmp_path)  # once that process is gone
    _claim(tmp_path)  # and again in this one: each attempt at a run claims its folder


def test_a_death_is_told_by_the_phase_the_driver_was_in():
    # (and by Ray's reason, in one line: tests/test_faults.py)
    from cluster.train import _phase

    def learn():
        raise RuntimeError("The actor died unexpectedly before finishing this task.")

    def grpo_step():
        learn()

    with pytest.raises(RuntimeError) as caught:
        grpo_step()
    assert _phase(caught.value, 3) == "learning in step 3" and _phase(caught.value, None) == "learning"
