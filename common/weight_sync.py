"""Weight sync, both halves: what the learner ranks send and what every engine worker receives,
and the bucket plan that sender and receivers cut the weights by. The driver orders the steps
(cluster/weight_sync.py: pause -> flush -> send -> stage -> load -> bump version -> resume);
the learner (learner/learner.py) and the rollout actors (actors/) call the halves here.

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

# One entry per parameter, in the order the learner sends them: (HF name, shape, torch dtype name).
Manifest = list[tuple[str, tuple[int, ...], str]]


class WeightSyncError(RuntimeError):
    """A weight sync did not complete, or an engine disagrees with the learner after one."""

    def __init__(self, message: str, stage: str = "syncing weights"):
        super().__init__(message)
        self.stage = stage
        """What the sync was doing (e.g. "staging weights version 3"): the phase a fault names."""


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


def parameter_shapes(model_dir: str | Path) -> dict[str, tuple[int, ...]]:
    """Each parameter's shape in a saved model folder, read from its safetensors headers."""
    from safetensors import safe_open

    shapes = {}
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for name in st.keys():
                shapes[name] = tuple(st.get_slice(name).get_shape())
    return shapes


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
        retie_output_embeddings(self.model_runner.get_model(), self.model_runner.model_config.hf_config)


def retie_output_embeddings(model, hf_config) -> None:
    """Make the output head of a model with tied embeddings (SmolLM2, Qwen2.5 up to 3B, Llama
    3.2 1B/3B) compute with its input embeddings' new weights after a load.

    Their checkpoints hold no head, so a reload never touches it, and on CPU the head keeps
    the weights packed at the first load: without this the engine would go on sampling
    through the first version's output head, whatever the learner trains."""
    if not getattr(hf_config, "tie_word_embeddings", False):
        return
    head, embed = getattr(model, "lm_head", None), getattr(getattr(model, "model", None), "embed_tokens", None)
    if head is None or embed is None:
        raise WeightSyncError(f"{type(model).__name__} ties its embeddings but has no lm_head and model.embed_tokens "
                              "to tie again after a load: its output head would keep its first weights")
    if head.weight is not embed.weight:
        head.weight = embed.weight
    # On CPU the head computes logits from a copy packed for oneDNN when it was loaded: pack it
    # again from the new weights (no-op on GPUs).
    head.quant_method.process_weights_after_loading(head)
