"""The rollout actors of a run: started together, a step's prompts sharded over them.

`generate` cuts the prompt list into contiguous shards, one per actor, and concatenates
the results in prompt order (`stream` hands them on group by group as the engines finish);
a group of G answers is never split, so each comes from one engine and one weight version.
Prompt i of the step is seeded `seed + i` whichever engine samples it, so vLLM engines
return the same answers however many there are.

An actor that dies or hangs is replaced in any phase (cluster/faults.py): `replace` starts a
fresh one (the model folder's weights, version 0) and charges the run's `Faults`. In a generate
call the pool's `revive` (set by the driver: bring the replaced engine to the weights the
others serve) is called and the dead engine's prompts are sampled again by the new one with
the same seeds, so the call returns what it would have; groups it had finished are not handed
on twice. Without `revive` (or with `redo=False`: the rollout that runs ahead while the learner
is between versions, whose weights cannot be sent then) the call raises `EngineDiedError`
after the replacement, and the driver redoes the work later.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator

import numpy as np

from cluster import faults
from cluster.config import Config
from cluster.faults import NO_FAULTS, Faults
from common.records import Sample, Sampling


class EngineDiedError(RuntimeError):
    """A rollout actor died (its process exited or was killed) during a call."""

    def __init__(self, index: int, cause: str):
        super().__init__(f"rollout engine {index} died: {cause}")
        self.index, self.reason = index, cause


class RolloutPool:
    def __init__(self, cfg: Config, model_path: str, placement_group=None, account: Faults = NO_FAULTS):
        """`placement_group`: one bundle per actor (cluster.placement.rollout_group), or None
        to let Ray place them. `account`: the run's faults, which bounds the replacements."""
        self.cfg, self.model_path, self.pg, self.faults = cfg, model_path, placement_group, account
        self.actors = [self._start(i) for i in range(cfg.rollout.num_engines)]
        self.revive: Callable[[int], None] | None = None
        """Brings engine i, just replaced (it serves version 0), to the weights the others
        serve; None where that cannot be done (see the module)."""

    def _start(self, index: int):
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from actors.rollout import RolloutActor, actor_env
        from cluster.placement import requests

        r = self.cfg.rollout
        strategy = None if self.pg is None else PlacementGroupSchedulingStrategy(
            self.pg, placement_group_bundle_index=index)
        return faults.remote(RolloutActor).options(
            **requests(self.cfg)["rollout"].options(), runtime_env={"env_vars": actor_env(r)}, scheduling_strategy=strategy,
        ).remote(self.model_path, r, self.cfg.algorithm.seed + index, self.cfg.learner.dtype, index,
                 self.cfg.cluster.colocate)

    def ready_refs(self) -> list:
        return [a.__ray_ready__.remote() for a in self.actors]

    def generate(self, prompt_ids: list[str], prompts: list[str], sampling: Sampling,
                 timeout_s: float, phase: str = "generating") -> list[Sample]:
        """`sampling.n` samples per prompt over all engines, in prompt order."""
        done = sorted((pair for chunk in self.stream(prompt_ids, prompts, sampling, timeout_s, phase)
                       for pair in chunk), key=lambda pair: pair[0])
        return [s for _, group in done for s in group]

    def stream(self, prompt_ids: list[str], prompts: list[str], sampling: Sampling, timeout_s: float,
               phase: str = "generating", redo: bool = True) -> Iterator[list[tuple[int, list[Sample]]]]:
        """`generate`'s groups as the engines finish them: lists of (the prompt's index in
        `prompts`, its samples), in finishing order. An engine that died, or is hung (it
        answers nothing for `cluster.deadline_s`, or returns no group for `timeout_s` though
        it answers: cluster/faults.py), is replaced and its shard sampled again (see the
        module)."""
        import ray

        if len(prompt_ids) != len(prompts):
            raise ValueError(f"{len(prompt_ids)} prompt ids for {len(prompts)} prompts")
        shards = [s for s in np.array_split(np.arange(len(prompts)), len(self.actors)) if len(s)]

        def call(index: int) -> ray.ObjectRefGenerator:
            idx = shards[index]
            return self.actors[index].generate_stream.options(num_returns="streaming").remote(
                [prompt_ids[i] for i in idx], [prompts[i] for i in idx], _shifted(sampling, int(idx[0])))

        streams = {index: call(index) for index in range(len(shards))}  # engine i samples shard i
        faults.inject("eval" if phase.startswith("evaluating") else "generate", "engine", self.actors)
        heard = dict.fromkeys(streams, time.monotonic())  # when each engine last answered: a group or a ping
        returned = dict(heard)  # when each engine last returned a group (or was given its shard)
        done: set[int] = set()  # prompts whose group was handed on
        deadline = self.cfg.cluster.deadline_s
        while streams:
            ready, _ = ray.wait(list(streams.values()), num_returns=1,
                                timeout=max(0.0, min(heard.values()) + deadline / 2 - time.monotonic()))
            if not ready:  # the engine silent the longest: busy, or hung?
                index = min(heard, key=heard.get)
                cause = faults.hung(self.actors[index], deadline, time.monotonic() - returned[index], timeout_s)
                if cause is not None:
                    self._lost(index, cause, phase, shards[index], done, redo)
                    streams[index], returned[index] = call(index), time.monotonic()
                heard[index] = time.monotonic()
                continue
            index = next(i for i, s in streams.items() if s is ready[0])
            try:
                finished = ray.get(next(streams[index]), timeout=timeout_s)
            except StopIteration:
                del streams[index], heard[index]
                continue
            except ray.exceptions.RayActorError as err:
                self._lost(index, faults.cause_of(err), phase, shards[index], done, redo)
                streams[index] = call(index)
                heard[index] = returned[index] = time.monotonic()
                continue
            heard[index] = returned[index] = time.monotonic()
            fresh = [(int(shards[index][0]) + i, samples) for i, samples in finished
                     if int(shards[index][0]) + i not in done]
            done.update(i for i, _ in fresh)
            if fresh:
                yield fresh

    def _lost(self, index: int, cause: str, phase: str, shard: np.ndarray, done: set[int], redo: bool) -> None:
        """Engine `index` died or hung in a generate call: replace it; bring it to the weights
        the others serve so that its shard can be sampled again, else raise EngineDiedError."""
        left = [i for i in shard.tolist() if i not in done]
        can_redo = redo and self.revive is not None
        what = f"its {len(left)} unfinished prompt(s) sampled again" if can_redo else "the work is redone later"
        self.replace(index, phase, cause, what)
        if not can_redo:
            raise EngineDiedError(index, cause)
        self.revive(index)

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

    def replace(self, index: int, phase: str, cause: str, redo: str) -> None:
        """Replace actor `index`, which died or hung while `phase`, with a fresh one (initial
        weights, version 0), charged to the run's faults (which say on the console what
        happened, and stop the run when `rollout.max_restarts` is spent)."""
        import ray

        while True:  # a replacement that dies while it starts is one more fault
            self.faults.charge("engine", index, phase, cause, f"replaced it, {redo}")  # or RestartsExhausted
            ray.kill(self.actors[index])  # a hung one too
            self.actors[index] = self._start(index)
            try:
                ray.get(self.actors[index].__ray_ready__.remote(), timeout=self.cfg.cluster.timeout_s)
                return
            except ray.exceptions.RayActorError as err:
                phase, cause = "starting", faults.cause_of(err)


def _shifted(sampling: Sampling, offset: int) -> Sampling:
    """The shard starting at prompt `offset` seeds its first prompt `seed + offset`."""
    from dataclasses import replace

    return replace(sampling, seed=sampling.seed + offset)
