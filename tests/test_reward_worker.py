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
    assert (right.reward, right.breakdown) == (pytest.approx(1.1), {"correct": 1.0, "format": 1.0,
                                                                      "language": 1.0})
    assert (wrong_but_formatted.reward, wrong_but_formatted.reason) == (pytest.approx(0.1), "wrong: got 84")
    # No answer tag: nothing is scored, not even a bare correct number.
    assert (unformatted.reward, unformatted.breakdown) == (0.0, {"correct": 0.0, "format": 0.0,
                                                                 "language": 1.0})


def test_length_mismatch_is_an_error():
    with pytest.raises(ValueError, match="2 responses but 1 gold answers"):
        RewardWorker(RewardsConfig()).score(["a", "b"], ["1"])


def test_language_bonus_is_weighted_into_the_total():
    worker = RewardWorker(RewardsConfig(correct_weight=1.0, format_weight=0.0, language_weight=0.5, language="en"))
    english, mixed = worker.score(["add the units 7+8=15</think><answer>15</answer>",
                                   "add 个位 7+8=15</think><answer>15</answer>"], ["15", "15"])
    assert english.reward == pytest.approx(1.5) and english.breakdown["language"] == 1.0
    # Words of the reasoning: "add", "个", "位": one of three is English.
    assert (mixed.reward, mixed.breakdown["language"]) == (pytest.approx(1 + 0.5 / 3), pytest.approx(1 / 3))
