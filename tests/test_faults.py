"""cluster/faults.py without a cluster: a run's account of deaths against its budgets, the
one-line causes, and the injection plan tests and bench/chaos.py use (the signals themselves
go to stand-ins here; tests/test_e2e.py and tests/test_resume.py send them to real actors)."""

import signal

import pytest

from cluster import faults
from cluster.faults import Faults, RestartsExhausted, cause_of


def test_deaths_are_counted_against_their_budget_and_the_last_one_stops_the_run(capsys):
    account = Faults({"engine": 1, "reward": 2, "preference": 2, "learner": 0}, resume="continue with: x")
    account.charge("engine", 0, "generating step 3", "killed", "replaced it")
    assert capsys.readouterr().out == ("r1ray: fault: engine 0 died while generating step 3 (killed); replaced it "
                                       "(0 restart(s) left, rollout.max_restarts)\n")
    # Reward workers and the preference scorer share rewards.max_restarts.
    account.charge("preference", None, "scoring", "oom", "replaced it")
    assert account.left("reward") == 1 and account.left("preference") == 1
    with pytest.raises(RestartsExhausted, match=r"^engine 1 died while idle: gone; rollout.max_restarts=1 used up; "
                                                r"continue with: x$"):
        account.charge("engine", 1, "idle", "gone", "replaced it")
    assert account.metrics() == {"faults/engine": 1.0, "faults/reward": 0.0, "faults/preference": 1.0,
                                 "faults/learner": 0.0}


@pytest.mark.parametrize("ending", [
    "Some common causes include: (1) the process was killed by the OOM killer due to high memory usage, (2) ...",
    "There are some potential root causes. (1) ..."])
def test_a_cause_is_one_line_ray_s_death_notice_or_the_error_s_last_line(ending):
    notice = ("The actor died unexpectedly before finishing this task.\n\tclass_name: Learner\n\tpid: 5074\n"
              "The actor is dead because its worker process has died. Worker exit type: SYSTEM_ERROR Worker exit "
              f"detail: Worker unexpectedly exits with a connection error code 2. End of file. {ending}")
    assert cause_of(RuntimeError(notice)) == \
        "its process died (SYSTEM_ERROR: Worker unexpectedly exits with a connection error code 2. End of file.)"
    traceback = "Traceback (most recent call last):\n  File \"x.py\", line 1\nValueError: bad shard\n"
    assert cause_of(RuntimeError(traceback)) == "ValueError: bad shard"
    assert cause_of(RuntimeError("x" * 300)) == "x" * 200 + "..."


@pytest.fixture
def signals(monkeypatch):
    """Injection against stand-ins: actor i's process is pid 100 + i; the signals sent are recorded."""
    sent = []
    monkeypatch.setattr(faults, "_injector", faults._Injector())
    monkeypatch.setattr(faults, "actor_pid", lambda actor: 100 + actor)
    monkeypatch.setattr(faults.os, "kill", lambda pid, sig: sent.append((pid, sig)))
    return sent


def test_a_planned_fault_happens_once_from_its_step_on_and_one_listed_twice_happens_twice(monkeypatch, signals):
    monkeypatch.setenv("R1RAY_INJECT_FAULTS",
                       "engine1@stage:2, learner1@learn:3,learner1@learn:3,engine5@idle:0:SIGSTOP")
    engines, learners = [0, 1], [0, 1]
    faults.at_step(1)
    faults.inject("stage", "engine", engines)
    faults.inject("idle", "engine", engines)  # engine 5 does not exist: nothing
    assert signals == []
    faults.at_step(3)  # step 2 had no sync: the fault comes at the first stage from step 2 on
    faults.inject("stage", "engine", engines)
    faults.inject("stage", "engine", engines)
    assert signals == [(101, signal.SIGKILL)]
    faults.inject("learn", "learner", learners)  # the twice-listed fault: once per call
    faults.inject("learn", "learner", learners)
    faults.inject("learn", "learner", learners)
    assert signals == [(101, signal.SIGKILL)] + [(101, signal.SIGKILL)] * 2


def test_a_plan_that_does_not_parse_is_refused_naming_the_item(monkeypatch, signals):
    monkeypatch.setenv("R1RAY_INJECT_FAULTS", "engine0@stage:1,engine@stage")
    with pytest.raises(ValueError, match=r"'engine@stage' is not ROLE\[INDEX\]@POINT:STEP\[:SIGNAL\]"):
        faults.inject("stage", "engine", [0])
