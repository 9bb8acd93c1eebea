"""cluster/curriculum.py: which prompts a step draws, on real task mixtures (the samples are
made here: only their prompt ids and `correct` verdicts are read)."""

import json
import random

import numpy as np
import pytest

from cluster.config import load_config
from cluster.curriculum import FLOOR, Curriculum
from common.records import Sample
from rewards.tasks import build_mixture

G = 4


def mixture(*overrides):
    cfg = load_config(None, [f"algorithm.group_size={G}", *overrides])
    return build_mixture(cfg.task), cfg.algorithm


def answers(problem, rights: list[bool]) -> list[Sample]:
    """A scored group (a stand-in for the engines' and reward workers' output)."""
    empty = np.zeros(0, dtype=np.int32)
    return [Sample(problem.id, empty, empty, np.zeros(0, dtype=np.float32), "", "stop", 0,
                   reward=float(r), reward_breakdown={"correct": float(r)}) for r in rights]


def test_with_both_off_the_draw_is_the_mixtures_own():
    # The default: the same problems from the same generator state as before the curriculum
    # existed, so default runs (and their checkpoints) draw exactly what they drew.
    tasks, algo = mixture("task.countdown.weight=1.0")
    prompts = Curriculum(tasks, algo)
    got = [p.id for _ in range(3) for p in prompts.draw(random.Random(7), 16)]
    want = [p.id for _ in range(3) for p in tasks.sample(random.Random(7), 16)]
    assert got == want
    assert prompts.metrics() == {}


def test_the_filter_skips_exactly_the_prompts_whose_answers_all_scored_alike():
    tasks, algo = mixture("task.arithmetic.max_digits=1", "algorithm.prompt_filter=skip")  # 100 problems
    prompts = Curriculum(tasks, algo)
    pool = {p.id: p for p in tasks.sample(random.Random(0), 400)}
    ids = sorted(pool)
    solved, failed, mixed = ids[0::3], ids[1::3], ids[2::3]
    for i in solved:
        prompts.record([pool[i]], answers(pool[i], [True] * G))
    for i in failed:
        prompts.record([pool[i]], answers(pool[i], [False] * G))
    for i in mixed:
        prompts.record([pool[i]], answers(pool[i], [True, False, True, True]))
    prompts.metrics()  # counts from here on
    assert all(prompts.settled(i) for i in solved + failed) and not any(prompts.settled(i) for i in mixed)
    # Fewer answers than a group: not yet known to be settled.
    short = Curriculum(tasks, algo)
    short.record([pool[ids[0]]], answers(pool[ids[0]], [True] * (G - 1)))
    assert not short.settled(ids[0])

    drawn = prompts.draw(random.Random(3), 50)
    assert not any(prompts.settled(p.id) for p in drawn)
    # The same generator, replayed one draw at a time: the skips are the settled draws before each kept one.
    rng, skipped, total = random.Random(3), 0, 0
    for kept in drawn:
        while True:
            (p,) = tasks.sample(rng, 1)
            total += 1
            if p.id == kept.id and not prompts.settled(p.id):
                break
            skipped += 1
    assert prompts.metrics() == {"prompts/skipped": skipped / total}
    assert skipped > 0


def test_the_curriculum_weights_tasks_by_learnability_from_running_pass_rates():
    tasks, algo = mixture("task.countdown.weight=1.0", "algorithm.curriculum=learnability")
    prompts = Curriculum(tasks, algo)
    base = tasks.weights  # arithmetic 1, countdown 1
    assert prompts.weights() == base  # unscored: p = 1/2, 4p(1-p) = 1
    rng = random.Random(0)
    (a,), (c,) = tasks.sample(rng, 1, names=["arithmetic"]), tasks.sample(rng, 1, names=["countdown"])
    # Step 1: arithmetic 3 of 4 right (p = 0.75 -> 4 * 0.75 * 0.25 = 0.75), countdown 0 of 4 (p = 0 -> FLOOR).
    prompts.record([a, c], answers(a, [True, True, True, False]) + answers(c, [False] * G))
    assert prompts.weights() == pytest.approx({"arithmetic": 0.75 * base["arithmetic"],
                                               "countdown": FLOOR * base["countdown"]})
    # Step 2: countdown 2 of 4 right: p = 0.9 * 0 + 0.1 * 0.5 = 0.05 -> 4 * 0.05 * 0.95 = 0.19.
    prompts.record([c], answers(c, [True, False, True, False]))
    assert prompts.pass_rate == pytest.approx({"arithmetic": 0.75, "countdown": 0.05})
    assert prompts.weights()["countdown"] == pytest.approx(0.19 * base["countdown"])
    m = prompts.metrics()
    assert m["curriculum/countdown/weight"] == pytest.approx(0.19 / (0.75 + 0.19))
    assert m["curriculum/arithmetic/pass_rate"] == 0.75
    # The draw follows the weights: over 2000 prompts arithmetic's share is 0.75 / 0.94 = 0.798.
    share = np.mean([p.task == "arithmetic" for p in prompts.draw(random.Random(1), 2000)])
    assert share == pytest.approx(0.75 / 0.94, abs=0.03)


def test_a_resumed_curriculum_draws_what_the_run_would_have():
    tasks, algo = mixture("task.arithmetic.max_digits=1", "task.countdown.weight=1.0",
                          "algorithm.prompt_filter=skip", "algorithm.curriculum=learnability")
    run = Curriculum(tasks, algo)
    rng = random.Random(5)
    for step in range(3):
        problems = run.draw(rng, 8)
        run.record(problems, [s for i, p in enumerate(problems) for s in answers(p, [i % 3 == 0] * G)])
    saved, rng_state = json.loads(json.dumps(run.state())), rng.getstate()  # as a checkpoint keeps them
    resumed = Curriculum(tasks, algo)
    resumed.load(saved)
    again = random.Random()
    again.setstate(rng_state)
    assert [p.id for p in resumed.draw(again, 32)] == [p.id for p in run.draw(rng, 32)]
