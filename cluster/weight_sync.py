"""Weight sync: the learner's new weights reach every rollout engine. Both halves live here.

The protocol, run by the driver after each optimizer step (`WeightSync.push`):

    pause -> flush -> send -> stage -> load -> reset prefix cache -> bump version -> resume

- pause/flush: a rollout actor runs one method at a time, so a sync call waits until the
  generate call in flight has returned; nothing is half-sampled across versions.
- send + stage: the full weights travel to every engine and are held there beside the
  weights being served, checked against the model's own parameter names and shapes. Two
  transports (`sync.transport`):
  - "object_store": every learner rank takes part in gathering the weights (ZeRO-3 shards
    them; the gather is a collective), rank 0 returns them as numpy arrays, which Ray puts
    in its object store once; each engine reads them from there (zero-copy on one node).
  - "broadcast": learner rank 0 and the engines form their own torch.distributed group
    (gloo on CPU, NCCL on GPU; never the default group, which DeepSpeed owns), and rank 0
    broadcasts the weights packed in buckets of about `sync.bucket_mb`. Sender and
    receivers cut the buckets with the same function (`plan_buckets`) from one manifest.
- load (commit): only when every engine holds the whole new version does the driver tell
  them to load it in place, drop their prefix caches (keys/values computed with the old
  weights) and take the new version number. Every sample generated afterwards carries it.

Every remote call and every collective has a timeout (`sync.timeout_s`). A sync that fails
or times out before the commit raises `WeightSyncError` naming the stage, and every engine
keeps serving its previous weights whole: staged weights are only ever loaded by a commit
for their own version. (The commit is an in-memory copy of checked tensors; should an
engine die during it, the others may already serve the new version, each whole, and every
sample says which.) `WeightSync.check` scores one fixed sequence on the learner and on
every engine and fails if their log-probs differ by more than the dtype's tolerance.
"""

from __future__ import annotations

import contextlib
import datetime
import math
import time
from typing import Any

import numpy as np

from cluster.config import SyncConfig
from learner.models import parameter_shapes

# Largest |learner - engine| log-prob difference accepted after a sync, per learner dtype.
TOLERANCE = {"float32": 1e-3, "bfloat16": 5e-2}

# One entry per parameter, in the order the learner sends them: (HF name, shape, torch dtype name).
Manifest = list[tuple[str, tuple[int, ...], str]]


class WeightSyncError(RuntimeError):
    """A weight sync did not complete, or an engine disagrees with the learner after one."""


def plan_buckets(manifest: Manifest, bucket_bytes: int) -> list[list[int]]:
    """Consecutive parameter indices packed into buckets of at most `bucket_bytes` (a larger
    parameter gets a bucket of its own). Sender and receivers both call this."""
    buckets: list[list[int]] = [[]]
    size = 0
    for i, (_, shape, dtype) in enumerate(manifest):
        nbytes = _nbytes(shape, dtype)
        if buckets[-1] and size + nbytes > bucket_bytes:
            buckets.append([])
            size = 0
        buckets[-1].append(i)
        size += nbytes
    return [b for b in buckets if b]


def _nbytes(shape: tuple[int, ...], dtype: str) -> int:
    import torch

    return math.prod(shape) * torch.empty((), dtype=getattr(torch, dtype)).element_size()


def join_group(host: str, port: int, rank: int, world_size: int, timeout_s: float, device: str):
    """This process's handle on the sync group: rank 0 (learner) hosts the store at host:port."""
    import torch.distributed as dist

    timeout = datetime.timedelta(seconds=timeout_s)
    store = dist.TCPStore(host, port, world_size, is_master=rank == 0, timeout=timeout,
                          wait_for_workers=False)
    store = dist.PrefixStore("r1ray-weight-sync", store)
    if device == "cuda":
        return dist.ProcessGroupNCCL(store, rank, world_size)
    return dist.ProcessGroupGloo(store, rank, world_size, timeout)


def _broadcast(group, buffer, timeout_s: float) -> None:
    import torch.distributed as dist

    opts = dist.BroadcastOptions()
    opts.rootRank = 0
    group.broadcast([buffer], opts).wait(datetime.timedelta(seconds=timeout_s))


class BroadcastEnd:
    """One end of the broadcast transport: the group, and one reusable buffer per bucket.

    The buffers are kept between syncs: faulting in fresh memory for every sync cost more
    than the transfer itself (405 MB to 2 receivers on 2 cores: 0.7 s fresh, 0.3 s reused).
    On a receiver, staged weights are views into them until the commit copies them.
    """

    def __init__(self, group, device: str):
        self.group, self.device = group, device
        self.key: tuple | None = None
        self.buckets: list[tuple[list[int], list[int], Any]] = []  # (indices, byte sizes, buffer)

    def plan(self, manifest: Manifest, bucket_bytes: int) -> list[tuple[list[int], list[int], Any]]:
        import torch

        key = (tuple(manifest), bucket_bytes)
        if key != self.key:
            self.buckets = []
            for bucket in plan_buckets(manifest, bucket_bytes):
                sizes = [_nbytes(manifest[i][1], manifest[i][2]) for i in bucket]
                self.buckets.append((bucket, sizes, torch.empty(sum(sizes), dtype=torch.uint8, device=self.device)))
            self.key = key
        return self.buckets


# ---- learner half (runs inside each learner rank) ------------------------------------------

def learner_manifest(engine: Any) -> Manifest:
    """What the learner sends: every parameter's name, full (unsharded) shape and dtype."""
    return [(name, tuple(getattr(p, "ds_shape", p.shape)), str(p.dtype).removeprefix("torch."))
            for name, p in engine.module.named_parameters()]


@contextlib.contextmanager
def _full_parameters(engine: Any, zero_stage: int):
    """The module's parameters, whole on every rank for the duration (a collective under ZeRO-3)."""
    import deepspeed
    import torch

    params = list(engine.module.named_parameters())
    gather = (deepspeed.zero.GatheredParameters([p for _, p in params], modifier_rank=None)
              if zero_stage == 3 else contextlib.nullcontext())
    with gather, torch.no_grad():
        yield params


def gather_weights(engine: Any, zero_stage: int, rank: int) -> dict[str, np.ndarray] | None:
    """Object-store transport: full float32 weights by HF name on rank 0, None elsewhere.

    All ranks must call this together under ZeRO-3.
    """
    import torch

    with _full_parameters(engine, zero_stage) as params:
        if rank != 0:
            return None
        # ZeRO-3 frees the gathered copies when the context exits: copy them out first.
        # Otherwise the arrays are views that Ray copies into its store when this returns.
        own = zero_stage == 3
        return {name: _as_numpy(p.detach().to(torch.float32), own) for name, p in params}


def _as_numpy(t, copy: bool) -> np.ndarray:
    arr = t.cpu().numpy()
    return arr.copy() if copy else arr


def send_weights(engine: Any, zero_stage: int, rank: int, end: BroadcastEnd | None, bucket_bytes: int,
                 timeout_s: float) -> int:
    """Broadcast transport, sending half: rank 0 broadcasts bucket by bucket; returns bytes sent.

    Every learner rank calls this (the ZeRO-3 gather is collective); only rank 0 has an `end`.
    """
    import torch

    with _full_parameters(engine, zero_stage) as params:
        if rank != 0:
            return 0
        sent = 0
        for bucket, sizes, flat in end.plan(learner_manifest(engine), bucket_bytes):
            for i, part in zip(bucket, torch.split(flat, sizes)):
                part.copy_(params[i][1].detach().contiguous().view(-1).view(torch.uint8))
            _broadcast(end.group, flat, timeout_s)
            sent += flat.numel()
        return sent


# ---- engine half (runs inside each rollout actor) --------------------------------------------


class WeightReceiver:
    """Holds at most one new version beside the served one, and loads it only on commit.

    `load` is the engine's in-place loader: it takes (name, tensor) pairs of a whole model.
    """

    def __init__(self, model_dir: str, load):
        self.expected = parameter_shapes(model_dir)  # the engine's own model, from its files
        self.load = load
        self.staged: tuple[int, list] | None = None
        self.end: BroadcastEnd | None = None

    def stage(self, version: int, named: list[tuple[str, Any]]) -> int:
        """Check a whole new version against the model's names and shapes and hold it."""
        self.staged = None
        names = [n for n, _ in named]
        missing, unknown = set(self.expected) - set(names), set(names) - set(self.expected)
        if missing or unknown:
            raise WeightSyncError(f"weights version {version} do not match the engine's model: "
                                  f"missing {sorted(missing)[:3]}, unknown {sorted(unknown)[:3]}")
        for name, t in named:
            if tuple(t.shape) != self.expected[name]:
                raise WeightSyncError(f"weights version {version}: {name} has shape {tuple(t.shape)}, "
                                      f"the engine's model has {self.expected[name]}")
        self.staged = (version, named)
        return sum(t.nbytes for _, t in named)

    def stage_arrays(self, version: int, weights: dict[str, np.ndarray]) -> int:
        """Object-store transport: stage numpy arrays read from Ray's store."""
        import warnings

        import torch

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # store arrays are read-only; the loader copies them
            named = [(name, torch.from_numpy(arr)) for name, arr in weights.items()]
        return self.stage(version, named)

    def join(self, host: str, port: int, rank: int, world_size: int, timeout_s: float, device: str) -> None:
        """Join the broadcast group; buffers live on `device` ("cuda" makes it an NCCL group)."""
        self.end = BroadcastEnd(join_group(host, port, rank, world_size, timeout_s, device), device)

    def receive(self, version: int, manifest: Manifest, bucket_bytes: int, timeout_s: float) -> int:
        """Broadcast transport, receiving half: every bucket into this end's buffers, then stage."""
        import torch

        if self.end is None:
            raise WeightSyncError("this engine has not joined the sync group")
        self.staged = None  # the buffers are about to be overwritten
        named = []
        for bucket, sizes, flat in self.end.plan(manifest, bucket_bytes):
            _broadcast(self.end.group, flat, timeout_s)
            for i, part in zip(bucket, torch.split(flat, sizes)):
                name, shape, dtype = manifest[i]
                named.append((name, part.view(getattr(torch, dtype)).view(shape)))
        return self.stage(version, named)

    def commit(self, version: int) -> None:
        """Load the staged weights if they are `version`; the caller then bumps its version."""
        if self.staged is None or self.staged[0] != version:
            held = None if self.staged is None else self.staged[0]
            raise WeightSyncError(f"cannot load weights version {version}: the engine holds {held}")
        _, named = self.staged
        self.staged = None
        self.load(named)


class EngineWeightReceiver:
    """vLLM worker extension: load HF-named weights into the running model in place.

    `model_runner.reload_weights` is used rather than `model.load_weights`: on CPU the
    engine repacks weights after the first load and a second plain load fails.
    """

    def load_policy_weights(self, named: list) -> None:
        self.model_runner.reload_weights(weights_iterator=iter(named))


# ---- the protocol (runs in the driver) -------------------------------------------------------

class WeightSync:
    """The driver's handle on the protocol between the learner ranks and the rollout actors."""

    def __init__(self, learners: list, rollouts: list, cfg: SyncConfig, dtype: str):
        self.learners, self.rollouts, self.cfg, self.dtype = learners, rollouts, cfg, dtype
        self.manifest: Manifest | None = None
        self.connected = False
        # The group's device is the learner's: NCCL needs both ends on GPUs, and the learner
        # runs on the CPU in this release, so engines on GPUs receive into host memory.
        self.device = "cpu"

    def connect(self) -> None:
        """Broadcast transport: form the sync group (learner rank 0 + every engine)."""
        if self.cfg.transport != "broadcast":
            return
        self.manifest = self._get(self.learners[0].weight_manifest.remote(), "reading the manifest")
        host, port = self._get(self.learners[0].sync_address.remote(), "choosing an address")
        world = 1 + len(self.rollouts)
        refs = [self.learners[0].join_sync_group.remote(host, port, 0, world, self.cfg.timeout_s)]
        refs += [r.join_sync_group.remote(host, port, 1 + i, world, self.cfg.timeout_s, self.device)
                 for i, r in enumerate(self.rollouts)]
        self._get(refs, f"forming the sync group of {world} processes at {host}:{port}")
        self.connected = True

    def replace(self, rollouts: list) -> None:
        """New rollout actors (after a restart): the next push re-forms the group with them."""
        self.rollouts = rollouts
        self.connected = False

    def push(self, version: int) -> dict[str, float]:
        """Send the learner's weights to every engine and switch them to `version`."""
        start = time.perf_counter()
        if self.cfg.transport == "broadcast":
            if not self.connected:
                self.connect()
            bucket = int(self.cfg.bucket_mb * 2**20)
            sends = [l.send_weights.remote(bucket, self.cfg.timeout_s) for l in self.learners]
            receives = [r.receive_weights.remote(version, self.manifest, bucket, self.cfg.timeout_s)
                        for r in self.rollouts]
            try:
                staged = self._get(receives + sends, f"broadcasting weights version {version}")
            except WeightSyncError:
                self.connected = False  # a broken collective leaves the group unusable
                raise
            staged = staged[:len(receives)]
        else:
            refs = [l.gather_weights.remote() for l in self.learners]
            self._get(refs, "gathering weights from the learner", fetch=False)
            self._get(refs[1:], "gathering weights from the learner")  # surfaces rank errors
            staged = self._get([r.stage_weights.remote(refs[0], version) for r in self.rollouts],
                               f"sending weights version {version} to the engines")
        versions = self._get([r.commit_weights.remote(version) for r in self.rollouts],
                             f"loading weights version {version}")
        if versions != [version] * len(self.rollouts):
            raise WeightSyncError(f"engines report versions {versions} after loading version {version}")
        seconds = time.perf_counter() - start
        return {"timing/sync": seconds, "sync/bytes": float(staged[0]), "sync/version": float(version),
                "sync/gb_per_s": staged[0] * len(self.rollouts) / seconds / 1e9}

    def check(self, token_ids: np.ndarray) -> float:
        """Max |learner - engine| log-prob over a fixed sequence; raises beyond the dtype's tolerance."""
        # Every rank scores (a ZeRO-3 forward is collective); rank 0's answer is the learner's.
        learner_lp = self._get([l.score.remote(token_ids) for l in self.learners], "scoring on the learner")[0]
        engine_lps = self._get([r.score.remote(token_ids) for r in self.rollouts], "scoring on the engines")
        worst = max(float(np.abs(lp - learner_lp).max()) for lp in engine_lps)
        if worst > TOLERANCE[self.dtype]:
            raise WeightSyncError(f"after sync an engine's log-probs differ from the learner's by "
                                  f"{worst:.2e} (tolerance for {self.dtype}: {TOLERANCE[self.dtype]:.0e})")
        return worst

    def _get(self, refs, stage: str, fetch: bool = True):
        """Wait for remote calls within the sync timeout; any failure is one `WeightSyncError`."""
        import ray

        single = not isinstance(refs, list)
        refs = [refs] if single else refs
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=self.cfg.timeout_s, fetch_local=False)
        if len(ready) < len(refs):
            raise WeightSyncError(f"weight sync: {stage} took longer than {self.cfg.timeout_s:g}s "
                                  "(sync.timeout_s); the engines keep their previous weights")
        if not fetch:
            return None
        try:
            values = ray.get(refs)
        except ray.exceptions.RayError as err:
            cause = getattr(err, "cause", None) or err
            first = str(cause).strip().splitlines()[-1] if str(cause).strip() else type(cause).__name__
            raise WeightSyncError(f"weight sync: {stage} failed: {first}") from err
        return values[0] if single else values
