"""The reward worker: scores a batch of responses with the task's checker and the format rule.

The driver runs `rewards.num_workers` of these as Ray actors and splits each step's samples
among them. The worker itself imports no Ray: it is a plain class over pure verifiers, so it
is tested directly.

Total reward = correct_weight * correct + format_weight * format + language_weight * language,
each component in [0, 1].
"""

from __future__ import annotations

from dataclasses import dataclass

from cluster.config import RewardsConfig
from rewards import arithmetic
from rewards.format import format_reward
from rewards.language import language_consistency


@dataclass(frozen=True)
class Score:
    reward: float
    """Weighted total."""
    breakdown: dict[str, float]
    """Unweighted components: {"correct": 0 or 1, "format": 0 or 1, "language": 0..1}."""
    reason: str
    """Short human-readable verdict of the checker, e.g. "wrong: got 84"."""


class RewardWorker:
    def __init__(self, cfg: RewardsConfig):
        self.cfg = cfg

    def score(self, responses: list[str], answers: list[str]) -> list[Score]:
        """Score each response against the gold answer at the same position."""
        if len(responses) != len(answers):
            raise ValueError(f"{len(responses)} responses but {len(answers)} gold answers")
        return [self._score_one(r, a) for r, a in zip(responses, answers)]

    def _score_one(self, response: str, answer: str) -> Score:
        correct, reason = arithmetic.check(response, answer)
        fmt, _ = format_reward(response)
        lang, _ = language_consistency(response, self.cfg.language)
        total = (self.cfg.correct_weight * correct + self.cfg.format_weight * fmt
                 + self.cfg.language_weight * lang)
        return Score(total, {"correct": correct, "format": fmt, "language": lang}, reason)
