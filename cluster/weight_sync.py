"""Weight sync: the learner's new weights reach every rollout engine. The driver's side lives here;
the halves (learner and engine) and the transports are in common/weight_sync.py.

The protocol, run by the driver after each optimizer step (`WeightSync.push`):

    pause -> flush -> send -> stage -> load -> reset prefix cache -> bump version
          -> (all loaded: drop the old copy | any not: every engine back to the old version)
          -> resume

- pause/flush: a rollout actor runs one method at a time, so a sync call waits until the
  generate call in flight has returned; nothing is half-sampled across versions.
- send + stage: the full weights travel to every worker of every engine and are held there
  beside the weights being served (common/weight_sync.py: the transports, `sync.transport`,
  and the memory each costs).
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
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from cluster import faults
from cluster.config import SyncConfig
from common.weight_sync import Manifest, WeightSyncError


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


# ---- the protocol (runs in the driver) -------------------------------------------------------

class WeightSync:
    """The driver's handle on the protocol between the learner ranks and the rollout actors."""

    def __init__(self, learners: list, rollouts: list, cfg: SyncConfig, dtype: str, device: str = "cpu"):
        """`device`: where the broadcast group's buffers live, "cuda" (an NCCL group) only when
        the learner and the engines are all on GPUs."""
        self.learners, self.rollouts, self.cfg, self.dtype, self.device = learners, rollouts, cfg, dtype, device
        self.manifest: Manifest | None = None
        self.connected = False
        self.members: list = []
        """The rollout actors the broadcast group was formed with (an engine replaced since is not in it)."""
        self.version = 0
        """The version every engine serves after the last push that completed."""

    def connect(self, phase: str = "syncing weights") -> None:
        """Broadcast transport: form the sync group. Learner rank 0 is its rank 0, then come the
        engines' workers (the processes that hold an engine's weights: one per tensor-parallel
        shard), engine by engine. Members of a group formed before (engines that survived a
        replacement, the learner) leave it first. `phase`: what a failure is found in (a push
        that re-forms the group is staging its version)."""
        if self.cfg.transport != "broadcast":
            return
        self.manifest = self._get(self.learners[0].weight_manifest.remote(), "reading the manifest", phase)
        host, port = self._get(self.learners[0].sync_address.remote(), "choosing an address", phase)
        workers = self._get([r.weight_workers.remote() for r in self.rollouts], "counting the engines' workers", phase)
        world = 1 + sum(workers)
        refs = [self.learners[0].join_sync_group.remote(host, port, 0, world, self.cfg.timeout_s, self.device)]
        refs += [r.join_sync_group.remote(host, port, 1 + sum(workers[:i]), world, self.cfg.timeout_s, self.device)
                 for i, r in enumerate(self.rollouts)]
        self._get(refs, f"forming the sync group of {world} processes at {host}:{port}", phase)
        self.connected, self.members = True, list(self.rollouts)

    def replace(self, rollouts: list) -> None:
        """New rollout actors: the next push re-forms the group with them. (The pool's own list
        of actors is this one: an engine it replaces in place is seen by the next push too.)"""
        self.rollouts = rollouts
        self.connected = False

    def push(self, version: int, only: list[int] | None = None) -> dict[str, float]:
        """Send the learner's weights to every engine and switch them all to `version`; on a
        failure, every live engine serves the version it served before (see the module).
        `only`: the engines to send them to, through the object store whatever the transport
        (an engine replaced while the others generate is brought alone to the version they
        serve: a broadcast needs every member, and theirs would wait for their generation)."""
        start = time.perf_counter()
        engines = list(range(len(self.rollouts))) if only is None else list(only)
        staged = self._send(version, engines, self.cfg.transport if only is None else "object_store")
        faults.inject("commit", "engine", self.rollouts)
        self._commit(version, engines, [served for _, served in staged])
        if only is None:
            self.version = version
        seconds = time.perf_counter() - start
        nbytes = staged[0][0]
        return {"timing/sync": seconds, "sync/bytes": float(nbytes), "sync/version": float(version),
                "sync/gb_per_s": nbytes * len(engines) / seconds / 1e9}

    def _send(self, version: int, engines: list[int], transport: str) -> list[tuple[int, int]]:
        """Send + stage: each of `engines` (indices; all of them but through the object store)
        holds the whole new version beside the served one."""
        if transport == "broadcast":
            if not self.connected or any(a is not b for a, b in zip(self.members, self.rollouts)):
                # first, after a failed broadcast, or with an engine replaced since
                self.connect(f"staging weights version {version}")
            bucket = int(self.cfg.bucket_mb * 2**20)
            sends = [l.send_weights.remote(bucket, self.cfg.timeout_s) for l in self.learners]
            receives = [r.receive_weights.remote(version, self.manifest, bucket, self.cfg.timeout_s)
                        for r in self.rollouts]
            faults.inject("stage", "engine", self.rollouts)
            try:
                return self._get(receives + sends, f"broadcasting weights version {version}",
                                 f"staging weights version {version}")[:len(receives)]
            except WeightSyncError:
                self.connected = False  # a broken collective leaves the group unusable
                raise
        if transport == "cuda_ipc":  # engine i beside rank i (cluster.colocate)
            handles = [l.share_weights.remote() for l in self.learners]
            staging = [r.stage_shared.remote(h, version) for r, h in zip(self.rollouts, handles)]
            faults.inject("stage", "engine", self.rollouts)
            return self._get(staging, f"handing weights version {version} to the engines beside the learner ranks",
                             f"staging weights version {version}")
        refs = [l.gather_weights.remote(int(self.cfg.bucket_mb * 2**20)) for l in self.learners]
        self._get(refs, "gathering weights from the learner", fetch=False)
        self._get(refs[1:], "gathering weights from the learner")  # surfaces rank errors
        staging = [self.rollouts[i].stage_weights.remote(refs[0], version) for i in engines]
        faults.inject("stage", "engine", self.rollouts)
        return self._get(staging, f"sending weights version {version} to the engines",
                         f"staging weights version {version}")

    def _commit(self, version: int, engines: list[int], before: list[int]) -> None:
        """Each of `engines` (indices) loads `version`; if one does not, every live one goes back
        to the version it served `before`, and the error says what happened to which engine."""
        loaded = dict(zip(engines, self._each([self.rollouts[i].commit_weights.remote(version) for i in engines])))
        before = dict(zip(engines, before))
        failed = {i: why or f"reports version {got}" for i, (got, why, _) in loaded.items() if why or got != version}
        if not failed:
            self._get([self.rollouts[i].release_weights.remote() for i in engines],
                      f"dropping the weights served before version {version}")
            return
        live = [i for i, (_, _, died) in loaded.items() if not died]
        back = self._each([self.rollouts[i].rollback_weights.remote() for i in live])
        whole = [i for i, (got, why, _) in zip(live, back) if not why and got == before[i]]
        notes = [f"engine {i} could not go back to version {before[i]} "
                 f"({why or f'it reports version {got}'}): its weights may be mixed"
                 for i, (got, why, _) in zip(live, back) if i not in whole]
        if whole:
            notes.insert(0, f"engines {whole} serve versions {[before[i] for i in whole]} again, whole")
        dead = [i for i, (_, _, died) in loaded.items() if died]
        if dead:
            notes.append(f"engines {dead} died and must be replaced")
        what = "; ".join(f"engine {i}: {why}" for i, why in failed.items())
        raise WeightSyncError(f"weight sync: loading weights version {version} failed on {what}. "
                              + "; ".join(notes), f"committing weights version {version}")

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

    def _get(self, refs, stage: str, phase: str = "syncing weights", fetch: bool = True):
        """Wait for remote calls within the sync timeout; any failure is one `WeightSyncError`
        (`phase`: what the sync was doing, for the fault it may be)."""
        import ray

        single = not isinstance(refs, list)
        refs = [refs] if single else refs
        done, failed = _wait_or_fail(refs, self.cfg.timeout_s, check=fetch)
        if not done and failed is None:
            raise WeightSyncError(f"weight sync: {stage} took longer than {self.cfg.timeout_s:g}s "
                                  "(sync.timeout_s); the engines keep their previous weights", phase)
        if not fetch and failed is None:
            return None
        try:
            values = ray.get(refs if failed is None else [failed])
        except ray.exceptions.RayError as err:
            raise WeightSyncError(f"weight sync: {stage} failed: {faults.cause_of(err)}", phase) from err
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
                results.append((None, f"died: {faults.cause_of(err)}", True))
            except ray.exceptions.RayError as err:
                results.append((None, faults.cause_of(err), False))
        return results


def _wait_or_fail(refs: list, timeout_s: float, check: bool = True) -> tuple[bool, object]:
    """Wait for `refs` within `timeout_s`: (all done, the first that failed or None). With
    `check`, returns as soon as one fails (an actor that died), rather than wait on the others
    (a broadcast stuck on its dead member) until the timeout; without, nothing is fetched (the
    weights themselves, which stay where they are)."""
    import ray

    deadline, pending = time.monotonic() + timeout_s, list(refs)
    while pending:
        done, pending = ray.wait(pending, num_returns=1, timeout=max(0.0, deadline - time.monotonic()),
                                 fetch_local=False)
        if not done:
            return False, None
        if not check:
            continue
        try:
            ray.get(done[0], timeout=0)
        except ray.exceptions.RayError:
            return False, done[0]
    return True, None


def spread(diff: np.ndarray) -> tuple[float, float, float]:
    """(mean, 99th percentile, max) of |differences|: what the check compares (`CHECK`)."""
    return float(diff.mean()), float(np.quantile(diff, 0.99)), float(diff.max())
