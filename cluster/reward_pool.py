"""The reward workers of a run: Ray actors over `rewards.worker.RewardWorker`.

`score` splits a step's samples into contiguous chunks, one per worker, and fills in each
sample's reward and breakdown. A worker's checker processes are replaced inside it when they
crash or overrun; a worker actor that dies itself (out of memory, killed) is replaced here
and its chunk scored again, once per call, so a run does not stop for a lost reward worker.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from cluster.config import Config


class RewardPool:
    def __init__(self, cfg: Config, tasks: dict, render: Callable[[str], str] | None = None):
        """`render` turns a question into the prompt text the policy saw, which the preference
        model reads before the answer: a training pool passes it, and then tasks without a
        verifier need `rewards.preference_model`. An evaluation pool (None) scores those tasks
        by their reference answers only (`correct`)."""
        self.cfg, self.tasks = cfg, tasks
        self.preference = _start_preference(cfg, tasks, render)
        self.workers = [self._start() for _ in range(cfg.rewards.num_workers)]
        self.restarts = 0

    def _start(self):
        import ray

        from cluster.placement import requests
        from rewards.worker import RewardWorker

        return ray.remote(RewardWorker).options(**requests(self.cfg)["reward"].options()).remote(
            self.cfg.rewards, self.tasks, self.cfg.rollout.max_new_tokens, self.preference)

    def ready_refs(self) -> list:
        scorer = [self.preference.actor.__ray_ready__.remote()] if self.preference else []
        return [w.__ray_ready__.remote() for w in self.workers] + scorer

    def shutdown(self) -> None:
        """Stop the workers and the preference model's actor. Each worker closes its checker
        processes first (`RewardWorker.close`), while its multiprocessing resource tracker is
        still running: Ray kills an exiting actor's child processes, the tracker among them,
        before the actor's exit handlers run, so an open checker pool would leak its semaphores
        in /dev/shm (ray.kill runs no handlers) or, on a graceful exit, unregister them with a
        new tracker that never knew them, which prints a KeyError traceback for each."""
        import ray

        from cluster.placement import release

        closing = [w.close.remote() for w in self.workers]
        if closing:  # a dead worker's call fails at once: it has nothing left to close
            ray.wait(closing, num_returns=len(closing), timeout=self.cfg.cluster.timeout_s)
        release(self.workers + ([self.preference.actor] if self.preference else []))

    def score(self, samples: list, problems: dict, timeout_s: float) -> list[str]:
        """Fill in each sample's reward and breakdown from `problems[sample.prompt_id]`;
        returns the checkers' reasons in sample order."""
        return self.collect(self.submit(samples, problems), timeout_s)

    def submit(self, samples: list, problems: dict) -> "Scoring":
        """Start scoring `samples` (contiguous chunks, one per worker); `collect` waits for it."""
        chunks = [c for c in np.array_split(np.arange(len(samples)), len(self.workers)) if len(c)]
        parts = [(k, w, idx, self._submit(w, samples, problems, idx))
                 for k, (w, idx) in enumerate(zip(self.workers, chunks))]
        return Scoring(samples, problems, parts)

    def collect(self, scoring: "Scoring", timeout_s: float) -> list[str]:
        """Wait for `scoring`, fill in its samples' rewards and breakdowns; their reasons."""
        import ray

        samples, problems, reasons = scoring.samples, scoring.problems, [""] * len(scoring.samples)
        for k, worker, idx, future in scoring.parts:
            try:
                scores = ray.get(future, timeout=timeout_s)
            except ray.exceptions.RayActorError as err:
                if self.workers[k] is worker:  # not yet replaced while collecting an earlier part
                    print(f"r1ray: reward worker {k} died ({type(err).__name__}); replacing it", flush=True)
                    ray.kill(worker)
                    self.workers[k] = self._start()
                    self.restarts += 1
                scores = ray.get(self._submit(self.workers[k], samples, problems, idx), timeout=timeout_s)
            for i, s in zip(idx, scores):
                samples[i].reward, samples[i].reward_breakdown, reasons[i] = s.reward, s.breakdown, s.reason
        return reasons

    @staticmethod
    def _submit(worker, samples: list, problems: dict, idx):
        return worker.score.remote([samples[i].text for i in idx], [problems[samples[i].prompt_id] for i in idx],
                                   [len(samples[i].response_ids) for i in idx])


@dataclass
class Scoring:
    """Samples being scored: (worker index, worker, sample indices, pending result) per part."""

    samples: list
    problems: dict
    parts: list[tuple]


@dataclass
class RemotePreference:
    """The reward workers' handle on the preference-model actor (rewards/preference.py): a
    callable that scores (question, answer) pairs; it renders each question as the policy saw
    it. One actor serves every worker, batching each call's answers."""

    actor: object
    render: Callable[[str], str]
    timeout_s: float

    def __call__(self, questions: list[str], responses: list[str]) -> list[float]:
        import ray

        return ray.get(self.actor.score.remote([self.render(q) for q in questions], responses),
                       timeout=self.timeout_s)


def _start_preference(cfg: Config, tasks: dict, render: Callable[[str], str] | None) -> RemotePreference | None:
    """The preference-model actor, when a task has no verifier; else None."""
    import ray

    from common.config import ConfigError
    from rewards.preference import PreferenceScorer
    from rewards.tasks import without_verifier

    judged = without_verifier(tasks)
    if not judged or render is None:
        return None
    r = cfg.rewards
    if not r.preference_model:
        raise ConfigError(f"task(s) {', '.join(judged)} have no rule verifier: set rewards.preference_model "
                          "to a reward-model folder (r1ray train-rm) to score them")
    # No CPU of its own: the workers wait on it while it scores, so it runs in their share
    # (a reservation here would not fit the default 2-CPU layout).
    actor = ray.remote(PreferenceScorer).options(num_cpus=0).remote(
        r.preference_model, r.preference_normalize, r.preference_batch, cfg.rollout.max_model_len)
    return RemotePreference(actor, render, cfg.cluster.timeout_s)
