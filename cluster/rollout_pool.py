"""The rollout actors of a run: started together, a step's prompts sharded over them.

`generate` cuts the prompt list into contiguous shards, one per actor, and concatenates
the results in prompt order (`stream` hands them on group by group as the engines finish);
a group of G answers is never split, so each comes from one engine and one weight version.
Prompt i of the step is seeded `seed + i` whichever engine samples it, so vLLM engines
return the same answers however many there are.

When an actor dies mid-generate the call raises `EngineDiedError` with the actor's own
error; the driver may `restart` it (a fresh actor on the initial weights, which the weight
sync then brings to the current version) and try the step again.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np

from cluster.config import Config
from common.records import Sample, Sampling


class EngineDiedError(RuntimeError):
    """A rollout actor died (its process exited or was killed) during a call."""

    def __init__(self, index: int, cause: str):
        super().__init__(f"rollout engine {index} died: {cause}")
        self.index, self.reason = index, cause


class RolloutPool:
    def __init__(self, cfg: Config, model_path: str, placement_group=None):
        """`placement_group`: one bundle per actor (cluster.placement.rollout_group), or None
        to let Ray place them."""
        self.cfg, self.model_path, self.pg = cfg, model_path, placement_group
        self.restarts_left = cfg.rollout.max_restarts
        self.actors = [self._start(i) for i in range(cfg.rollout.num_engines)]

    def _start(self, index: int):
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from actors.rollout import RolloutActor, actor_env
        from cluster.placement import requests

        r = self.cfg.rollout
        strategy = None if self.pg is None else PlacementGroupSchedulingStrategy(
            self.pg, placement_group_bundle_index=index)
        return ray.remote(RolloutActor).options(
            **requests(self.cfg)["rollout"].options(), runtime_env={"env_vars": actor_env(r)}, scheduling_strategy=strategy,
        ).remote(self.model_path, r, self.cfg.algorithm.seed + index, self.cfg.learner.dtype, index,
                 self.cfg.cluster.colocate)

    def ready_refs(self) -> list:
        return [a.__ray_ready__.remote() for a in self.actors]

    def generate(self, prompt_ids: list[str], prompts: list[str], sampling: Sampling,
                 timeout_s: float) -> list[Sample]:
        """`sampling.n` samples per prompt over all engines, in prompt order."""
        done = sorted((pair for chunk in self.stream(prompt_ids, prompts, sampling, timeout_s) for pair in chunk),
                      key=lambda pair: pair[0])
        return [s for _, group in done for s in group]

    def stream(self, prompt_ids: list[str], prompts: list[str], sampling: Sampling,
               timeout_s: float) -> Iterator[list[tuple[int, list[Sample]]]]:
        """`generate`'s groups as the engines finish them: lists of (the prompt's index in
        `prompts`, its samples), in finishing order; `timeout_s` bounds each wait."""
        import ray

        if len(prompt_ids) != len(prompts):
            raise ValueError(f"{len(prompt_ids)} prompt ids for {len(prompts)} prompts")
        shards = [s for s in np.array_split(np.arange(len(prompts)), len(self.actors)) if len(s)]
        streams = [  # (the actor's stream of finished groups, its index, its shard's first prompt)
            (actor.generate_stream.options(num_returns="streaming").remote(
                [prompt_ids[i] for i in idx], [prompts[i] for i in idx], _shifted(sampling, int(idx[0]))),
             index, int(idx[0]))
            for index, (actor, idx) in enumerate(zip(self.actors, shards))
        ]
        while streams:
            ready, _ = ray.wait([s for s, _, _ in streams], num_returns=1, timeout=timeout_s)
            if not ready:
                raise ray.exceptions.GetTimeoutError(f"no rollout engine returned anything in {timeout_s}s")
            k = next(k for k, (s, _, _) in enumerate(streams) if s is ready[0])
            stream, index, offset = streams[k]
            try:
                done = ray.get(next(stream), timeout=timeout_s)
            except StopIteration:
                streams.pop(k)
                continue
            except ray.exceptions.RayActorError as err:
                raise EngineDiedError(index, _cause(err)) from None
            yield [(offset + i, samples) for i, samples in done]

    @contextlib.contextmanager
    def asleep(self):
        """Colocated (`cluster.colocate`): every engine sleeps for the duration, its device
        memory free for the learner beside it, and wakes at the end. Otherwise nothing."""
        import ray

        if not self.cfg.cluster.colocate:
            yield
            return
        ray.get([a.sleep.remote() for a in self.actors], timeout=self.cfg.cluster.timeout_s)
        try:
            yield
        finally:
            ray.get([a.wake.remote() for a in self.actors], timeout=self.cfg.cluster.timeout_s)

    def shutdown(self) -> None:
        """Stop every rollout actor (their CPUs go back to the cluster); colocated, the
        placement group is the learner's, which frees it."""
        from cluster.placement import release

        release(self.actors, None if self.cfg.cluster.colocate else self.pg)

    def restart(self, index: int) -> None:
        """Replace actor `index` with a fresh one (initial weights, version 0)."""
        import ray

        if self.restarts_left <= 0:
            raise RuntimeError("no restarts left (rollout.max_restarts)")
        self.restarts_left -= 1
        ray.kill(self.actors[index])
        self.actors[index] = self._start(index)
        ray.get(self.actors[index].__ray_ready__.remote(), timeout=self.cfg.cluster.timeout_s)


def _shifted(sampling: Sampling, offset: int) -> Sampling:
    """The shard starting at prompt `offset` seeds its first prompt `seed + offset`."""
    from dataclasses import replace

    return replace(sampling, seed=sampling.seed + offset)


def _cause(err: Exception) -> str:
    text = str(err).strip()
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else type(err).__name__
