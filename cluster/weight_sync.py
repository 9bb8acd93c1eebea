"""Weight sync: the learner's new weights reach every rollout engine. Both halves live here.

The protocol, run by the driver after each optimizer step (`WeightSync.push`):

    pause -> flush -> send -> stage -> load -> reset prefix cache -> bump version
          -> (all loaded: drop the old copy | any not: every engine back to the old version)
          -> resume

- pause/flush: a rollout actor runs one method at a time, so a sync call waits until the
  generate call in flight has returned; nothing is half-sampled across versions.
- send + stage: the full weights travel to every worker of every engine and are held there
  beside the weights being served, checked against the model's own parameter names and
  shapes. An engine's workers are the processes that hold its weights: one per
  tensor-parallel shard of a vLLM engine, in the actor's process or in vLLM's own (each
  has a `WeightReceiver`, through the worker extension `EngineWeightReceiver`; it is sent
  the whole model and loads its shard of it); the transformers engine's one, in the actor.
  Only plain data (names, shapes, dtype names, a path) crosses vLLM's RPCs; the bytes go by
  one of two transports (`sync.transport`):
  - "object_store": every learner rank takes part in gathering the weights (ZeRO-3 shards
    them; the gathers are collectives, one bucket of about `sync.bucket_mb` at a time),
    rank 0 returns them as numpy arrays, which Ray puts in its object store once; each
    rollout actor reads them from there (zero-copy on one node) and hands them to a worker
    in its process as they are, or to workers in other processes as a safetensors file in
    shared memory.
  - "broadcast": learner rank 0 and every engine worker form their own torch.distributed
    group (NCCL when learner and engines are on GPUs, else gloo; never the default group,
    which DeepSpeed owns), and rank 0 broadcasts the weights packed in buckets of about
    `sync.bucket_mb`. Sender and receivers cut the buckets with the same function
    (`plan_buckets`) from one manifest. A group whose members change (an engine replaced)
    is closed by those that remain and formed anew.
  - "cuda_ipc" (colocated on GPUs, `cluster.colocate`): each learner rank hands the engine
    beside it CUDA IPC handles to its own parameters (ZeRO-1/2: whole on every rank), and
    the engine's worker copies them on the device: no trip through host memory.
- load (commit): only when every engine holds the whole new version does the driver tell
  them to load it in place, drop their prefix caches (keys/values computed with the old
  weights) and take the new version number. Every sample generated afterwards carries it.
- conclude: when every engine has loaded, each drops its copy of the version it served
  before. If one did not (its load failed, part-way or not, timed out, or it died), the
  driver tells every live engine to load the version it served before again, whole (those
  that loaded the new one, and the one whose load stopped part-way), checks that each
  reports that version, and raises `WeightSyncError` naming the engine and what happened.
  An engine that died is not rolled back: it serves nothing, and an engine started in its
  place serves the model folder's weights (version 0) until a push brings it up to date.

Every remote call and every collective has a timeout (`sync.timeout_s`). A sync that fails
or times out before the commit raises `WeightSyncError` naming the stage, and every engine
keeps serving its previous weights whole: staged weights are only ever loaded by a commit
for their own version. So after any failure every live engine serves the version it served
before the sync, whole (should going back fail too, the error says which engine may not),
and every sample says which version made it. `WeightSync.check` scores one fixed sequence
on the learner and on every engine and stops the run if their log-probs differ on average by
more than kernel noise does in the dtype (`CHECK`).

Memory per engine worker besides the engine's own weights, on the group's device (M: the
model's size as sent, float32 from the object store, the learner's dtype by broadcast; every
tensor-parallel worker holds all of it). Going back needs the served version whole, and an
engine cannot hand its loaded weights back (vLLM repacks them), so each worker keeps the
tensors it loaded:
- between syncs, the served version: nothing for version 0 (reread from the model folder).
  By broadcast, views into the receive buffers; an engine keeps two sets of buffers (2M
  from its second sync on) and receives into the one the served weights do not use, so a
  sync never overwrites them and buffers are still reused (faulting in fresh memory cost
  more than the transfer). From the object store, the arrays stay pinned in Ray's store
  (M per node: the engines on one node share them) or, read from a shared file, M per worker.
- during a sync, also the staged version (M; broadcast: the other set of buffers).
- from its commit until every engine has committed, also the version served before (M),
  for a rollback; dropped as soon as every engine has loaded the new one.
"""

from __future__ import annotations

import contextlib
import datetime
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cluster.config import SyncConfig
from learner.models import parameter_shapes


@dataclass(frozen=True)
class Bounds:
    """What `WeightSync.check` accepts of |learner - engine| log-probs over a probe's tokens.

    A broken sync moves most tokens (a layer missing or stale, a shard mixed up), kernel
    noise moves a few (bf16 reductions in another order, another attention kernel): so the
    check stops the run on the mean, and only warns on the tail (p99), where noise alone can
    reach. Measured with bench/sync_noise.py (SmolLM2-135M, vLLM against the learner's
    forward, 175 tokens; bench/RESULTS.md):
    - float32: noise mean 7.7e-6, p99 3.5e-5; every broken sync tried is above 5e-4 on
      average (even an engine one optimizer step behind).
    - bfloat16: noise mean 5.9e-2, p99 0.36, max 0.5 (as reported for GPUs too: 0.1-0.5
      nats on single tokens); a layer's q and k mixed up 0.38, a layer missing 0.58. An
      engine a step or a layer stale cannot be told from noise in bf16.
    """

    mean: float  # stop above: beyond the noise measured, below the broken syncs it can see
    p99: float  # warn above: beyond the noise measured


CHECK = {"float32": Bounds(mean=1e-4, p99=1e-3), "bfloat16": Bounds(mean=0.15, p99=1.0)}

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
    """This process's handle on the sync group: rank 0 (learner) hosts the store at host:port.

    NCCL on GPUs, gloo otherwise; either way every collective is bounded by `timeout_s`. An
    NCCL group's watchdog by default kills the process when a collective times out; here it
    only aborts the group (TORCH_NCCL_ASYNC_ERROR_HANDLING=2, read when the group is made), so
    a hung sync raises `WeightSyncError` in the driver and the run can go on or stop cleanly.
    """
    import os

    import torch.distributed as dist

    timeout = datetime.timedelta(seconds=timeout_s)
    store = dist.TCPStore(host, port, world_size, is_master=rank == 0, timeout=timeout,
                          wait_for_workers=False)
    store = dist.PrefixStore("r1ray-weight-sync", store)
    if device != "cuda":
        return dist.ProcessGroupGloo(store, rank, world_size, timeout)
    options = dist.ProcessGroupNCCL.Options()
    options._timeout = timeout
    before = os.environ.get("TORCH_NCCL_ASYNC_ERROR_HANDLING")
    os.environ["TORCH_NCCL_ASYNC_ERROR_HANDLING"] = "2"  # abort the group, not the process
    try:
        return dist.ProcessGroupNCCL(store, rank, world_size, options)
    finally:
        if before is None:
            os.environ.pop("TORCH_NCCL_ASYNC_ERROR_HANDLING")
        else:
            os.environ["TORCH_NCCL_ASYNC_ERROR_HANDLING"] = before


def _broadcast(group, buffer, timeout_s: float) -> None:
    import torch.distributed as dist

    opts = dist.BroadcastOptions()
    opts.rootRank = 0
    group.broadcast([buffer], opts).wait(datetime.timedelta(seconds=timeout_s))


class BroadcastEnd:
    """One end of the broadcast transport: the group, and reusable buffers for every bucket.

    The buffers are kept between syncs: faulting in fresh memory for every sync cost more
    than the transfer itself (405 MB to 2 receivers on 2 cores: 0.7 s fresh, 0.3 s reused).
    The sender needs one set. On a receiver, staged and served weights are views into them,
    so it keeps two sets and receives into the one its served weights do not use.
    """

    def __init__(self, group, device: str):
        self.group, self.device = group, device
        self.key: tuple | None = None
        # Each set: per bucket (parameter indices, their byte sizes, one buffer).
        self.sets: list[list[tuple[list[int], list[int], Any]]] = []

    def close(self) -> None:
        """Leave the group for good (its members are being replaced): an NCCL group's
        communicators are aborted now rather than whenever the object is collected."""
        abort = getattr(self.group, "abort", None)
        if abort is not None:
            with contextlib.suppress(Exception):  # a group broken by a failed sync may refuse
                abort()
        self.group = None

    def plan(self, manifest: Manifest, bucket_bytes: int, busy: list | None = None
             ) -> list[tuple[list[int], list[int], Any]]:
        """The buckets of `manifest`, with the first set of buffers that is not `busy`."""
        import torch

        key = (tuple(manifest), bucket_bytes)
        if key != self.key:
            self.sets, self.key = [], key
        for buckets in self.sets:
            if buckets is not busy:
                return buckets
        buckets = []
        for bucket in plan_buckets(manifest, bucket_bytes):
            sizes = [_nbytes(manifest[i][1], manifest[i][2]) for i in bucket]
            buckets.append((bucket, sizes, torch.empty(sum(sizes), dtype=torch.uint8, device=self.device)))
        self.sets.append(buckets)
        return buckets


# ---- learner half (runs inside each learner rank) ------------------------------------------

def learner_manifest(engine: Any) -> Manifest:
    """What the learner sends: every parameter's name, full (unsharded) shape and dtype."""
    return [(name, tuple(getattr(p, "ds_shape", p.shape)), str(p.dtype).removeprefix("torch."))
            for name, p in engine.module.named_parameters()]


def _parameter_buckets(engine: Any, zero_stage: int, bucket_bytes: int):
    """The module's parameters bucket by bucket (`plan_buckets` of the manifest), each bucket
    whole on every rank while it is yielded: under ZeRO-3 one gather (a collective) per
    bucket, so a sync never holds more than one bucket of gathered weights at once. DeepSpeed
    is imported only for ZeRO-3: a plain model's weights go without it (bench/gpu_check.py)."""
    import torch

    if zero_stage == 3:
        import deepspeed
    params = list(engine.module.named_parameters())
    for bucket in plan_buckets(learner_manifest(engine), bucket_bytes):
        chosen = [params[i] for i in bucket]
        gather = (deepspeed.zero.GatheredParameters([p for _, p in chosen], modifier_rank=None)
                  if zero_stage == 3 else contextlib.nullcontext())
        with gather, torch.no_grad():
            yield chosen


def gather_weights(engine: Any, zero_stage: int, rank: int, bucket_bytes: int = 64 * 2**20
                   ) -> dict[str, np.ndarray] | None:
    """Object-store transport: full float32 weights by HF name on rank 0, None elsewhere.

    All ranks must call this together under ZeRO-3.
    """
    import torch

    weights = {}
    for chosen in _parameter_buckets(engine, zero_stage, bucket_bytes):
        if rank == 0:
            # ZeRO-3 frees the gathered copies when the bucket ends: copy them out first.
            # Otherwise the arrays are views that Ray copies into its store when this returns.
            weights.update((name, _as_numpy(p.detach().to(torch.float32), zero_stage == 3)) for name, p in chosen)
    return weights if rank == 0 else None


def _as_numpy(t, copy: bool) -> np.ndarray:
    arr = t.cpu().numpy()
    return arr.copy() if copy else arr


def share_weights(engine: Any) -> list[tuple[str, bytes]]:
    """CUDA IPC transport, sending half (colocated ranks on GPUs, ZeRO-1/2: every rank holds
    the whole model): each parameter's name and its CUDA IPC handle, pickled. The engine
    beside this rank opens the handles and copies the tensors on the device; the parameters
    stay valid until the next optimizer step, which the driver orders after the commit."""
    import pickle

    import torch
    from torch.multiprocessing.reductions import reduce_tensor

    with torch.no_grad():
        return [(name, pickle.dumps(reduce_tensor(p.detach()))) for name, p in engine.module.named_parameters()]


def send_weights(engine: Any, zero_stage: int, rank: int, end: BroadcastEnd | None, bucket_bytes: int,
                 timeout_s: float) -> int:
    """Broadcast transport, sending half: rank 0 broadcasts bucket by bucket; returns bytes sent.

    Every learner rank calls this (the ZeRO-3 gathers are collective); only rank 0 has an `end`.
    """
    import torch

    buckets = end.plan(learner_manifest(engine), bucket_bytes) if rank == 0 else None
    sent = 0
    for k, chosen in enumerate(_parameter_buckets(engine, zero_stage, bucket_bytes)):
        if rank != 0:
            continue
        _, sizes, flat = buckets[k]
        for (_, p), part in zip(chosen, torch.split(flat, sizes)):
            part.copy_(p.detach().contiguous().view(-1).view(torch.uint8))
        _broadcast(end.group, flat, timeout_s)
        sent += flat.numel()
    return sent


# ---- engine half (runs inside each rollout actor) --------------------------------------------


@dataclass
class Held:
    """One whole version of the weights as an engine holds it."""

    version: int
    named: list | None  # (HF name, tensor) pairs; None: the model folder's own files
    buffers: list | None = None  # the broadcast buffer set the tensors are views into


class WeightReceiver:
    """Serves one version whole: stages a new one beside it, loads it only on commit, and
    can load the one served before again (`rollback`).

    What it holds (sizes in the module docstring): `served`, the version the engine serves,
    as loaded (version 0: the model folder); `staged`, a checked new version until a commit
    has loaded it, kept when the load fails; `previous`, after a commit, the version served
    before it, until `release` (every engine committed) or `rollback` (one did not).
    `load` is the engine's in-place loader: it takes (name, tensor) pairs of a whole model.

    An engine has one receiver per process that holds its weights: a vLLM engine one in each
    of its workers (a worker per tensor-parallel rank, `rank`), each sent the whole model and
    loading its own shard of it; the transformers engine one, in the rollout actor.
    """

    def __init__(self, model_dir: str, load, rank: int = 0):
        self.model_dir = model_dir
        self.expected = parameter_shapes(model_dir)  # the engine's own model, from its files
        self.load, self.rank = load, rank
        self.served = Held(0, None)
        self.staged: Held | None = None
        self.previous: Held | None = None
        self.end: BroadcastEnd | None = None

    def worker_rank(self) -> int:
        """This receiver's worker's rank in its engine (every worker answers: that counts them)."""
        return self.rank

    def stage(self, version: int, named: list[tuple[str, Any]], buffers: list | None = None) -> int:
        """Check a whole new version against the model's names and shapes and hold it."""
        self.staged = self.previous = None  # a new sync: the driver has concluded the last one
        names = [n for n, _ in named]
        missing, unknown = set(self.expected) - set(names), set(names) - set(self.expected)
        if missing or unknown:
            raise WeightSyncError(f"weights version {version} do not match the engine's model: "
                                  f"missing {sorted(missing)[:3]}, unknown {sorted(unknown)[:3]}")
        for name, t in named:
            if tuple(t.shape) != self.expected[name]:
                raise WeightSyncError(f"weights version {version}: {name} has shape {tuple(t.shape)}, "
                                      f"the engine's model has {self.expected[name]}")
        self.staged = Held(version, named, buffers)
        return sum(t.nbytes for _, t in named)

    def stage_arrays(self, version: int, weights: dict[str, np.ndarray]) -> int:
        """Object-store transport: stage numpy arrays read from Ray's store (read-only views,
        which keep the object pinned there while they are held)."""
        import warnings

        import torch

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # store arrays are read-only; the loader copies them
            named = [(name, torch.from_numpy(arr)) for name, arr in weights.items()]
        return self.stage(version, named)

    def stage_ipc(self, version: int, handles: list[tuple[str, bytes]]) -> int:
        """CUDA IPC transport: open the learner's tensors on this GPU (`share_weights`) and
        stage a copy of them, made on the device (the learner's change at its next step)."""
        import pickle

        import torch

        named = []
        for name, handle in handles:
            rebuild, args = pickle.loads(handle)
            args = list(args)
            args[6] = torch.cuda.current_device()  # the same GPU, numbered as this process sees it
            named.append((name, rebuild(*args).clone()))
        torch.cuda.synchronize()
        return self.stage(version, named)

    def stage_file(self, version: int, path: str) -> int:
        """Object-store transport into another process: stage the tensors of a safetensors
        file the rollout actor wrote from the store's arrays (`shared_file`)."""
        from safetensors.torch import load_file

        return self.stage(version, list(load_file(path).items()))

    def join(self, host: str, port: int, first_rank: int, world_size: int, timeout_s: float,
             device: str) -> None:
        """Join the broadcast group as rank `first_rank` + this receiver's rank in its engine,
        leaving the group it was in; buffers live on `device` ("cuda": an NCCL group)."""
        if self.end is not None:
            self.end.close()
            self.end = None
        self.end = BroadcastEnd(join_group(host, port, first_rank + self.rank, world_size, timeout_s, device),
                                device)

    def receive(self, version: int, manifest: Manifest, bucket_bytes: int, timeout_s: float) -> int:
        """Broadcast transport, receiving half: every bucket into the buffers that the served
        weights do not use, then stage."""
        import torch

        if self.end is None:
            raise WeightSyncError("this engine has not joined the sync group")
        manifest = [(name, tuple(shape), dtype) for name, shape, dtype in manifest]  # lists after an RPC
        self.staged = self.previous = None  # their buffers may be about to be overwritten
        buckets = self.end.plan(manifest, bucket_bytes, busy=self.served.buffers)
        named = []
        for bucket, sizes, flat in buckets:
            _broadcast(self.end.group, flat, timeout_s)
            for i, part in zip(bucket, torch.split(flat, sizes)):
                name, shape, dtype = manifest[i]
                named.append((name, part.view(getattr(torch, dtype)).view(shape)))
        return self.stage(version, named, buckets)

    def commit(self, version: int) -> None:
        """Load the staged weights if they are `version`, then serve them; the caller then
        bumps its version. A load that fails keeps them staged and the served copy as it was."""
        if self.staged is None or self.staged.version != version:
            held = None if self.staged is None else self.staged.version
            raise WeightSyncError(f"cannot load weights version {version}: the engine holds {held}")
        self.load(self.staged.named)
        self.previous, self.served, self.staged = self.served, self.staged, None

    def rollback(self) -> int:
        """Load the version served before this sync's commit whole and serve it; returns it.

        Loaded even when this engine's commit failed or never ran: a load that stopped
        part-way may have changed any weight.
        """
        back = self.previous if self.previous is not None else self.served
        self.load(back.named if back.named is not None else model_weights(self.model_dir))
        self.served, self.staged, self.previous = back, None, None
        return back.version

    def release(self) -> None:
        """Every engine serves the new version: the one served before it is not needed."""
        self.previous = None


def model_weights(model_dir: str) -> list[tuple[str, Any]]:
    """Version 0 whole: the tensors of the model folder's safetensors files."""
    from safetensors.torch import load_file

    return [item for f in sorted(Path(model_dir).glob("*.safetensors")) for item in load_file(str(f)).items()]


def call_receiver(receiver: WeightReceiver, method: str, args: tuple) -> tuple[Any, str | None]:
    """(what `receiver.method(*args)` returned, None) or (None, why it failed). A failure is an
    answer, not an exception: vLLM's multi-process RPC stops reading its workers' answers at
    the first failure, and the unread ones would be taken for the answers to the next call."""
    try:
        return getattr(receiver, method)(*args), None
    except Exception as err:  # noqa: BLE001 - reported to the caller, who raises it
        return None, f"{type(err).__name__}: {err}"


def agreed(answers: list[tuple[Any, str | None]]) -> Any:
    """The one value every worker of an engine answered (`call_receiver`), or
    `WeightSyncError` naming the first worker that failed, or saying they disagree."""
    for rank, (value, why) in enumerate(answers):
        if why is not None:
            raise WeightSyncError(f"worker {rank}: {why}")
    values = [value for value, _ in answers]
    if any(v != values[0] for v in values):
        raise WeightSyncError(f"the engine's workers disagree: {values}")
    return values[0]


@contextlib.contextmanager
def shared_file(weights: dict[str, np.ndarray]):
    """The object store's arrays as a safetensors file for the duration: how they reach engine
    workers in other processes, whose RPC arguments must be plain data (vLLM's msgpack drops
    tensors' bytes). In shared memory (/dev/shm) where it has room, else in the temporary
    folder (containers often give /dev/shm 64 MB)."""
    import os
    import shutil
    import tempfile

    from safetensors.numpy import save_file

    size = sum(a.nbytes for a in weights.values())
    folder = "/dev/shm" if os.path.isdir("/dev/shm") and shutil.disk_usage("/dev/shm").free > 1.1 * size else None
    fd, path = tempfile.mkstemp(prefix="r1ray-weights-", suffix=".safetensors", dir=folder)
    os.close(fd)
    try:
        save_file(weights, path)
        yield path
    finally:
        os.unlink(path)


class EngineWeightReceiver:
    """vLLM worker extension: this worker's `WeightReceiver`, behind one RPC method.

    The rollout actor calls `llm.collective_rpc("r1ray_weights", args=(method, *args))`, which
    runs `method` on the receiver of every worker of the engine: in the actor's process (CPU,
    one worker) or in vLLM's worker processes (GPU; tensor parallelism; the engine core out
    of process), each of which joins the broadcast group itself. Arguments and answers are
    plain data (names, shapes, dtype names, numbers, a file path) so that they survive any
    of vLLM's RPC paths; the weights' bytes travel by the collective or a shared file.

    Loading uses `model_runner.reload_weights` rather than `model.load_weights`: on CPU the
    engine repacks weights after the first load and a second plain load fails.
    """

    def r1ray_weights(self, method: str, *args) -> tuple[Any, str | None]:
        receiver = getattr(self, "r1ray_receiver", None)
        if receiver is None:
            from vllm.distributed import get_tensor_model_parallel_rank

            receiver = self.r1ray_receiver = WeightReceiver(
                self.model_runner.model_config.model, self.r1ray_load, get_tensor_model_parallel_rank())
        return call_receiver(receiver, method, args)

    def r1ray_load(self, named) -> None:
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        try:
            self.model_runner.reload_weights(weights_iterator=iter(named))
        except BaseException:
            # A reload that stops part-way leaves the layers still waiting for weights on
            # the meta device, and the next reload would skip setting them up: put every
            # layer back on its own tensors, so a rollback can load whole weights again.
            finalize_layerwise_reload(self.model_runner.get_model(), self.model_runner.model_config)
            raise


# ---- the protocol (runs in the driver) -------------------------------------------------------

class WeightSync:
    """The driver's handle on the protocol between the learner ranks and the rollout actors."""

    def __init__(self, learners: list, rollouts: list, cfg: SyncConfig, dtype: str, device: str = "cpu"):
        """`device`: where the broadcast group's buffers live, "cuda" (an NCCL group) only when
        the learner and the engines are all on GPUs."""
        self.learners, self.rollouts, self.cfg, self.dtype, self.device = learners, rollouts, cfg, dtype, device
        self.manifest: Manifest | None = None
        self.connected = False

    def connect(self) -> None:
        """Broadcast transport: form the sync group. Learner rank 0 is its rank 0, then come the
        engines' workers (the processes that hold an engine's weights: one per tensor-parallel
        shard), engine by engine. Members of a group formed before (engines that survived a
        replacement, the learner) leave it first."""
        if self.cfg.transport != "broadcast":
            return
        self.manifest = self._get(self.learners[0].weight_manifest.remote(), "reading the manifest")
        host, port = self._get(self.learners[0].sync_address.remote(), "choosing an address")
        workers = self._get([r.weight_workers.remote() for r in self.rollouts], "counting the engines' workers")
        world = 1 + sum(workers)
        refs = [self.learners[0].join_sync_group.remote(host, port, 0, world, self.cfg.timeout_s, self.device)]
        refs += [r.join_sync_group.remote(host, port, 1 + sum(workers[:i]), world, self.cfg.timeout_s, self.device)
                 for i, r in enumerate(self.rollouts)]
        self._get(refs, f"forming the sync group of {world} processes at {host}:{port}")
        self.connected = True

    def replace(self, rollouts: list) -> None:
        """New rollout actors (after a restart): the next push re-forms the group with them."""
        self.rollouts = rollouts
        self.connected = False

    def push(self, version: int) -> dict[str, float]:
        """Send the learner's weights to every engine and switch them all to `version`; on a
        failure, every live engine serves the version it served before (see the module)."""
        start = time.perf_counter()
        staged = self._send(version)  # per engine: (bytes staged, version it serves)
        self._commit(version, [served for _, served in staged])
        seconds = time.perf_counter() - start
        nbytes = staged[0][0]
        return {"timing/sync": seconds, "sync/bytes": float(nbytes), "sync/version": float(version),
                "sync/gb_per_s": nbytes * len(self.rollouts) / seconds / 1e9}

    def _send(self, version: int) -> list[tuple[int, int]]:
        """Send + stage: every engine holds the whole new version beside the served one."""
        if self.cfg.transport == "broadcast":
            if not self.connected:
                self.connect()
            bucket = int(self.cfg.bucket_mb * 2**20)
            sends = [l.send_weights.remote(bucket, self.cfg.timeout_s) for l in self.learners]
            receives = [r.receive_weights.remote(version, self.manifest, bucket, self.cfg.timeout_s)
                        for r in self.rollouts]
            try:
                return self._get(receives + sends, f"broadcasting weights version {version}")[:len(receives)]
            except WeightSyncError:
                self.connected = False  # a broken collective leaves the group unusable
                raise
        if self.cfg.transport == "cuda_ipc":  # engine i beside rank i (cluster.colocate)
            handles = [l.share_weights.remote() for l in self.learners]
            return self._get([r.stage_shared.remote(h, version) for r, h in zip(self.rollouts, handles)],
                             f"handing weights version {version} to the engines beside the learner ranks")
        refs = [l.gather_weights.remote(int(self.cfg.bucket_mb * 2**20)) for l in self.learners]
        self._get(refs, "gathering weights from the learner", fetch=False)
        self._get(refs[1:], "gathering weights from the learner")  # surfaces rank errors
        return self._get([r.stage_weights.remote(refs[0], version) for r in self.rollouts],
                         f"sending weights version {version} to the engines")

    def _commit(self, version: int, before: list[int]) -> None:
        """Every engine loads `version`; if one does not, every live engine goes back to the
        version it served `before`, and the error says what happened to which engine."""
        loaded = self._each([r.commit_weights.remote(version) for r in self.rollouts])
        failed = {i: why or f"reports version {got}"
                  for i, (got, why, _) in enumerate(loaded) if why or got != version}
        if not failed:
            self._get([r.release_weights.remote() for r in self.rollouts],
                      f"dropping the weights served before version {version}")
            return
        live = [i for i, (_, _, died) in enumerate(loaded) if not died]
        back = self._each([self.rollouts[i].rollback_weights.remote() for i in live])
        whole = [i for i, (got, why, _) in zip(live, back) if not why and got == before[i]]
        notes = [f"engine {i} could not go back to version {before[i]} "
                 f"({why or f'it reports version {got}'}): its weights may be mixed"
                 for i, (got, why, _) in zip(live, back) if i not in whole]
        if whole:
            notes.insert(0, f"engines {whole} serve versions {[before[i] for i in whole]} again, whole")
        dead = [i for i, (_, _, died) in enumerate(loaded) if died]
        if dead:
            notes.append(f"engines {dead} died and must be replaced")
        what = "; ".join(f"engine {i}: {why}" for i, why in failed.items())
        raise WeightSyncError(f"weight sync: loading weights version {version} failed on {what}. "
                              + "; ".join(notes))

    def check(self, token_ids: np.ndarray) -> dict[str, float]:
        """Score a fixed sequence on the learner and every engine; returns the worst engine's
        mean, p99 and max |learner - engine| log-prob as metrics. Raises `WeightSyncError`
        when a mean is beyond the dtype's bound (`CHECK`); prints a warning when only the
        tail (p99) is: kernel noise can do that, a broken sync moves more than a few tokens."""
        # Every rank scores (a ZeRO-3 forward is collective); rank 0's answer is the learner's.
        learner_lp = self._get([l.score.remote(token_ids) for l in self.learners], "scoring on the learner")[0]
        engine_lps = self._get([r.score.remote(token_ids) for r in self.rollouts], "scoring on the engines")
        bounds = CHECK[self.dtype]
        stats = [spread(np.abs(lp - learner_lp)) for lp in engine_lps]
        for i, (mean, p99, worst) in enumerate(stats):
            if mean > bounds.mean:
                raise WeightSyncError(
                    f"after sync engine {i}'s log-probs differ from the learner's by {mean:.2e} on average over "
                    f"{len(learner_lp)} tokens (p99 {p99:.2e}, max {worst:.2e}); in {self.dtype} a working sync "
                    f"stays below {bounds.mean:g}: the engine does not serve the learner's weights")
            if p99 > bounds.p99:
                print(f"r1ray: warning: after sync engine {i}'s log-probs differ from the learner's by "
                      f"{p99:.2e} at the 99th percentile (mean {mean:.2e}, within {bounds.mean:g}); beyond the "
                      f"kernel noise measured in {self.dtype} ({bounds.p99:g}), but not on enough tokens "
                      "to be a broken sync", flush=True)
        mean, p99, worst = (max(column) for column in zip(*stats))
        return {"sync/logprob_diff_mean": mean, "sync/logprob_diff_p99": p99, "sync/logprob_diff_max": worst}

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
            raise WeightSyncError(f"weight sync: {stage} failed: {_reason(err)}") from err
        return values[0] if single else values

    def _each(self, refs: list) -> list[tuple[Any, str | None, bool]]:
        """Every call's (value, why it failed or None, whether its actor died), within the
        sync timeout; unlike `_get`, one call's failure does not hide the others' results."""
        import ray

        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=self.cfg.timeout_s, fetch_local=False)
        ready = set(ready)
        results = []
        for ref in refs:
            if ref not in ready:
                results.append((None, f"took longer than {self.cfg.timeout_s:g}s (sync.timeout_s)", False))
                continue
            try:
                results.append((ray.get(ref), None, False))
            except ray.exceptions.RayActorError as err:
                results.append((None, f"died: {_reason(err)}", True))
            except ray.exceptions.RayError as err:
                results.append((None, _reason(err), False))
        return results


def spread(diff: np.ndarray) -> tuple[float, float, float]:
    """(mean, 99th percentile, max) of |differences|: what the check compares (`CHECK`)."""
    return float(diff.mean()), float(np.quantile(diff, 0.99)), float(diff.max())


def _reason(err: Exception) -> str:
    """The last line of a remote error's cause: what went wrong, without the traceback."""
    cause = getattr(err, "cause", None) or err
    return str(cause).strip().splitlines()[-1] if str(cause).strip() else type(cause).__name__
