"""The reward worker: weighting, and checks that hang, crash or raise scoring 0 with a reason
while the rest of the batch, and the next one, are scored (a plain class: no Ray here)."""

import os
import time

import pytest

from rewards.arithmetic import ArithmeticTask
from rewards.config import RewardsConfig
from rewards.tasks import Arithmetic, Problem
from rewards.worker import RewardWorker, overlong_penalty

ADD = Arithmetic(ArithmeticTask())


def problem(answer: str, task: str = "arithmetic") -> Problem:
    return Problem(f"p{answer}", task, "?", ADD.generator._problem((int(answer), 0)))


# Stand-in tasks (unit-test doubles for a checker that misbehaves); module level so that the
# worker's spawned processes can unpickle them.
class Hangs:
    def check(self, response, problem):
        while True:
            pass


class Crashes:
    def check(self, response, problem):
        os._exit(3)


class Raises:
    def check(self, response, problem):
        raise RecursionError("maximum recursion depth exceeded")


@pytest.fixture
def worker(request):
    cfg = getattr(request, "param", RewardsConfig(correct_weight=1.0, format_weight=0.1, timeout_s=2.0))
    w = RewardWorker(cfg, {"arithmetic": ADD, "hangs": Hangs(), "crashes": Crashes(), "raises": Raises()},
                     max_new_tokens=32)
    yield w
    w.close()


def test_weighted_total_and_breakdown(worker):
    right, wrong_but_formatted, unformatted = worker.score(
        ["7+8=15 4+3+1=8</think><answer>85</answer>", "7+8=15</think><answer>84</answer>", "85"],
        [problem("85")] * 3)
    assert (right.reward, right.breakdown) == (pytest.approx(1.1), {"correct": 1.0, "format": 1.0,
                                                                      "language": 1.0, "length": 0.0})
    assert (wrong_but_formatted.reward, wrong_but_formatted.reason) == (pytest.approx(0.1), "wrong: got 84")
    # No answer tag: nothing is scored, not even a bare correct number.
    assert (unformatted.reward, unformatted.breakdown["correct"], unformatted.breakdown["format"]) == (0.0, 0.0, 0.0)


def test_length_mismatch_and_unknown_tasks_are_errors(worker):
    with pytest.raises(ValueError, match="2 responses but 1 problems"):
        worker.score(["a", "b"], [problem("1")])
    with pytest.raises(ValueError, match="no checker for task.* poetry"):
        worker.score(["a"], [problem("1", task="poetry")])


def test_hang_crash_and_exception_score_zero_and_the_batch_goes_on(worker):
    good = "x</think><answer>5</answer>"
    start = time.monotonic()
    scores = worker.score([good] * 4, [problem("5", "hangs"), problem("5", "crashes"), problem("5", "raises"),
                                       problem("5")])
    assert time.monotonic() - start < 8.0
    assert [s.breakdown["correct"] for s in scores] == [0.0, 0.0, 0.0, 1.0]
    assert scores[0].reason == "timeout: no verdict within 2s"
    assert scores[1].reason == "crashed: checker process exited with code 3"
    assert scores[2].reason.startswith("error: RecursionError: maximum recursion depth")
    # The killed and crashed processes were replaced: the next batch is scored as usual.
    again = worker.score([good, "x</think><answer>4</answer>"], [problem("5"), problem("5")])
    assert [s.reason for s in again] == ["correct", "wrong: got 4"]


@pytest.mark.parametrize("worker", [RewardsConfig(correct_weight=1.0, format_weight=0.0, language_weight=0.5,
                                                  language="en")], indirect=True)
def test_language_bonus_is_weighted_into_the_total(worker):
    english, mixed = worker.score(["add the units 7+8=15</think><answer>15</answer>",
                                   "add 个位 7+8=15</think><answer>15</answer>"], [problem("15")] * 2)
    assert english.reward == pytest.approx(1.5) and english.breakdown["language"] == 1.0
    # Words of the reasoning: "add", "个", "位": one of three is English.
    assert (mixed.reward, mixed.breakdown["language"]) == (pytest.approx(1 + 0.5 / 3), pytest.approx(1 / 3))


@pytest.mark.parametrize("worker", [RewardsConfig(correct_weight=1.0, format_weight=0.0, length_weight=0.5,
                                                  overlong_buffer=8)], indirect=True)
def test_overlong_answers_are_penalised(worker):
    short, long = worker.score(["x</think><answer>5</answer>"] * 2, [problem("5")] * 2, lengths=[24, 28])
    assert short.reward == 1.0 and long.breakdown["length"] == -0.5 and long.reward == pytest.approx(0.75)


def test_overlong_penalty_shape():
    assert [overlong_penalty(n, 32, 8) for n in (10, 24, 26, 32, 40)] == [0.0, 0.0, -0.25, -1.0, -1.0]
    assert [overlong_penalty(n, 32, 0) for n in (31, 32)] == [0.0, -1.0]


def test_hostile_responses_score_fast(worker):
    hostile = ["", "\x00" * 1000, "\ufffd" * 10, "<answer>" * 100_000, "x" * 1_000_000 + "</think><answer>5</answer>",
               "{" * 50_000 + "</think><answer>5" + "}" * 50_000 + "</answer>"]
    start = time.monotonic()
    scores = worker.score(hostile, [problem("5")] * len(hostile))
    assert time.monotonic() - start < 5.0
    assert [s.breakdown["correct"] for s in scores] == [0, 0, 0, 0, 1, 0]
    assert all(s.reason for s in scores)


def test_a_math_power_tower_is_killed_at_the_limit_and_symbolic_answers_still_verify():
    from rewards.tasks import MathDataset

    math_task = MathDataset(train=(), eval=())
    worker = RewardWorker(RewardsConfig(timeout_s=3.0), {"math": math_task}, max_new_tokens=32)
    try:
        p = Problem("q", "math", "?", "(x+1)^2")
        start = time.monotonic()
        tower, symbolic = worker.score(["<answer>" + "9^" * 40 + "9</answer>", "<answer>x^2+2x+1</answer>"], [p, p])
        assert time.monotonic() - start < 15
        assert (tower.breakdown["correct"], tower.reason) == (0.0, "timeout: no verdict within 3s")
        assert (symbolic.breakdown["correct"], symbolic.reason) == (1.0, "correct")
    finally:
        worker.close()


def test_tasks_without_a_verifier_are_scored_by_the_preference_model():
    """The preference score replaces `correct` in the total; `correct` stays the evaluation-only
    comparison with the reference answer, which no reward reads."""
    from rewards.tasks import General

    general = General((), ())
    asked = []

    def preference_stand_in(questions, responses):  # a unit-test double of the scorer actor
        asked.append((questions, responses))
        return [0.25] * len(responses)

    cfg = RewardsConfig(correct_weight=1.0, format_weight=0.1)
    w = RewardWorker(cfg, {"arithmetic": ADD, "general": general}, 32, preference_stand_in)
    try:
        sort = Problem("s", "general", "sort 3 1 2", "1 2 3")
        right = "in order</think><answer>1 2 3</answer>"
        got = w.score([right, right, "x</think><answer>85</answer>"], [sort, sort, problem("85")])
    finally:
        w.close()
    assert asked == [(["sort 3 1 2", "sort 3 1 2"], [right, right])]  # one batched call, general only
    assert got[0].reward == pytest.approx(0.25 + 0.1)
    assert got[0].breakdown["correct"] == 1.0 and got[0].breakdown["preference"] == 0.25
    assert got[2].reward == pytest.approx(1.1) and "preference" not in got[2].breakdown


def test_a_training_pool_refuses_unverified_tasks_without_a_preference_model():
    from cluster.config import ConfigError, load_config
    from cluster.reward_pool import _start_preference
    from rewards.tasks import General

    cfg = load_config(None, [])
    with pytest.raises(ConfigError, match="task.s. general have no rule verifier: set rewards.preference_model"):
        _start_preference(cfg, {"general": General((), ())}, str)
    assert _start_preference(cfg, {"general": General((), ())}, None) is None  # evaluation pools need none
