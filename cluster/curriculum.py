"""Which prompts a step trains on: online difficulty filtering and a task curriculum.

    prompts = Curriculum(tasks, cfg.algorithm)
    problems = prompts.draw(rng, 16)           # a step's prompts
    prompts.record(problems, samples)          # once they are scored
    metrics = prompts.metrics()                # prompts/*, curriculum/* since the last call

GRPO learns only from groups whose answers differ (learner/grpo.py, point 8): a prompt that
the policy always solves, or never does, costs a group's generation and teaches nothing.
- `algorithm.prompt_filter=skip` keeps each prompt's running pass rate (all its answers so
  far) and skips, drawing another in its place, a prompt whose answers (a group's worth at
  least) were all right or all wrong. Such a prompt is seen again only by the rare draw that
  runs out of tries (`MAX_TRIES` per prompt), so the run stays finite on a task the policy
  has mastered. The prompt's id is its identity: a procedurally generated task repeats few
  prompts in a run, and the filter then has little to act on (it counts its skips).
- `algorithm.curriculum=learnability` weights each task of the mixture by 4p(1-p), p its
  running pass rate (an exponential average over steps, `DECAY`), times its task weight, at
  least `FLOOR` of it: the expected share of groups with signal is highest where p is near
  1/2 (Foster and Foerster 2025, "Learning to reason at the frontier of learnability").

Both off, `draw` is the mixture's own draw, consuming the generator exactly as before. The
state (pass rates) is saved with a checkpoint, so a resumed run draws what the run would have.
An answer counts as right when its reward breakdown says so (`correct` >= 1); tasks scored
only by a preference model have no such verdict and are not tracked.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from common.records import Sample
from learner.config import AlgorithmConfig
from rewards.tasks import Mixture, Problem

MAX_TRIES = 20
"""Draws per prompt before a settled one is taken anyway."""
DECAY = 0.9
"""Weight of a task's previous pass rate in its running average, per step that drew it."""
FLOOR = 0.1
"""The least share of its task weight a task keeps under the curriculum."""


@dataclass
class Curriculum:
    tasks: Mixture
    algo: AlgorithmConfig
    answers: dict[str, list[int]] = field(default_factory=dict)
    """prompt id -> [answers seen, answers right]."""
    pass_rate: dict[str, float] = field(default_factory=dict)
    """task -> running pass rate (absent until the task was first scored)."""
    _drawn: int = 0
    _skipped: int = 0

    def draw(self, rng: random.Random, n: int) -> list[Problem]:
        """`n` train problems, by the curriculum's task weights, without settled prompts."""
        weights = self.weights() if self.algo.curriculum == "learnability" else None
        if self.algo.prompt_filter == "none":
            self._drawn += n
            return self.tasks.sample(rng, n, weights=weights)
        out = []
        while len(out) < n:
            for _ in range(MAX_TRIES):
                (problem,) = self.tasks.sample(rng, 1, weights=weights)
                self._drawn += 1
                if not self.settled(problem.id):
                    break
                self._skipped += 1
            out.append(problem)
        return out

    def settled(self, prompt_id: str) -> bool:
        """Whether every answer to this prompt so far, a group's worth at least, scored alike."""
        seen, right = self.answers.get(prompt_id, (0, 0))
        return seen >= self.algo.group_size and right in (0, seen)

    def weights(self) -> dict[str, float]:
        """Each task's weight: its task weight x max(4p(1-p), FLOOR); p = 1/2 while unscored."""
        return {name: w * max(4 * p * (1 - p), FLOOR)
                for name, w in self.tasks.weights.items() for p in [self.pass_rate.get(name, 0.5)]}

    def record(self, problems: list[Problem], samples: list[Sample]) -> None:
        """Count a step's scored answers into the prompts' and the tasks' pass rates."""
        task_of = {p.id: p.task for p in problems}
        per_task: dict[str, list[float]] = {}
        for s in samples:
            correct = s.reward_breakdown.get("correct")
            if correct is None:  # no verdict (a preference model's score)
                continue
            right = float(correct >= 1.0)
            counts = self.answers.setdefault(s.prompt_id, [0, 0])
            counts[0] += 1
            counts[1] += int(right)
            per_task.setdefault(task_of[s.prompt_id], []).append(right)
        for task, rights in sorted(per_task.items()):
            rate = sum(rights) / len(rights)
            self.pass_rate[task] = rate if task not in self.pass_rate else DECAY * self.pass_rate[task] + (
                1 - DECAY) * rate

    def metrics(self) -> dict[str, float]:
        """prompts/skipped (share of draws since the last call that were settled prompts,
        with the filter on), curriculum/<task>/{pass_rate,weight} (with the curriculum on)."""
        out = {}
        if self.algo.prompt_filter != "none":
            out["prompts/skipped"] = self._skipped / max(self._drawn, 1)
        if self.algo.curriculum != "none":
            weights = self.weights()
            total = sum(weights.values())
            for task, weight in sorted(weights.items()):
                out[f"curriculum/{task}/weight"] = weight / total
                if task in self.pass_rate:
                    out[f"curriculum/{task}/pass_rate"] = self.pass_rate[task]
        self._drawn = self._skipped = 0
        return out

    def state(self) -> dict:
        """What a checkpoint keeps (JSON)."""
        return {"answers": self.answers, "pass_rate": self.pass_rate}

    def load(self, state: dict | None) -> None:
        """Continue from `state` (a checkpoint's; None: one written before this was kept)."""
        state = state or {}
        self.answers = {k: list(v) for k, v in state.get("answers", {}).items()}
        self.pass_rate = dict(state.get("pass_rate", {}))
