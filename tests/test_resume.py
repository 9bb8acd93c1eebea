"""A run that resumes itself: a learner rank killed mid-step (every actor is stopped and the
run goes on from its newest checkpoint, `cluster.auto_resume` times). Faults are caused with
R1RAY_INJECT_FAULTS (cluster/faults.py) in copies of tests/test_e2e.py's "learner-x2" run and
compared with it."""

import json

import pytest

from tests.test_e2e import read_rows, run, run_args, untimed

KILL_RANK_1 = {"R1RAY_INJECT_FAULTS": "learner1@learn:3"}
"""SIGKILL learner rank 1 once its part of step 3's optimizer step is under way (after the
checkpoint of step 2)."""


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
def test_a_learner_rank_killed_mid_step_resumes_the_run_as_if_it_had_not_died(finished, tmp_path, tiny_model):
    full_proc, full_dir = finished("learner-x2")
    assert full_proc.returncode == 0, full_proc.stderr[-3000:]
    proc, _ = run([*run_args("learner-x2", tmp_path, tiny_model), "logging.run_name=killed"], tmp_path,
                  env=KILL_RANK_1)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    cut_dir = tmp_path / "runs" / "killed"
    assert "r1ray: injecting a fault: SIGKILL to learner 1" in proc.stdout
    assert ("r1ray: fault: learner 1 died while learning in step 3 (Worker unexpectedly exits with a connection "
            "error code 2. End of file.); resuming from step-000002 (1 restart(s) left, cluster.auto_resume)"
            in proc.stdout), proc.stdout[-3000:]
    assert f"r1ray: run folder {cut_dir}, resuming from step-000002" in proc.stdout
    # The same steps, learning and results as the run that nothing killed, the death counted.
    same_run(cut_dir, full_dir)
    assert [r["faults/learner"] for r in read_rows(cut_dir / "metrics.jsonl")] == [0, 0, 1, 1]


def test_a_death_is_told_by_its_phase_and_ray_s_reason_in_one_line():
    from cluster.train import _death, _phase

    ray_says = ("The actor died unexpectedly before finishing this task.\n\tclass_name: Learner\n\tpid: 5074\n"
                "The actor is dead because its worker process has died. Worker exit type: SYSTEM_ERROR Worker exit "
                "detail: Worker unexpectedly exits with a connection error code 2. End of file. Some common causes "
                "include: (1) the process was killed by the OOM killer due to high memory usage, (2) ...")
    assert _death(RuntimeError(ray_says)) == "Worker unexpectedly exits with a connection error code 2. End of file."

    def learn():
        raise RuntimeError(ray_says)

    def grpo_step():
        learn()

    with pytest.raises(RuntimeError) as caught:
        grpo_step()
    assert _phase(caught.value, 3) == "learning in step 3" and _phase(caught.value, None) == "learning"
