"""Weight sync: after a sync every engine scores a fixed sequence like the learner does, with
either transport; a sync that fails leaves every engine serving its previous weights whole.

Real pieces: vLLM engines in rollout actors, in both layouts (in the actor's process, and with
its engine core and two tensor-parallel workers in processes of their own, as on GPUs),
DeepSpeed learner ranks, Ray's object store and a gloo group; an engine's load is made to
fail part-way by a fault-injecting stand-in rollout actor (`FaultyRollout`). The bucket plan and the receiver's checks are also
unit-tested with a stand-in loader (a list that records what it is given).
"""

import functools
import sys

import numpy as np
import pytest
import ray
import torch

from actors.config import RolloutConfig
from actors.rollout import RolloutActor, actor_env
from cluster.config import SyncConfig
from cluster.weight_sync import CHECK, WeightSync
from common.records import Sampling
from common.weight_sync import WeightReceiver, WeightSyncError, model_weights, plan_buckets
from learner.models import count_parameters
from tests.helpers import fixed_batch, make_learners, run_on_ranks

SEQ = np.array([1, 10, 11, 12, 40, 41, 42, 43], dtype=np.int64)
PROMPT = "User: 1+2=?\nAssistant: <think>"


# ---- units ---------------------------------------------------------------------------------

def test_buckets_pack_consecutive_parameters_up_to_the_size():
    manifest = [("a", (10,), "float32"), ("b", (10,), "float32"), ("c", (30,), "float32"),
                ("d", (5,), "bfloat16"), ("e", (5,), "bfloat16")]
    # 40 + 40 bytes fit in 100; 120 does not fit with them and gets its own; 10 + 10 together.
    assert plan_buckets(manifest, 100) == [[0, 1], [2], [3, 4]]
    assert plan_buckets(manifest, 10**9) == [[0, 1, 2, 3, 4]]
    assert plan_buckets(manifest, 1) == [[0], [1], [2], [3], [4]]
    assert plan_buckets([], 100) == []


def test_receiver_loads_only_a_whole_checked_version_on_commit(tiny_model):
    loaded = []  # stand-in for an engine's loader
    receiver = WeightReceiver(tiny_model, loaded.append)
    names = receiver.expected
    good = [(n, torch.zeros(shape)) for n, shape in names.items()]
    with pytest.raises(WeightSyncError, match="missing"):
        receiver.stage(2, good[1:])
    bad_shape = [(n, torch.zeros(1)) if i == 0 else (n, t) for i, (n, t) in enumerate(good)]
    with pytest.raises(WeightSyncError, match="has shape"):
        receiver.stage(2, bad_shape)
    with pytest.raises(WeightSyncError, match="holds None"):
        receiver.commit(2)
    assert receiver.stage(2, good) == 4 * count_parameters(tiny_model)
    with pytest.raises(WeightSyncError, match="cannot load weights version 3: the engine holds 2"):
        receiver.commit(3)
    assert loaded == []  # nothing half-loaded by the refusals
    receiver.stage(4, good)
    receiver.commit(4)
    assert len(loaded) == 1 and len(loaded[0]) == len(names)


def test_a_failed_load_keeps_the_staged_version_and_a_rollback_reloads_the_served_one(tiny_model):
    loaded, failing = [], []  # stand-in loader: records each load, raises while `failing`

    def load(named):
        loaded.append({n: float(t.flatten()[0]) for n, t in named})
        if failing:
            raise RuntimeError("load stopped part-way")

    receiver = WeightReceiver(tiny_model, load)
    shapes = receiver.expected
    one, two = ([(n, torch.full(shape, v)) for n, shape in shapes.items()] for v in (1.0, 2.0))
    receiver.stage(1, one)
    receiver.commit(1)
    receiver.release()
    receiver.stage(2, two)
    failing.append(True)
    with pytest.raises(RuntimeError, match="part-way"):
        receiver.commit(2)
    failing.clear()
    # The failed load left version 2 staged: loading it again needs nothing re-sent.
    receiver.commit(2)
    assert set(loaded[-1].values()) == {2.0}
    # Another engine failed: this one goes back to version 1, whole, from its kept copy.
    assert receiver.rollback() == 1
    assert set(loaded[-1].values()) == {1.0} and len(loaded[-1]) == len(shapes)
    # An engine whose own load failed reloads the version it serves, whole (it may be mixed).
    receiver.stage(2, two)
    failing.append(True)
    with pytest.raises(RuntimeError):
        receiver.commit(2)
    failing.clear()
    assert receiver.rollback() == 1
    assert set(loaded[-1].values()) == {1.0} and len(loaded[-1]) == len(shapes)
    with pytest.raises(WeightSyncError, match="holds None"):
        receiver.commit(2)  # a rollback drops the failed version
    # Version 0 is the model folder: going back to it rereads its files.
    fresh = WeightReceiver(tiny_model, load)
    fresh.stage(1, one)
    fresh.commit(1)
    assert fresh.rollback() == 0
    assert loaded[-1] == {n: float(t.flatten()[0]) for n, t in model_weights(tiny_model)}


# ---- real engines and learners --------------------------------------------------------------

@pytest.fixture(scope="module")
def learners(ray_cluster, tiny_model):
    """One ZeRO-2 rank, shared (~8 s to start): each test trains it a step away from whatever
    the engines serve, and checks the engines against it."""
    (rank,) = make_learners(tiny_model, 1, 2)
    yield [rank]
    ray.kill(rank)


def _scores(actors):
    return ray.get([a.score.remote(SEQ) for a in actors], timeout=120)


def _versions(actors):
    """The weight version each engine's samples carry now."""
    sampling = Sampling(n=1, seed=0, max_new_tokens=2)
    return [s.weight_version for a in actors
            for s in ray.get(a.generate.remote(["p"], [PROMPT], sampling), timeout=120)]


def break_next_load(worker, rank: int) -> None:
    """Runs in every worker of a vLLM engine (`collective_rpc`): in the one of tensor-parallel
    rank `rank`, the next load feeds part of the weights to the real loader, then fails.
    Layers 0-1 load whole, layer 2 gets q and k but not v (vLLM fuses them into one tensor),
    layer 3 nothing."""
    receiver = worker.r1ray_receiver
    if receiver.rank != rank:
        return
    engine_load = receiver.load

    def load_part_then_fail(named):
        receiver.load = engine_load  # once

        def weights():
            yield from named[:[n for n, _ in named].index("model.layers.2.self_attn.v_proj.weight")]
            raise RuntimeError("injected fault: the load stopped part-way")
        engine_load(weights())

    receiver.load = load_part_then_fail


class FaultyRollout(RolloutActor):
    """Fault-injecting stand-in for a rollout actor: its engine's worker `fail_rank` loads
    part of weights version `fail_version`, then fails (`break_next_load`). It also runs the
    test's functions in its engine's workers and names its engine's processes."""

    def __init__(self, model_path, cfg, seed, fail_version, fail_rank=0, dtype="float32"):
        super().__init__(model_path, cfg, seed, dtype)
        self.fail_version, self.fail_rank = fail_version, fail_rank

    def commit_weights(self, version):
        if version == self.fail_version:
            self.engine.llm.collective_rpc(break_next_load, args=(self.fail_rank,))
        return super().commit_weights(version)

    def on_workers(self, fn):
        return self.engine.llm.collective_rpc(fn)

    def engine_pids(self) -> list[int]:
        import psutil

        return [p.pid for p in psutil.Process().children(recursive=True)]


def start_faulty(model_path, seed, fail_version, fail_rank=0, dtype="float32", **rollout):
    # Ray's workers cannot import a test module: ship the class itself.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    cfg = RolloutConfig(engine="vllm", threads=1, num_cpus=0.5, max_new_tokens=8, **rollout)
    env = {**actor_env(cfg), "VLLM_ALLOW_INSECURE_SERIALIZATION": "1"}  # the test's functions go to the workers
    actor = ray.remote(FaultyRollout).options(num_cpus=0.5, runtime_env={"env_vars": env}).remote(
        model_path, cfg, seed, fail_version, fail_rank, dtype)
    ray.get(actor.__ray_ready__.remote(), timeout=600)
    return actor


@pytest.fixture(scope="module")
def engines(ray_cluster, tiny_model):
    """Two vLLM engines, one in each layout: in the rollout actor's process (CPU's default),
    and as on GPUs, with its engine core in a process of its own and the model sharded over
    two worker processes (tensor parallelism 2, one thread each). Engine 0's load of weights
    version 102 fails part-way in its worker, engine 1's of version 202 in its worker 1."""
    actors = [start_faulty(tiny_model, 0, fail_version=102),
              start_faulty(tiny_model, 1, fail_version=202, fail_rank=1, engine_core="subprocess",
                           tensor_parallel_size=2)]
    yield actors
    for a in actors:
        ray.kill(a)


@pytest.mark.slow
@pytest.mark.parametrize("transport", ["object_store", "broadcast"])
def test_engines_match_the_learner_after_a_sync(engines, learners, tiny_model, transport):
    sync = WeightSync(learners, engines, SyncConfig(transport=transport, bucket_mb=1.0, timeout_s=120),
                      "float32")
    sync.connect()
    sync.push(1)  # from whatever an earlier test left in the engines to the learner's weights
    assert sync.check(SEQ)["sync/logprob_diff_max"] < 1e-4
    run_on_ranks(learners, "train_step", fixed_batch(np.array([1, -1] * 4, dtype=np.float32)), 5e-2, 1)
    # The learner moved; the engines have not been told yet, so the check must fail.
    with pytest.raises(WeightSyncError, match="differ from the learner's"):
        sync.check(SEQ)
    metrics = sync.push(2)
    assert sync.check(SEQ)["sync/logprob_diff_max"] < 1e-4
    assert metrics["sync/version"] == 2 and metrics["sync/bytes"] == 4 * count_parameters(tiny_model)
    # Bytes delivered to every engine over the sync's wall time.
    assert metrics["sync/gb_per_s"] == pytest.approx(
        metrics["sync/bytes"] * len(engines) / metrics["timing/sync"] / 1e9, rel=1e-9)
    samples = ray.get(engines[1].generate.remote(["p"], [PROMPT], Sampling(n=3, seed=0, max_new_tokens=4)))
    assert [s.weight_version for s in samples] == [2, 2, 2]
    # To one engine alone (one replaced while the others generate), through the object store
    # whatever the transport: the other keeps its version, and the next push reaches both.
    run_on_ranks(learners, "train_step", fixed_batch(np.array([1, -1] * 4, dtype=np.float32)), 5e-2, 1)
    before = _scores(engines)
    sync.push(3, only=[1])
    after, learner = _scores(engines), ray.get(learners[0].score.remote(SEQ), timeout=120)
    np.testing.assert_array_equal(after[0], before[0])
    assert np.abs(after[1] - learner).max() < 1e-4 < np.abs(after[0] - learner).max()
    assert _versions(engines) == [2, 3] and sync.version == 2
    sync.push(4)
    assert sync.check(SEQ)["sync/logprob_diff_max"] < 1e-4 and _versions(engines) == [4, 4]


@pytest.mark.slow
@pytest.mark.parametrize("transport", ["object_store", "broadcast"])
def test_zero3_weights_are_gathered_from_both_ranks(engines, tiny_model, transport):
    learners = make_learners(tiny_model, 2, 3)
    run_on_ranks(learners, "train_step", fixed_batch(np.array([1, -1] * 4, dtype=np.float32)), 5e-2, 1)
    sync = WeightSync(learners, engines, SyncConfig(transport=transport, bucket_mb=0.5, timeout_s=120),
                      "float32")
    metrics = sync.push(7)
    # Every parameter arrives whole: the engines now score like the sharded learner.
    assert sync.check(SEQ)["sync/logprob_diff_max"] < 1e-4
    assert metrics["sync/bytes"] == 4 * count_parameters(tiny_model)  # all of it, in fp32
    for learner in learners:
        ray.kill(learner)


@pytest.mark.slow
@pytest.mark.parametrize("transport", ["object_store", "broadcast"])
def test_a_timed_out_sync_leaves_the_previous_version_serving(engines, learners, transport):
    sync = WeightSync(learners, engines, SyncConfig(transport=transport, timeout_s=120), "float32")
    sync.push(1)
    before = _scores(engines)
    run_on_ranks(learners, "train_step", fixed_batch(np.array([1, -1] * 4, dtype=np.float32)), 5e-2, 1)
    # Engine 0 is busy with a long generate, so the sync cannot get through in 1 s.
    busy = engines[0].generate.remote([f"p{i}" for i in range(12)], [PROMPT] * 12,
                                      Sampling(n=8, seed=0, max_new_tokens=200))
    quick = WeightSync(learners, engines, SyncConfig(transport=transport, timeout_s=1.0), "float32")
    with pytest.raises(WeightSyncError, match="took longer than 1s"):
        quick.push(2)
    assert {s.weight_version for s in ray.get(busy, timeout=300)} == {1}
    # Whatever reached the engines late was only staged: both still serve version 1, whole.
    after = _scores(engines)
    for b, a in zip(before, after):
        np.testing.assert_array_equal(a, b)
    samples = ray.get(engines[0].generate.remote(["p"], [PROMPT], Sampling(n=2, seed=0, max_new_tokens=4)))
    assert {s.weight_version for s in samples} == {1}
    # And the protocol recovers: the next sync (a fresh group for the broadcast) goes through.
    sync.replace(engines)
    sync.push(3)
    assert sync.check(SEQ)["sync/logprob_diff_max"] < 1e-4


def swap_next_load(worker, layers: tuple[int, int]) -> None:
    """Runs in every worker of a vLLM engine: its next load gets the weights of two layers
    exchanged (an off-by-one in names, in transit) and otherwise the weights sent."""
    receiver = worker.r1ray_receiver
    engine_load = receiver.load
    a, b = (f"model.layers.{i}." for i in layers)

    def swapped(name: str) -> str:
        return b + name[len(a):] if name.startswith(a) else a + name[len(b):] if name.startswith(b) else name

    def load_swapped(named):
        receiver.load = engine_load  # once
        engine_load([(swapped(n), t) for n, t in named])

    receiver.load = load_swapped


@pytest.mark.slow
def test_the_check_lets_bf16_kernel_noise_pass_and_stops_a_corrupted_sync(ray_cluster, smollm2_model):
    """A real model (SmolLM2-135M), learner and engine in bf16: their log-probs differ by bf16
    noise alone after a good sync, far more than fp32 allows; a sync that swaps two layers
    must stop the run."""
    (learner,) = make_learners(smollm2_model, 1, 2, dtype="bfloat16")
    engine = start_faulty(smollm2_model, 0, fail_version=-1, dtype="bfloat16")
    try:
        sync = WeightSync([learner], [engine], SyncConfig(timeout_s=300), "bfloat16")
        probe = ray.get(engine.tokenize.remote([PROMPT + "23 + 19: 3 + 9 = 12, carry 1; 2 + 1 + 1 = 4."
                                                         "</think><answer>42</answer>"]))[0]
        sync.push(1)
        good = sync.check(probe)
        assert CHECK["float32"].mean < good["sync/logprob_diff_mean"] < CHECK["bfloat16"].mean
        ray.get(engine.on_workers.remote(functools.partial(swap_next_load, layers=(14, 15))))
        sync.push(2)
        with pytest.raises(WeightSyncError, match=r"in bfloat16 a working sync stays below 0.15: the engine "
                                                  r"does not serve the learner's weights"):
            sync.check(probe)
    finally:
        ray.kill(learner)
        ray.kill(engine)


@pytest.mark.slow
def test_a_model_with_tied_embeddings_scores_through_its_new_output_head(ray_cluster, tmp_path):
    """SmolLM2, Qwen2.5 and Llama 3.2 use their input embeddings as their output head, and their
    checkpoints hold no head: after a sync the engine must compute logits with the new
    embeddings. (Its CPU head kept the first version's packed copy, 1e-2 off after 40 steps.)"""
    from transformers import AutoModelForCausalLM

    from learner.models import TinyLlamaSpec, build_tiny_llama

    path = str(build_tiny_llama(TinyLlamaSpec(tie_word_embeddings=True), tmp_path / "tied"))
    weights = {name: t.numpy() for name, t in model_weights(path)}
    assert "lm_head.weight" not in weights
    rng = np.random.default_rng(0)
    embed = weights["model.embed_tokens.weight"]
    weights["model.embed_tokens.weight"] = embed + rng.normal(0, 0.5, embed.shape).astype(np.float32)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        model.get_input_embeddings().weight.copy_(torch.from_numpy(weights["model.embed_tokens.weight"]))
        assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
        logprobs = torch.log_softmax(model(torch.from_numpy(SEQ)[None]).logits[0, :-1], -1)
    expected = logprobs.gather(-1, torch.from_numpy(SEQ[1:])[:, None])[:, 0].numpy()
    engine = start_faulty(path, 0, fail_version=-1)
    try:
        before = ray.get(engine.score.remote(SEQ))
        ray.get(engine.stage_weights.remote(weights, 1))
        assert ray.get(engine.commit_weights.remote(1)) == 1
        after = ray.get(engine.score.remote(SEQ))
    finally:
        ray.kill(engine)
    assert np.abs(before - expected).mean() > 100 * CHECK["float32"].mean  # the change is visible
    assert np.abs(after - expected).mean() < CHECK["float32"].mean


# ---- the GPU topology on CPU: the engine core out of process, two tensor-parallel workers ------

def served_state(worker) -> tuple:
    """Runs in every worker of a vLLM engine: (its tensor-parallel rank, sha256 of the bytes
    of each tensor it serves by HF name, the bytes of its plain parameters by vLLM name).
    Linear layers' weights are repacked by vLLM's CPU kernels (their parameters are empty);
    the embedding and head shards and the norms stay plain tensors."""
    import hashlib

    import torch

    receiver = worker.r1ray_receiver
    served = {name: hashlib.sha256(t.contiguous().view(-1).view(torch.uint8).numpy().tobytes()).hexdigest()
              for name, t in receiver.served.named}
    plain = {name: p.detach().contiguous().numpy().tobytes()
             for name, p in worker.model_runner.model.named_parameters() if p.numel()}
    return receiver.rank, served, plain


@pytest.mark.slow
@pytest.mark.parametrize("transport", ["object_store", "broadcast"])
def test_every_tensor_parallel_worker_serves_the_learners_weights_bit_exact(engines, learners, transport):
    import hashlib

    sharded = engines[1]

    sync = WeightSync(learners, [sharded], SyncConfig(transport=transport, bucket_mb=0.5, timeout_s=120),
                      "float32")
    run_on_ranks(learners, "train_step", fixed_batch(np.array([1, -1] * 4, dtype=np.float32)), 5e-2, 1)
    sync.push(3)
    weights = ray.get(learners[0].gather_weights.remote())
    sent = {name: hashlib.sha256(arr.tobytes()).hexdigest() for name, arr in weights.items()}
    states = ray.get(sharded.on_workers.remote(served_state))
    assert [rank for rank, _, _ in states] == [0, 1]
    for rank, served, plain in states:
        assert served == sent  # every byte of every tensor reached both workers
        # The shards vLLM keeps as plain tensors hold the learner's values, bit for bit: rows
        # [160 r, 160 (r + 1)) of the 320-token vocabulary, and the norms whole.
        rows = slice(160 * rank, 160 * (rank + 1))
        assert plain["model.embed_tokens.weight"] == weights["model.embed_tokens.weight"][rows].tobytes()
        assert plain["lm_head.weight"] == weights["lm_head.weight"][rows].tobytes()
        norms = [n for n in plain if n.endswith("norm.weight")]
        assert len(norms) == 9 and all(plain[n] == weights[n].tobytes() for n in norms)
    # And the sharded engine scores like the learner (its all-reduce adds in another order).
    assert sync.check(SEQ)["sync/logprob_diff_max"] < 1e-4
    assert _versions([sharded]) == [3]


@pytest.mark.slow
@pytest.mark.parametrize("transport", ["object_store", "broadcast"])
@pytest.mark.parametrize("failing, worker", [(0, 0), (1, 1)])
def test_a_failed_commit_leaves_every_engine_on_the_previous_version(engines, learners, failing, worker, transport):
    """One engine's load stops part-way, the other's goes through: the in-process engine's
    one worker fails, or worker 1 of the sharded engine's two (its worker 0 loads it whole)."""
    version = 100 * (failing + 1)  # the engine fails to load version + 2 (the `engines` fixture)
    sync = WeightSync(learners, engines, SyncConfig(transport=transport, bucket_mb=0.5, timeout_s=120), "float32")
    sync.push(version + 1)
    before = _scores(engines)
    run_on_ranks(learners, "train_step", fixed_batch(np.array([1, -1] * 4, dtype=np.float32)), 5e-2, 1)
    with pytest.raises(WeightSyncError, match=rf"loading weights version {version + 2} failed on engine {failing}: "
                                              rf"worker {worker}: RuntimeError: injected fault.*engines \[0, 1\] "
                                              rf"serve versions \[{version + 1}, {version + 1}\] again"):
        sync.push(version + 2)
    # Both went back, whole (every worker): they score exactly as after that version's push.
    assert _versions(engines) == [version + 1] * 2
    for b, a in zip(before, _scores(engines)):
        np.testing.assert_array_equal(a, b)
    # And the next sync goes through on both.
    sync.push(version + 3)
    assert sync.check(SEQ)["sync/logprob_diff_max"] < 1e-4
    assert _versions(engines) == [version + 3] * 2


@pytest.mark.slow
def test_a_killed_rollout_actor_takes_its_engine_processes_with_it(engines):
    """Last in the module: it kills the sharded engine's actor as the OOM killer would."""
    import os
    import signal
    import time

    import psutil

    sharded = engines[1]
    pids = ray.get(sharded.engine_pids.remote())
    assert len(pids) >= 3  # the engine core and its two workers, at least
    os.kill(ray.get(sharded.__ray_call__.remote(lambda self: os.getpid())), signal.SIGKILL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(psutil.pid_exists(p) for p in pids):
        time.sleep(0.5)
    assert [p for p in pids if psutil.pid_exists(p)] == []
