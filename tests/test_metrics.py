"""Per-step rollout metrics: R1-Zero's reflective-phrase rate, and reward parts that only some
tasks have (the preference score)."""

import numpy as np
import pytest

from actors.records import Sample
from cluster.metrics import reflects, rollout_metrics


@pytest.mark.parametrize("response, expected", [
    ("7+8=15 wait, 7+8=15 4+3+1=8</think><answer>85</answer>", True),
    ("Let me check: 4+3=7</think><answer>7</answer>", True),
    ("I verify the sum</think><answer>7</answer>", True),
    ("the waiter adds 4+3</think><answer>7</answer>", False),  # whole words only
    ("4+3=7</think><answer>7</answer> wait", False),  # after the reasoning does not count
])
def test_reflective_phrases_are_found_in_the_reasoning_only(response, expected):
    assert reflects(response) is expected


def _sample(text, breakdown, n=4):
    return Sample("p", np.zeros(2, np.int32), np.zeros(n, np.int32), np.zeros(n, np.float32), text, "stop", 0,
                  reward=sum(breakdown.values()), reward_breakdown=breakdown)


def test_step_metrics_average_each_reward_part_over_the_samples_that_have_it():
    samples = [_sample("wait</think>", {"correct": 1.0, "format": 1.0}),
               _sample("x</think>", {"correct": 0.0, "format": 1.0, "preference": 0.8}, n=6),
               _sample("x</think>", {"correct": 0.0, "format": 0.0, "preference": 0.4}, n=8),
               _sample("x</think>", {"correct": 1.0, "format": 0.0})]
    m = rollout_metrics(samples, group_size=2)
    assert m["reward/correct"] == 0.5 and m["reward/preference"] == pytest.approx(0.6)
    assert m["rollout/reflection_rate"] == 0.25 and m["response_length/mean"] == 5.5
