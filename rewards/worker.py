"""The reward worker: scores a batch of responses, each check in a process it can kill.

The driver runs `rewards.num_workers` of these as Ray actors (`cluster.reward_pool.RewardPool`)
and splits each step's samples among them. The worker itself imports no Ray: it is a plain
class over the tasks' pure checkers, so it is tested directly.

Each response is checked by its problem's task in one of `rewards.processes` worker
processes, under a hard limit of `rewards.timeout_s`: a check that overruns has its process
killed, one that crashes the process (a segfault in a parser, `os._exit`) or raises is
caught, and in every case that sample scores 0 with the reason, the process is replaced and
the batch goes on. Checkers therefore need no time limits of their own.

Total reward = correct_weight * correct + format_weight * format
             + language_weight * language + length_weight * length,
with correct, format and language in [0, 1] and the overlong penalty `length` in [-1, 0].
For a task with no rule verifier (task.general) the preference model's normalised score
takes the place of `correct` in the total (reported as `preference`); `correct` is then the
evaluation-only comparison with a reference answer, which no reward reads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from rewards.config import RewardsConfig
from rewards.format import format_reward
from rewards.language import language_consistency

_TASKS: dict = {}  # a checker process's tasks, installed once when it starts


@dataclass(frozen=True)
class Score:
    reward: float
    """Weighted total."""
    breakdown: dict[str, float]
    """Unweighted components: {"correct": 0..1, "format": 0 or 1, "language": 0..1,
    "length": -1..0}."""
    reason: str
    """Short verdict of the task's checker, e.g. "wrong: got 84" or "timeout"."""


def overlong_penalty(length: int, max_tokens: int, buffer: int) -> float:
    """DAPO's soft overlong punishment: 0 up to `max_tokens - buffer` tokens, then falling
    linearly to -1 at `max_tokens` (with no buffer, -1 exactly at the budget)."""
    if buffer == 0:
        return -1.0 if length >= max_tokens else 0.0
    over = length - (max_tokens - buffer)
    return -min(1.0, over / buffer) if over > 0 else 0.0


def _install(tasks: dict) -> None:
    _TASKS.update(tasks)


def _check(task: str, response: str, problem) -> tuple[float, str]:
    score, reason = _TASKS[task].check(response, problem)
    return float(score), reason


class RewardWorker:
    def __init__(self, cfg: RewardsConfig, tasks: dict, max_new_tokens: int,
                 preference: Callable[[list[str], list[str]], list[float]] | None = None):
        """`preference(questions, responses)` scores answers of tasks without a verifier
        (normalised); a run with such tasks must pass one."""
        import multiprocessing

        from pebble import ProcessPool

        from rewards.tasks import without_verifier

        self.cfg, self.tasks, self.max_new_tokens = cfg, tasks, max_new_tokens
        self.preference, self.unverified = preference, set(without_verifier(tasks))
        # Spawned, not forked: the worker is a threaded Ray process.
        self.pool = ProcessPool(max_workers=cfg.processes, initializer=_install, initargs=(tasks,),
                                context=multiprocessing.get_context("spawn"))

    def score(self, responses: list[str], problems: list, lengths: list[int] | None = None) -> list[Score]:
        """Score each response against the problem at the same position; `lengths` are the
        responses' token counts (for the overlong penalty; 0 if not given)."""
        if len(responses) != len(problems):
            raise ValueError(f"{len(responses)} responses but {len(problems)} problems")
        lengths = lengths if lengths is not None else [0] * len(responses)
        unknown = sorted({p.task for p in problems} - set(self.tasks))
        if unknown:
            raise ValueError(f"no checker for task(s) {', '.join(unknown)}; this worker has {', '.join(self.tasks)}")
        futures = [self.pool.schedule(_check, args=(p.task, r, p), timeout=self.cfg.timeout_s)
                   for r, p in zip(responses, problems)]
        judged = [i for i, p in enumerate(problems) if p.task in self.unverified]
        preferred: dict[int, float] = {}
        if judged and self.preference is not None:  # while the checkers run
            scores = self.preference([problems[i].prompt for i in judged], [responses[i] for i in judged])
            preferred = dict(zip(judged, scores))
        return [self._total(r, *self._verdict(f), n, preferred.get(i))
                for i, (r, f, n) in enumerate(zip(responses, futures, lengths))]

    def _verdict(self, future) -> tuple[float, str]:
        from concurrent.futures import TimeoutError as FutureTimeout

        from pebble import ProcessExpired

        try:
            return future.result()
        except FutureTimeout:
            return 0.0, f"timeout: no verdict within {self.cfg.timeout_s:g}s"
        except ProcessExpired as err:
            return 0.0, f"crashed: checker process exited with code {err.exitcode}"
        except Exception as err:  # the checker raised: the answer is not scorable
            return 0.0, f"error: {type(err).__name__}: {str(err)[:200]}"

    def _total(self, response: str, correct: float, reason: str, length: int,
               preference: float | None = None) -> Score:
        fmt, _ = format_reward(response)
        lang, _ = language_consistency(response, self.cfg.language)
        long = overlong_penalty(length, self.max_new_tokens, self.cfg.overlong_buffer)
        c = self.cfg
        judged = correct if preference is None else preference
        total = (c.correct_weight * judged + c.format_weight * fmt + c.language_weight * lang
                 + c.length_weight * long)
        parts = {"correct": correct, "format": fmt, "language": lang, "length": long}
        if preference is not None:
            parts["preference"] = float(preference)
        return Score(total, parts, reason)

    def close(self) -> None:
        """Stop the checker processes and unlink the pool's semaphores. An actor must be closed
        before its process exits (`RewardPool.shutdown` does): see there."""
        self.pool.stop()
        self.pool.join()
