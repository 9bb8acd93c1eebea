"""The reward worker's weighting of the checker and format scores (a plain class: no Ray here)."""

import pytest

from cluster.config import RewardsConfig
from rewards.worker import RewardWorker


def test_weighted_total_and_breakdown():
    worker = RewardWorker(RewardsConfig(correct_weight=1.0, format_weight=0.1))
    right, wrong_but_formatted, unformatted = worker.score(
        ["7+8=15 4+3+1=8</think><answer>85</answer>",
         "7+8=15</think><answer>84</answer>",
         "85"],
        ["85", "85", "85"])
    assert (right.reward, right.breakdown) == (pytest.approx(1.1), {"correct": 1.0, "format": 1.0})
    assert (wrong_but_formatted.reward, wrong_but_formatted.reason) == (pytest.approx(0.1), "wrong: got 84")
    # No answer tag: nothing is scored, not even a bare correct number.
    assert (unformatted.reward, unformatted.breakdown) == (0.0, {"correct": 0.0, "format": 0.0})


def test_length_mismatch_is_an_error():
    with pytest.raises(ValueError, match="2 responses but 1 gold answers"):
        RewardWorker(RewardsConfig()).score(["a", "b"], ["1"])
