"""A step's rollout in the background: generate, stream finished groups to the reward pool.

The driver starts a step's rollout (`Rollout.start`) and later takes its result. Inside, the
engines' finished groups are handed to the reward workers as they arrive (`rewards.stream`),
so scoring hides behind generation. With `algorithm.max_staleness = 1` the driver starts
step s+1's rollout before step s learns, so generation overlaps learning; the weight sync
after step s then waits for that generation (`wait_generated`) so that no engine is
loaded while it samples. The samples of step s+1 then carry weight version v (one behind the
learner's v+1), which the learner corrects for (learner/grpo.py, point 6).

Failures travel to the driver: `result` re-raises what the background thread raised (an
engine that died, a timeout), and the driver handles it between steps, when the learner is
idle and the engines can be replaced and brought up to date safely.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from common.records import Sample, Sampling
from rewards.tasks import Problem


@dataclass
class Produced:
    """A step's prompts, their scored samples in prompt order, and when its phases ran (time.time())."""

    problems: list[Problem]
    samples: list[Sample]
    reasons: list[str]
    generate_start: float
    generate_end: float
    scored: float
    """When the last score arrived (rewards that outlast generation: `scored - generate_end`)."""

    def __add__(self, more: "Produced") -> "Produced":
        """This round and a later one of the same step (dynamic sampling), in that order."""
        return Produced(self.problems + more.problems, self.samples + more.samples, self.reasons + more.reasons,
                        self.generate_start, more.generate_end, more.scored)


@dataclass
class Rollout:
    """One step's prompts being generated and scored in a background (daemon) thread."""

    step: int
    problems: list[Problem]
    rng_state: object
    """The prompt sampler's state before these problems were drawn (what a checkpoint saves
    while this rollout is still in flight, so that resume draws them again)."""
    round: int = 0
    """0 for a step's prompts; 1, 2, ... for the extra rounds of dynamic sampling (each is
    seeded apart)."""
    ahead: bool = False
    """Started while the learner is between versions (`algorithm.max_staleness=1`): an engine
    that dies in it cannot be sent the weights the others serve, so the rollout fails with
    EngineDiedError and the driver samples it again after the sync."""
    started: float = field(default_factory=time.time)
    generated_at: float | None = None
    _generated: threading.Event = field(default_factory=threading.Event)
    _done: threading.Event = field(default_factory=threading.Event)
    _result: Produced | None = None
    _error: BaseException | None = None

    @classmethod
    def start(cls, cfg, actors, problems: list[Problem], step: int, rng_state, round: int = 0,
              ahead: bool = False) -> "Rollout":
        rollout = cls(step, problems, rng_state, round, ahead)
        threading.Thread(target=rollout._run, args=(cfg, actors), daemon=True,
                         name=f"rollout-step-{step}").start()
        return rollout

    def wait_generated(self, timeout_s: float) -> None:
        """Block until the engines are done with this rollout (or it failed)."""
        if not self._generated.wait(timeout_s):
            raise TimeoutError(f"step {self.step}'s generation took longer than cluster.timeout_s={timeout_s}")

    def result(self, timeout_s: float) -> Produced:
        """The scored samples; re-raises the background thread's error."""
        if not self._done.wait(timeout_s):
            raise TimeoutError(f"step {self.step}'s rollout took longer than cluster.timeout_s={timeout_s}")
        if self._error is not None:
            raise self._error
        return self._result

    def engine_died(self):
        """The EngineDiedError this rollout failed with, once generation is over; else None."""
        from cluster.rollout_pool import EngineDiedError

        return self._error if isinstance(self._error, EngineDiedError) else None

    def busy_between(self, t0: float, t1: float) -> float:
        """Seconds of [t0, t1] during which the engines were generating this rollout."""
        end = self.generated_at if self.generated_at is not None else t1
        return max(0.0, min(end, t1) - max(self.started, t0))

    def _run(self, cfg, actors) -> None:
        try:
            self._result = generate_and_score(cfg, actors, self.problems, self.step, self._mark_generated,
                                              self.round, redo=not self.ahead)
        except BaseException as err:  # handed to the driver by result()
            self._error = err
        finally:
            self._mark_generated()
            self._done.set()

    def _mark_generated(self) -> None:
        if not self._generated.is_set():
            self.generated_at = time.time()
            self._generated.set()


def generate_and_score(cfg, actors, problems: list[Problem], step: int, on_generated=lambda: None,
                       round: int = 0, redo: bool = True) -> Produced:
    """Sample G answers per problem and score them; finished groups go to the reward workers
    while the engines generate the rest, unless `rewards.stream` is off. An engine that dies
    is replaced and its prompts sampled again (`redo`; else EngineDiedError, see `Rollout.ahead`)."""
    G, by_id = cfg.algorithm.group_size, {p.id: p for p in problems}
    seed = cfg.algorithm.seed + 1000 * step + 10**7 * round  # prompt i of the round is seeded seed + i
    sampling = Sampling.from_config(cfg.rollout, G, seed, actors.prompts.stop)
    start, done, scoring = time.time(), [], []
    for chunk in actors.rollouts.stream([p.id for p in problems], [actors.prompts.render(p.prompt) for p in problems],
                                        sampling, cfg.cluster.timeout_s, f"generating step {step}", redo):
        done += chunk
        if cfg.rewards.stream:
            scoring.append(actors.rewarders.submit([s for _, group in chunk for s in group], by_id))
    generated = time.time()
    on_generated()
    samples = [s for _, group in sorted(done, key=lambda pair: pair[0]) for s in group]
    if not cfg.rewards.stream and samples:
        scoring.append(actors.rewarders.submit(samples, by_id))
    reason_of = {}
    for part in scoring:
        for sample, reason in zip(part.samples, actors.rewarders.collect(part, cfg.cluster.timeout_s)):
            reason_of[id(sample)] = reason
    return Produced(problems, samples, [reason_of[id(s)] for s in samples], start, generated, time.time())
