"""Weight sync: the learner's new weights reach every rollout engine. Both halves live here.

The protocol, run by the driver after each optimizer step (`sync_weights`):

    pause -> flush -> send -> load -> reset prefix cache -> bump version -> resume

- pause/flush: a rollout actor runs one method at a time, so an `update_weights` call waits
  until the generate call in flight has returned; nothing is half-sampled across versions.
- send: every learner rank takes part in gathering the full weights (ZeRO-3 shards them;
  the gather is a collective), rank 0 returns them as float32 numpy arrays, which Ray puts
  in its object store once; each engine reads them from there (zero-copy on one node).
- load: the engine's worker copies them into its model in place (`EngineWeightReceiver`),
  then drops its prefix cache, whose keys/values were computed with the old weights.
- bump version/resume: the actor's `weight_version` becomes the learner's step, and every
  sample generated afterwards carries it.

Every remote call has a timeout; a sync that fails raises `WeightSyncError` naming the
stage. `check_sync` scores one fixed sequence on the learner and on every engine and fails
if their log-probs differ by more than the dtype's tolerance.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

import numpy as np

# Largest |learner - engine| log-prob difference accepted after a sync, per learner dtype.
TOLERANCE = {"float32": 1e-3, "bfloat16": 5e-2}


class WeightSyncError(RuntimeError):
    """A weight sync did not complete, or an engine disagrees with the learner after one."""


# ---- learner half (runs inside each learner rank) ------------------------------------------

def gather_weights(engine: Any, zero_stage: int) -> dict[str, np.ndarray] | None:
    """Full float32 weights by HF parameter name on rank 0, None on the other ranks.

    All ranks must call this together under ZeRO-3: the gather is a collective.
    """
    import deepspeed
    import torch
    import torch.distributed as dist

    params = list(engine.module.named_parameters())
    rank = dist.get_rank() if dist.is_initialized() else 0
    gather = (deepspeed.zero.GatheredParameters([p for _, p in params], modifier_rank=None)
              if zero_stage == 3 else contextlib.nullcontext())
    with gather, torch.no_grad():
        if rank != 0:
            return None
        return {name: p.detach().to(torch.float32).numpy().copy() for name, p in params}


# ---- engine half (runs inside the vLLM worker, mixed in by `worker_extension_cls`) --------

class EngineWeightReceiver:
    """vLLM worker extension: load HF-named weights into the running model in place.

    `model_runner.reload_weights` is used rather than `model.load_weights`: on CPU the
    engine repacks weights after the first load and a second plain load fails.
    """

    def load_policy_weights(self, weights: dict[str, np.ndarray]) -> None:
        import warnings

        import torch

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # object-store arrays are read-only; vLLM copies them
            tensors = [(name, torch.from_numpy(arr)) for name, arr in weights.items()]
        self.model_runner.reload_weights(weights_iterator=iter(tensors))


# ---- the protocol (runs in the driver) -------------------------------------------------------

def sync_weights(learners: list, rollouts: list, version: int, timeout_s: float) -> dict[str, float]:
    """Send the learner's weights to every rollout actor and set their version; returns metrics."""
    import ray

    start = time.perf_counter()
    refs = [learner.gather_weights.remote() for learner in learners]
    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout_s, fetch_local=False)
    if len(ready) < len(refs):
        raise WeightSyncError(f"gathering weights from {len(learners)} learner rank(s) took longer "
                              f"than {timeout_s:.0f}s (cluster.timeout_s)")
    try:
        loaded = ray.get([r.update_weights.remote(refs[0], version) for r in rollouts], timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        raise WeightSyncError(f"loading weights version {version} into {len(rollouts)} engine(s) took "
                              f"longer than {timeout_s:.0f}s (cluster.timeout_s)") from None
    versions = [v for v, _ in loaded]
    if versions != [version] * len(rollouts):
        raise WeightSyncError(f"engines report versions {versions} after loading version {version}")
    return {"timing/sync": time.perf_counter() - start, "sync/bytes": float(loaded[0][1]),
            "sync/version": float(version)}


def check_sync(learners: list, rollouts: list, token_ids: np.ndarray, dtype: str,
               timeout_s: float) -> float:
    """Max |learner - engine| log-prob over a fixed sequence; raises beyond the dtype's tolerance."""
    import ray

    # Every rank scores (a ZeRO-3 forward is collective); rank 0's answer is the learner's.
    learner_lp = ray.get([learner.score.remote(token_ids) for learner in learners], timeout=timeout_s)[0]
    engine_lps = ray.get([r.score.remote(token_ids) for r in rollouts], timeout=timeout_s)
    worst = max(float(np.abs(lp - learner_lp).max()) for lp in engine_lps)
    if worst > TOLERANCE[dtype]:
        raise WeightSyncError(f"after sync an engine's log-probs differ from the learner's by "
                              f"{worst:.2e} (tolerance for {dtype}: {TOLERANCE[dtype]:.0e})")
    return worst
