"""The reward pool on a real Ray cluster: samples split over the workers come back scored in
order, a worker actor that dies is replaced and its share scored again, and shutting the pool
down leaves nothing behind."""

import numpy as np
import pytest

from cluster.config import load_config
from cluster.faults import Faults, RestartsExhausted, actor_pid
from cluster.reward_pool import RewardPool
from common.records import Sample
from rewards.tasks import build_mixture


def sample(prompt_id: str, text: str) -> Sample:
    ids = np.arange(5, dtype=np.int32)
    return Sample(prompt_id, ids, ids, np.zeros(5, np.float32), text, "stop", 0)


@pytest.fixture(scope="module")
def pool(ray_cluster):
    cfg = load_config(None, ["rewards.num_workers=2", "task.knights.weight=1", "rewards.max_restarts=3",
                             "cluster.deadline_s=6"])
    pool = RewardPool(cfg, build_mixture(cfg.task).tasks, account=Faults.of(cfg))
    yield pool
    pool.shutdown()


def test_samples_are_scored_in_order_across_workers(pool):
    problems = build_mixture(pool.cfg.task).eval_problems(0, 6)
    by_id = {p.id: p for p in problems}
    add = [p for p in problems if p.task == "arithmetic"][0]
    right = f"ok</think><answer>{add.reference.answer}</answer>"
    samples = [sample(add.id, right), sample(add.id, "no</think><answer>-1</answer>")] * 2 + [
        sample(p.id, "</think><answer>?</answer>") for p in problems if p.task == "knights"]
    reasons = pool.score(samples, by_id, timeout_s=60)
    assert [s.reward_breakdown["correct"] for s in samples[:4]] == [1.0, 0.0, 1.0, 0.0]
    assert reasons[:2] == ["correct", "wrong: got -1"] and reasons[4].startswith("says nothing about")
    assert samples[0].reward == pytest.approx(1.1)


def test_a_dead_worker_is_replaced_and_its_share_scored(pool):
    import ray

    problems = {p.id: p for p in build_mixture(pool.cfg.task).eval_problems(0, 2)}
    add = next(p for p in problems.values() if p.task == "arithmetic")
    ray.kill(pool.workers[1])
    samples = [sample(add.id, f"</think><answer>{add.reference.answer}</answer>") for _ in range(4)]
    pool.score(samples, problems, timeout_s=60)
    assert [s.reward_breakdown["correct"] for s in samples] == [1.0] * 4 and pool.faults.counts["reward"] == 1


def test_streamed_parts_on_a_dead_worker_replace_it_once(pool):
    # Groups are submitted as they finish and collected later: two parts pending on a worker
    # that dies are both scored again, by one replacement.
    import ray

    problems = {p.id: p for p in build_mixture(pool.cfg.task).eval_problems(0, 2)}
    add = next(p for p in problems.values() if p.task == "arithmetic")
    restarts, victim = pool.faults.counts["reward"], pool.workers[0]
    ray.kill(victim)
    parts = [[sample(add.id, f"</think><answer>{add.reference.answer}</answer>") for _ in range(2)] for _ in range(2)]
    pending = [pool.submit(p, problems) for p in parts]
    assert [pool.collect(p, timeout_s=60) for p in pending] == [["correct"] * 2] * 2
    assert all(s.reward_breakdown["correct"] == 1.0 for p in parts for s in p)
    assert pool.faults.counts["reward"] == restarts + 1 and pool.workers[0] is not victim


def test_a_busy_worker_is_not_taken_for_a_hung_one(pool):
    # Its call waits behind other work for longer than cluster.deadline_s (a long chunk of
    # programs to run), but it answers the pool's pings meanwhile: nothing is replaced.
    import time

    problems = {p.id: p for p in build_mixture(pool.cfg.task).eval_problems(0, 2)}
    add = next(p for p in problems.values() if p.task == "arithmetic")
    busy = pool.workers[0]
    busy.__ray_call__.remote(lambda _: time.sleep(9))
    samples = [sample(add.id, f"</think><answer>{add.reference.answer}</answer>") for _ in range(2)]
    assert pool.score(samples, problems, timeout_s=60) == ["correct"] * 2
    assert pool.workers[0] is busy and pool.faults.counts["reward"] == 2  # the two tests above


@pytest.mark.slow  # waits out a 6 s deadline
def test_a_hung_worker_is_found_by_its_deadline_and_replaced_until_the_budget_is_spent(pool):
    import os
    import signal
    import time

    problems = {p.id: p for p in build_mixture(pool.cfg.task).eval_problems(0, 2)}
    add = next(p for p in problems.values() if p.task == "arithmetic")
    assert pool.faults.counts["reward"] == 2  # the two tests above
    os.kill(actor_pid(pool.workers[0]), signal.SIGSTOP)  # stuck, not dead
    samples = [sample(add.id, f"</think><answer>{add.reference.answer}</answer>") for _ in range(4)]
    start = time.monotonic()
    assert pool.score(samples, problems, timeout_s=60) == ["correct"] * 4
    assert pool.faults.counts["reward"] == 3 and time.monotonic() - start < 30  # cluster.deadline_s=6
    import ray

    ray.kill(pool.workers[1])  # one more than rewards.max_restarts=3
    with pytest.raises(RestartsExhausted, match=r"^reward 1 died while scoring: .+; rewards.max_restarts=3 used up"):
        pool.score(samples, problems, timeout_s=60)
    pool.workers[1] = pool._start()  # for the tests after


@pytest.mark.slow
def test_shutdown_leaves_no_traceback_and_no_semaphore(ray_cluster):
    # Ray kills an exiting actor's child processes, multiprocessing's resource tracker among
    # them: a checker pool still open then leaks its semaphores in /dev/shm, or (on a graceful
    # exit) unregisters them with a new tracker, which prints a KeyError traceback per name.
    import os
    import time
    from pathlib import Path

    import ray

    from rewards.tasks import MathDataset, Problem

    def own_files(_worker) -> dict:  # in the worker: its pid, log files and named semaphores
        import os

        with open("/proc/self/maps") as maps:  # a semaphore is mapped under a temporary name: by inode
            inodes = {int(line.split()[4]) for line in maps if "/dev/shm/sem." in line}
        sems = [e.path for e in os.scandir("/dev/shm") if e.name.startswith("sem.") and e.inode() in inodes]
        return {"pid": os.getpid(), "logs": [os.readlink(f"/proc/self/fd/{fd}") for fd in (1, 2)], "sems": sems}

    cfg = load_config(None, ["rewards.num_workers=1"])
    pool = RewardPool(cfg, {"math": MathDataset(train=(), eval=())})
    samples = [sample("q", "</think><answer>x^2+2x+1</answer>")]  # math-verify, in a checker process
    assert pool.score(samples, {"q": Problem("q", "math", "?", "(x+1)^2")}, timeout_s=60) == ["correct"]
    own = ray.get(pool.workers[0].__ray_call__.remote(own_files), timeout=60)
    assert own["sems"] and all(Path(log).is_file() for log in own["logs"])
    pool.shutdown()
    del pool  # as a run lets go of its actors
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            os.kill(own["pid"], 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"the reward worker (pid {own['pid']}) did not exit")
    time.sleep(0.5)  # what its exit might still write
    assert [s for s in own["sems"] if Path(s).exists()] == []
    for log in own["logs"]:
        assert "Traceback" not in Path(log).read_text(), Path(log).read_text()[-2000:]
