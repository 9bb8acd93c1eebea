"""Starting or joining Ray, and placing the learner ranks, rollout actors and reward workers.

Failures a user can cause (no cluster at the address, a request larger than the cluster)
raise `ClusterError` within seconds with one clear message, instead of a pending placement
group or a wall of Ray tracebacks.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

from cluster.config import Config


class ClusterError(RuntimeError):
    """Ray cannot be reached, or cannot hold the actors the config asks for."""


def connect(cfg: Config) -> None:
    """Start a private local cluster ("local"), or join one ("auto", "host:port", a Ray job)."""
    import ray

    address = cfg.cluster.address
    # Inside `ray job submit` Ray sets RAY_ADDRESS: join that cluster rather than start another.
    if address == "local" and os.environ.get("RAY_ADDRESS"):
        address = os.environ["RAY_ADDRESS"]
    if address not in ("local", "auto") and not address.startswith("ray://"):
        _check_reachable(address)
    kwargs = dict(log_to_driver=True, logging_level="WARNING", configure_logging=True)
    try:
        if address == "local":
            ray.init(address="local", num_cpus=cfg.cluster.num_cpus, include_dashboard=False, **kwargs)
        else:
            ray.init(address=address, **kwargs)
    except (ConnectionError, RuntimeError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ClusterError(f"cannot reach a Ray cluster at cluster.address={address!r}: {first}") from None


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
    role: str
    count: int
    num_cpus: float
    num_gpus: float = 0.0


def requests(cfg: Config) -> list[Request]:
    """CPUs and GPUs asked for by each role."""
    return [
        Request("learner rank", cfg.learner.num_ranks, cfg.learner.num_cpus),
        Request("rollout actor", cfg.rollout.num_engines, cfg.rollout.num_cpus, cfg.rollout.num_gpus),
        Request("reward worker", cfg.rewards.num_workers, cfg.rewards.num_cpus),
    ]


def check_fits(cfg: Config) -> None:
    """Raise `ClusterError` if the cluster has fewer CPUs or GPUs than the actors need together."""
    import ray

    for resource, attr, knobs in [("CPU", "num_cpus", "learner.num_cpus / rollout.num_cpus / rewards.num_cpus"),
                                  ("GPU", "num_gpus", "rollout.num_gpus")]:
        available = ray.cluster_resources().get(resource, 0.0)
        needed = sum(r.count * getattr(r, attr) for r in requests(cfg))
        if needed > available + 1e-9:
            parts = ", ".join(f"{r.count} {r.role}(s) x {getattr(r, attr):g}" for r in requests(cfg)
                              if getattr(r, attr))
            raise ClusterError(f"the config asks for {needed:g} {resource}s ({parts}) but the Ray cluster "
                               f"has {available:g}; lower {knobs} or the counts "
                               "(rollout.num_engines, ...), or add nodes")


def learner_group(cfg: Config, timeout_s: float = 30.0):
    """A placement group packing the learner ranks (one bundle each), ready within `timeout_s`."""
    import ray
    from ray.util.placement_group import placement_group

    pg = placement_group([{"CPU": cfg.learner.num_cpus}] * cfg.learner.num_ranks, strategy="PACK")
    ready, _ = ray.wait([pg.ready()], timeout=timeout_s)
    if not ready:
        ray.util.remove_placement_group(pg)
        raise ClusterError(f"could not place {cfg.learner.num_ranks} learner rank(s) x "
                           f"{cfg.learner.num_cpus:g} CPUs within {timeout_s:.0f}s")
    return pg


def free_port() -> int:
    """A free TCP port on this host (rendezvous of the learner ranks or the weight-sync group)."""
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]
