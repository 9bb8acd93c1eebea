"""The reward workers of a run: Ray actors over `rewards.worker.RewardWorker`.

`score` splits a step's samples into contiguous chunks, one per worker, and fills in each
sample's reward and breakdown. A worker's checker processes are replaced inside it when they
crash or overrun; a worker actor that dies itself (out of memory, killed) is replaced here
and its chunk scored again, once per call, so a run does not stop for a lost reward worker.
"""

from __future__ import annotations

import numpy as np

from cluster.config import Config


class RewardPool:
    def __init__(self, cfg: Config, tasks: dict):
        self.cfg, self.tasks = cfg, tasks
        self.workers = [self._start() for _ in range(cfg.rewards.num_workers)]
        self.restarts = 0

    def _start(self):
        import ray

        from rewards.worker import RewardWorker

        from cluster.placement import requests

        return ray.remote(RewardWorker).options(**requests(self.cfg)["reward"].options()).remote(
            self.cfg.rewards, self.tasks, self.cfg.rollout.max_new_tokens)

    def ready_refs(self) -> list:
        return [w.__ray_ready__.remote() for w in self.workers]

    def score(self, samples: list, problems: dict, timeout_s: float) -> list[str]:
        """Fill in each sample's reward and breakdown from `problems[sample.prompt_id]`;
        returns the checkers' reasons in sample order."""
        import ray

        chunks = [c for c in np.array_split(np.arange(len(samples)), len(self.workers)) if len(c)]
        futures = [self._submit(w, samples, problems, idx) for w, idx in zip(self.workers, chunks)]
        reasons = [""] * len(samples)
        for k, (idx, future) in enumerate(zip(chunks, futures)):
            try:
                scores = ray.get(future, timeout=timeout_s)
            except ray.exceptions.RayActorError as err:
                print(f"r1ray: reward worker {k} died ({type(err).__name__}); replacing it", flush=True)
                ray.kill(self.workers[k])
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
