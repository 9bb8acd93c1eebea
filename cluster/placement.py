"""Starting or joining Ray, and placing the learner ranks, rollout actors and reward workers.

Failures a user can cause (no cluster at the address, a request larger than the cluster)
raise `ClusterError` within seconds with one clear message, instead of a pending placement
group or a wall of Ray tracebacks. A local cluster never outlives the process that started
it, however that process ends (`_watched`).
"""

from __future__ import annotations

import logging
import os
import socket
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from cluster.config import Config
from common.net import free_port


class ClusterError(RuntimeError):
    """Ray cannot be reached, or cannot hold the actors the config asks for."""


def connect(cfg: Config) -> None:
    """Start a private local cluster ("local"), or join one ("auto", "host:port", a Ray job);
    nothing when this process is connected already (a pipeline's stages share one session).
    Actors' output reaches this console only with logging.verbose (see `link_actor_logs`)."""
    import ray

    if ray.is_initialized():
        return
    address = _address(cfg)
    if address not in ("local", "auto") and not address.startswith("ray://"):
        _check_reachable(address)
    kwargs = dict(log_to_driver=cfg.logging.verbose, logging_level="WARNING", configure_logging=True)
    try:
        if address == "local":
            # Ray's default for a local cluster, token authentication, comes with a warning
            # on every start (and RAY_AUTH_MODE=token, which would say it is chosen, leaves
            # the new cluster's processes without the token).
            logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
            with _watched():
                context = ray.init(address="local", num_cpus=cfg.cluster.num_cpus, include_dashboard=False,
                                   _system_config=NO_PRESTART, **kwargs)
        else:
            context = ray.init(address=address, **kwargs)
    except (ConnectionError, RuntimeError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ClusterError(f"cannot reach a Ray cluster at cluster.address={address!r}: {first}") from None
    _session["logs"] = None if cfg.logging.verbose else Path(context.address_info["session_dir"]) / "logs"


_session: dict[str, Path | None] = {"logs": None}
"""Where the actors' output goes instead of this console: the log folder of the Ray session
`connect` started or joined, unless logging.verbose prints it here."""


def actor_logs() -> Path | None:
    """Where the actors' output went instead of this console: the Ray session's log folder
    (every actor's stdout and stderr, worker-*.out and .err, of this machine's node); None when
    it was printed here, or this process did not connect through `connect`, or the folder is
    on another machine."""
    logs = _session["logs"]
    return logs if logs and logs.is_dir() else None


def link_actor_logs(run_dir: Path) -> Path | None:
    """Link `actor_logs()` into `run_dir`/logs/ and return the link (None without one)."""
    logs = actor_logs()
    if logs is None:
        return None
    link = run_dir / "logs" / logs.parent.name  # one per session: a resumed run keeps the first's
    link.parent.mkdir(exist_ok=True)
    if not link.is_symlink():
        link.symlink_to(logs, target_is_directory=True)
    return link


NO_PRESTART = {"enable_worker_prestart": False, "prestart_worker_first_driver": False}
"""A local cluster starts no idle workers in advance. Ray starts one per CPU for tasks, but
each r1ray actor asks for a runtime env of its own and gets a new process anyway: the idle
ones cost about a second of CPU each at start, then 0.5 s of CPU per 30 s each while they wait
(measured on 2 cores, Ray 2.60)."""


@contextmanager
def _watched():
    """Give the Ray processes this block starts (a local cluster's) a watchdog that kills them,
    and every process started under them, once this process is gone, or they are.

    Why: a local cluster must not outlive its driver, however the driver ends, and Ray does not
    see to that on its own. Its head processes (gcs_server, raylet, the dashboard and monitors)
    share the driver's fate (PR_SET_PDEATHSIG) and die with it; what the raylet starts does not.
    Measured with Ray 2.60 on 2 cores, after a SIGKILL of `r1ray train`: the actors exited within
    ~5 s of the raylet, but ray::DashboardAgent and ray::RuntimeEnvAgent lived on for ~60 s (they
    report to the dead GCS first), and during start-up a learner's DeepSpeed op build (sh, c++,
    cc1plus) lived on until it was done; all adopted by init.
    Considered instead: PR_SET_PDEATHSIG in each actor's constructor (the raylet is its parent)
    covers neither Ray's agents, nor an actor whose constructor has not started, nor the actors'
    own children (compilers, checker processes, vLLM's engine core); Ray has no option that ties
    its agents to the driver. The watchdog (actors/reaper.py, `reap_session`) is a process of its
    own, in a session of its own (a Ctrl-C, or a signal to the process group, does not reach it).
    It records the processes under the head processes as they appear and, once the driver is
    gone (nothing needs to run in the driver as it dies) or the head processes are
    (`ray.shutdown`), SIGKILLs them, and every process whose environment names the raylet (a
    worker started since it last looked, adopted by init before it was recorded). It starts in a
    `finally`: a start cut short leaves its half-started cluster watched too.
    Where the driver joins a cluster instead, Ray ends the job's actors when the driver is gone."""
    import psutil

    from actors.reaper import reap_session

    before = {c.pid for c in psutil.Process().children()}
    try:
        yield
    finally:
        started = [c.pid for c in psutil.Process().children() if c.pid not in before]
        if started:
            _watchdogs.append(reap_session(os.getpid(), started))


_watchdogs: list = []
"""The watchdogs of the local clusters this process started (kept, so that Python does not warn
that a running subprocess was dropped)."""


def _address(cfg: Config) -> str:
    """Where `connect` goes: cluster.address, except that inside `ray job submit` (which sets
    RAY_ADDRESS) "local" joins that cluster rather than start another."""
    if cfg.cluster.address == "local" and os.environ.get("RAY_ADDRESS"):
        return os.environ["RAY_ADDRESS"]
    return cfg.cluster.address


def _check_reachable(address: str, timeout_s: float = 3.0) -> None:
    """Fail in seconds if nothing listens at host:port (Ray itself retries for minutes)."""
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout_s):
            pass
    except (OSError, ValueError) as err:
        raise ClusterError(f"cannot reach a Ray cluster at cluster.address={address!r}: {err}; "
                           "start one with `ray start --head` or use cluster.address=local") from None


@dataclass(frozen=True)
class Request:
    """`count` actors of one role, each needing one bundle of resources."""

    role: str
    count: int
    num_cpus: float
    num_gpus: float = 0.0
    memory_gb: float = 0.0

    @property
    def bundle(self) -> dict[str, float]:
        """The resources of one actor, as a Ray placement-group bundle."""
        out = {"CPU": self.num_cpus}
        if self.num_gpus:
            out["GPU"] = self.num_gpus
        if self.memory_gb:
            out["memory"] = self.memory_gb * GIB
        return out

    def options(self) -> dict:
        """Ray actor options asking for the same resources."""
        return {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus,
                **({"memory": self.memory_gb * GIB} if self.memory_gb else {})}


GIB = 2**30
_KNOBS = {"CPU": "num_cpus", "GPU": "num_gpus", "memory": "memory_gb"}


def requests(cfg: Config) -> dict[str, Request]:
    """What each role asks for: "learner" ranks, "rollout" actors, "reward" workers.
    Colocated (`cluster.colocate`), a rank and its engine share one GPU: half each."""
    l, r, w = cfg.learner, cfg.rollout, cfg.rewards
    share = 0.5 if cfg.cluster.colocate else 1.0
    return {
        "learner": Request("learner rank", l.num_ranks, l.num_cpus, l.num_gpus * share, l.memory_gb),
        "rollout": Request("rollout actor", r.num_engines, r.num_cpus, r.num_gpus * share, r.memory_gb),
        "reward": Request("reward worker", w.num_workers, w.num_cpus, 0.0, w.memory_gb),
    }


def misfit(reqs: list[Request], nodes: list[dict[str, float]],
           resources: tuple[str, ...] = ("CPU", "GPU", "memory")) -> str | None:
    """Why the actors cannot all be placed on nodes with these resources, or None.

    Two checks, both exact for what Ray will do: the totals of each resource, and each
    actor's bundle against the largest node (a bundle never spans nodes).
    """
    def show(resource: str, value: float) -> str:
        return f"{value / GIB:g} GiB memory" if resource == "memory" else f"{value:g} {resource}s"

    for resource in resources:
        needed = sum(q.count * q.bundle.get(resource, 0.0) for q in reqs)
        have = sum(n.get(resource, 0.0) for n in nodes)
        if needed > have + 1e-9:
            parts = ", ".join(f"{q.count} {q.role}(s) x {show(resource, q.bundle[resource])}"
                              for q in reqs if q.bundle.get(resource))
            return (f"the config asks for {show(resource, needed)} ({parts}) but the Ray cluster has "
                    f"{show(resource, have)}; lower the roles' {_KNOBS[resource]} or the counts "
                    "(learner.num_ranks, rollout.num_engines, rewards.num_workers), or add nodes")
        for q in reqs:
            largest = max((n.get(resource, 0.0) for n in nodes), default=0.0)
            if q.count and q.bundle.get(resource, 0.0) > largest + 1e-9:
                return (f"one {q.role} asks for {show(resource, q.bundle[resource])} but the largest node "
                        f"has {show(resource, largest)}; an actor cannot span nodes")
    return None


def check_fits(cfg: Config) -> None:
    """Raise `ClusterError` at once if the cluster cannot hold the actors the config asks for.
    Before `connect`, only what is known of a local cluster before it starts (~8 s): its
    `cluster.num_cpus` CPUs."""
    import ray

    reqs = list(requests(cfg).values())
    if ray.is_initialized():
        why = misfit(reqs, [n["Resources"] for n in ray.nodes() if n.get("Alive")])
    elif _address(cfg) == "local":
        why = misfit(reqs, [{"CPU": float(cfg.cluster.num_cpus)}], resources=("CPU",))
    else:
        why = None
    if why:
        raise ClusterError(why)


def learner_group(cfg: Config, timeout_s: float = 30.0):
    """The learner ranks' bundles, packed onto as few nodes as possible (their collectives
    are the most frequent traffic). Colocated, bundle i also holds rollout actor i (what
    both ask for, on one device)."""
    learner = requests(cfg)["learner"]
    if cfg.cluster.colocate:
        rollout = requests(cfg)["rollout"]
        learner = Request("learner rank + rollout actor", learner.count, learner.num_cpus + rollout.num_cpus,
                          learner.num_gpus + rollout.num_gpus, learner.memory_gb + rollout.memory_gb)
    return _group(learner, "PACK", timeout_s)


def rollout_group(cfg: Config, timeout_s: float = 30.0):
    """The rollout actors' bundles, spread over nodes or packed (`rollout.placement`)."""
    return _group(requests(cfg)["rollout"], cfg.rollout.placement.upper(), timeout_s)


def _group(req: Request, strategy: str, timeout_s: float):
    import ray
    from ray.util.placement_group import placement_group

    pg = placement_group([req.bundle] * req.count, strategy=strategy)
    ready, _ = ray.wait([pg.ready()], timeout=timeout_s)
    if not ready:  # Ray would leave it pending forever
        ray.util.remove_placement_group(pg)
        raise ClusterError(f"could not place {req.count} {req.role}(s) x {req.bundle} ({strategy}) "
                           f"within {timeout_s:.0f}s; the cluster has {ray.available_resources()} free")
    return pg


def node_address(node_id: str) -> str:
    """The IP address of a node of the cluster."""
    import ray

    return next(n["NodeManagerAddress"] for n in ray.nodes() if n["NodeID"] == node_id)


def nodes_of(pg) -> list[str]:
    """The node id holding each bundle of a ready placement group, in bundle order."""
    from ray.util import placement_group_table

    table = placement_group_table(pg)["bundles_to_node_id"]
    return [table[i] for i in sorted(table)]


def free_port_on(node_id: str) -> int:
    """A free TCP port on the node `node_id` (found by a zero-CPU task that runs there)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    strategy = NodeAffinitySchedulingStrategy(node_id, soft=False)
    return ray.get(ray.remote(num_cpus=0)(free_port).options(scheduling_strategy=strategy).remote(), timeout=60)


def release(actors: list, group=None) -> None:
    """Stop `actors` and free their placement group's reservation, so that the next stage's
    actors (in the same Ray session) can be placed."""
    import ray

    for actor in actors:
        ray.kill(actor)
    if group is not None:
        ray.util.remove_placement_group(group)
