"""Faults: what a run counts and says when one of its actors dies or hangs, and how tests and
bench/chaos.py make one happen at a chosen moment.

Who survives what (the driver's side of each is beside the actor's pool):
- a rollout engine (cluster/rollout_pool.py): replaced, brought to the current weights, and
  its unfinished prompts sampled again with the same seeds; in any phase (generating, idle,
  staging or committing weights, evaluating). Counted against `rollout.max_restarts`.
- a reward worker or the preference scorer (cluster/reward_pool.py): replaced and its
  samples scored again. Counted against `rewards.max_restarts`.
- a learner rank (cluster/train.py, `train`): ZeRO state lives in the ranks, so every actor
  is stopped and the run resumes from its newest checkpoint, `cluster.auto_resume` times.
A hang is a fault too. The run's engines and reward actors answer a ping on a thread of their
own (`remote`), so the driver tells a busy actor from a hung one: an actor that has answered
nothing, neither its call nor a ping, for `cluster.deadline_s` (a stopped process, or one wedged
holding Python's lock), or whose call is still running after `cluster.timeout_s` though it
answers (stuck in a collective, say), is killed and handled as a dead one (`hung`).

`Faults` is one run's account: `charge` says on the console which actor died, in which phase
and what is redone, and raises `RestartsExhausted` (naming the actor, its last error and how to
resume) when the budget is spent; `metrics` are the counts logged each step (`faults/*`).

Injection (`inject`): R1RAY_INJECT_FAULTS lists faults to cause, each once per process, as
`ROLE[INDEX]@POINT:STEP[:SIGNAL]` separated by commas, e.g.
    engine0@stage:3,reward0@score:2,learner1@learn:4,engine1@generate:2:SIGSTOP
ROLE is engine, reward, preference or learner; POINT is where the driver calls `inject`
(generate, eval, idle, stage, commit, score, learn); the fault happens the first time the
driver reaches POINT in GRPO step STEP or later (0: from the start; a step may have no sync,
when no group had a signal); a fault listed twice happens the first two times. Each is
announced on the console. The signal (default SIGKILL, as the OOM killer sends) goes to the
actor's process, which must run on this machine. Nothing happens when the variable is unset.
"""

from __future__ import annotations

import os
import re
import signal
import sys
from collections import Counter
from dataclasses import dataclass, field

KINDS = {"engine": "rollout.max_restarts", "reward": "rewards.max_restarts",
         "preference": "rewards.max_restarts", "learner": "cluster.auto_resume"}
"""What dies, and the config key that bounds how often it may in a run."""


class RestartsExhausted(RuntimeError):
    """An actor died once more than its budget allows; the run stops (its newest checkpoint whole)."""

    def __init__(self, kind: str, index: int | None, phase: str, cause: str, limit: int, resume: str = ""):
        who = kind if index is None else f"{kind} {index}"
        super().__init__(f"{who} died while {phase}: {cause}; {KINDS[kind]}={limit} used up"
                         + (f"; {resume}" if resume else ""))
        self.kind, self.index, self.phase, self.cause, self.limit = kind, index, phase, cause, limit


@dataclass
class Faults:
    """One run's deaths by kind, against the budgets in `limits` (kind -> restarts allowed)."""

    limits: dict[str, int]
    counts: Counter = field(default_factory=Counter)
    resume: str = ""
    """How to go on after the run stops (the command), once a run folder exists."""

    @classmethod
    def of(cls, cfg) -> "Faults":
        r = cfg.rewards.max_restarts
        return cls({"engine": cfg.rollout.max_restarts, "reward": r, "preference": r,
                    "learner": cfg.cluster.auto_resume})

    def left(self, kind: str) -> int:
        used = self.counts["reward"] + self.counts["preference"] if kind in ("reward", "preference") \
            else self.counts[kind]
        return self.limits[kind] - used

    def charge(self, kind: str, index: int | None, phase: str, cause: str, redo: str) -> None:
        """Count one death and say so; raises RestartsExhausted when none is left to count."""
        if self.left(kind) <= 0:
            raise RestartsExhausted(kind, index, phase, cause, self.limits[kind], self.resume)
        self.counts[kind] += 1
        who = kind if index is None else f"{kind} {index}"
        say(f"r1ray: fault: {who} died while {phase} ({cause}); {redo} "
            f"({self.left(kind)} restart(s) left, {KINDS[kind]})")

    def metrics(self) -> dict[str, float]:
        return {f"faults/{kind}": float(self.counts[kind]) for kind in KINDS}


def say(line: str) -> None:
    """Print one console line in one write: Ray's thread that forwards the actors' output
    (a death notice, when an actor dies) writes as the driver does, and `print` writes a
    line's text and its newline apart, so the two could share a line."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def cause_of(err: Exception) -> str:
    """What ended an actor's call, in one short line: for a process that died, Ray's exit
    type and detail (Ray's own notice lists the actor's ids first and runs on to a paragraph of
    possible causes); else the remote error's last line (the exception under its traceback)."""
    text = str(getattr(err, "cause", None) or err).strip()
    flat = " ".join(text.split())
    kind = re.search(r"Worker exit type: (\w+)", flat)
    if kind:
        detail = re.search(r"Worker exit detail: (.+?)(?: Some common causes| There are some potential|$)", flat)
        return f"its process died ({kind[1]}{': ' + detail[1] if detail else ''})"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    line = lines[-1] if lines else type(err).__name__
    return line if len(line) <= 200 else line[:200] + "..."


# ---- hangs ----------------------------------------------------------------------------------

ALIVE = "alive"
"""The concurrency group (one thread of its own) on which an actor made by `remote` answers
pings while its main thread is busy with a call."""


def remote(cls):
    """`ray.remote(cls)` for an actor the driver may ping while it works (`unresponsive`)."""
    import ray

    return ray.remote(concurrency_groups={ALIVE: 1})(cls)


def unresponsive(actors: list, deadline_s: float) -> dict[int, str]:
    """The actors (made by `remote`) that are dead or do not answer a ping within half of
    `deadline_s` (asked after the other half of silence): index -> why."""
    import ray

    pings = [a.__ray_ready__.options(concurrency_group=ALIVE).remote() for a in actors]
    ready, _ = ray.wait(pings, num_returns=len(pings), timeout=deadline_s / 2)
    found = {}
    for i, ping in enumerate(pings):
        if ping not in ready:
            found[i] = f"no answer in {deadline_s:g}s (cluster.deadline_s)"
            continue
        try:
            ray.get(ping)
        except ray.exceptions.RayActorError as err:
            found[i] = cause_of(err)
    return found


def hung(actor, deadline_s: float, busy_s: float, timeout_s: float) -> str | None:
    """Why `actor`, silent for half of `deadline_s` in a call it has run for `busy_s`, counts
    as hung (or dead); None when it is only busy: it answers a ping, and the call is younger
    than `timeout_s`."""
    cause = unresponsive([actor], deadline_s).get(0)
    if cause is None and busy_s > timeout_s:
        cause = f"no result in {timeout_s:g}s (cluster.timeout_s), though it answers"
    return cause


NO_FAULTS = Faults({kind: 0 for kind in KINDS})
"""The account of code run outside a training run (r1ray eval, a pipeline's rejection
sampling): no restarts, so an actor's death stops it with its error, as before."""


# ---- injection (tests, bench/chaos.py) --------------------------------------------------------

_SPEC = re.compile(r"(engine|reward|preference|learner)(\d*)@(\w+):(\d+)(?::(SIG[A-Z]+))?")


@dataclass
class _Injector:
    planned: list[tuple[str, int, str, int, str]] | None = None
    step: int = 0
    """The GRPO step the driver is in (`at_step`)."""
    fired: set[int] = field(default_factory=set)
    """The planned faults caused so far (their places in the plan)."""

    def plan(self) -> list[tuple[str, int, str, int, str]]:
        if self.planned is None:
            text = os.environ.get("R1RAY_INJECT_FAULTS", "").replace(" ", "")
            self.planned = []
            for item in filter(None, text.split(",")):
                m = _SPEC.fullmatch(item)
                if not m:
                    raise ValueError(f"R1RAY_INJECT_FAULTS: {item!r} is not ROLE[INDEX]@POINT:STEP[:SIGNAL] "
                                     "(e.g. engine0@stage:3)")
                self.planned.append((m[1], int(m[2] or 0), m[3], int(m[4]), m[5] or "SIGKILL"))
        return self.planned


_injector = _Injector()


def at_step(step: int) -> None:
    """The driver enters GRPO step `step` (the key of the faults planned)."""
    _injector.step = step


def inject(point: str, role: str, actors: list) -> None:
    """Cause the faults planned for `role` at `point` in this step, each listed one once (a
    fault listed twice happens twice, at two calls): signal the process of `actors[index]`."""
    plan = _injector.plan()
    if not plan:
        return
    now = set()  # the faults caused by this call
    for i, item in enumerate(plan):
        kind, index, where, step, sig = item
        if (kind, where) != (role, point) or step > _injector.step or i in _injector.fired \
                or index >= len(actors) or item in now:
            continue
        _injector.fired.add(i)
        now.add(item)
        pid = actor_pid(actors[index])
        say(f"r1ray: injecting a fault: {sig} to {role} {index} (pid {pid}) at {point}, step {_injector.step}")
        os.kill(pid, getattr(signal, sig))


def actor_pid(actor) -> int:
    """The process id of a live actor (read from Ray's actor table; no call on the actor, which
    may be busy)."""
    from ray._private.state import actors

    return int(actors(actor._actor_id.hex())["Pid"])
