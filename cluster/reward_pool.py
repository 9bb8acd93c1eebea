"""The reward workers of a run: Ray actors over `rewards.worker.RewardWorker`.

`score` splits a step's samples into contiguous chunks, one per worker, and fills in each
sample's reward and breakdown. A worker's checker processes are replaced inside it when they
crash or overrun. A worker actor that dies itself (out of memory, killed) or hangs (no answer
for `cluster.deadline_s`, cluster/faults.py) is replaced here and its chunk scored again; the preference model's
actor likewise (the workers find it by name, so they reach its replacement). Each is charged to
the run's faults (`rewards.max_restarts`, cluster/faults.py): scores are a pure function of the
answer, so a run that lost a worker scores exactly as one that did not.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Callable

import numpy as np

from cluster import faults
from cluster.config import Config
from cluster.faults import NO_FAULTS, Faults


class RewardPool:
    def __init__(self, cfg: Config, tasks: dict, render: Callable[[str], str] | None = None,
                 account: Faults = NO_FAULTS):
        """`render` turns a question into the prompt text the policy saw, which the preference
        model reads before the answer: a training pool passes it, and then tasks without a
        verifier need `rewards.preference_model`. An evaluation pool (None) scores those tasks
        by their reference answers only (`correct`). `account`: the run's faults."""
        self.cfg, self.tasks, self.faults = cfg, tasks, account
        self.preference = _start_preference(cfg, tasks, render)
        self.workers = [self._start() for _ in range(cfg.rewards.num_workers)]

    def _start(self):
        from cluster.placement import requests
        from rewards.worker import RewardWorker

        return faults.remote(RewardWorker).options(**requests(self.cfg)["reward"].options()).remote(
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
        faults.inject("score", "reward", self.workers)
        faults.inject("score", "preference", [self.preference.actor] if self.preference else [])
        return Scoring(samples, problems, parts)

    def collect(self, scoring: "Scoring", timeout_s: float) -> list[str]:
        """Wait for `scoring`, fill in its samples' rewards and breakdowns; their reasons. A
        worker (or the preference scorer) that died or hung is replaced and its part scored
        again, until `rewards.max_restarts` is spent."""
        import ray

        samples, problems, reasons = scoring.samples, scoring.problems, [""] * len(scoring.samples)
        deadline = self.cfg.cluster.deadline_s
        for k, worker, idx, future in scoring.parts:
            asked = time.monotonic()
            while True:
                ready, _ = ray.wait([future], timeout=deadline / 2)
                try:
                    if ready:
                        scores = ray.get(future)
                        break
                    cause = faults.hung(worker, deadline, time.monotonic() - asked, timeout_s)
                    if cause is None:  # busy
                        continue
                    worker = self._replace(k, worker, cause, len(idx))
                except ray.exceptions.RayTaskError as err:  # the worker lives; its call failed (caught
                    # first: the preference scorer's death, met in the worker's call to it, is both)
                    if self.preference is None or not faults.unresponsive([self.preference.actor], deadline):
                        raise  # a checker's own error: not a fault of an actor
                    self.faults.charge("preference", None, "scoring", faults.cause_of(err),
                                       f"replaced it, its {len(idx)} sample(s) scored again")
                    self.preference.restart()
                except ray.exceptions.RayActorError as err:
                    worker = self._replace(k, worker, faults.cause_of(err), len(idx))
                future, asked = self._submit(worker, samples, problems, idx), time.monotonic()
            for i, s in zip(idx, scores):
                samples[i].reward, samples[i].reward_breakdown, reasons[i] = s.reward, s.breakdown, s.reason
        return reasons

    def _replace(self, k: int, worker, cause: str, n: int):
        """Worker `k` (`worker`) died or hung: replace it, unless that was done already while an
        earlier part was collected; returns the worker to ask again."""
        import ray

        if self.workers[k] is worker:
            self.faults.charge("reward", k, "scoring", cause, f"replaced it, its {n} sample(s) scored again")
            ray.kill(worker)
            self.workers[k] = self._start()
        return self.workers[k]

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
    it. One actor serves every worker, batching each call's answers. The workers look it up by
    its name, so that after `restart` (in the driver) they reach the new one."""

    name: str
    start: Callable[[], object]
    render: Callable[[str], str]
    timeout_s: float
    actor: object = None

    def __post_init__(self):
        self.actor = self.actor or self.start()

    def restart(self) -> None:
        """A new scorer under the same name (not waited for: one that dies while it starts
        fails the next call, which the pool handles as another death)."""
        import ray

        ray.kill(self.actor)
        self.actor = self.start()

    def __getstate__(self) -> dict:  # what a worker gets: the name, not the driver's way to start one
        return {"name": self.name, "start": None, "render": self.render, "timeout_s": self.timeout_s,
                "actor": None}

    def __call__(self, questions: list[str], responses: list[str]) -> list[float]:
        import ray

        actor = ray.get_actor(self.name)
        return ray.get(actor.score.remote([self.render(q) for q in questions], responses), timeout=self.timeout_s)


def _start_preference(cfg: Config, tasks: dict, render: Callable[[str], str] | None) -> RemotePreference | None:
    """The preference-model actor, when a task has no verifier; else None."""
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
    name = f"r1ray-preference-{uuid.uuid4().hex[:12]}"
    start = lambda: faults.remote(PreferenceScorer).options(num_cpus=0, name=name).remote(  # noqa: E731
        r.preference_model, r.preference_normalize, r.preference_batch, cfg.rollout.max_model_len,
        clip=r.preference_clip)
    return RemotePreference(name, start, render, cfg.cluster.timeout_s)
