"""Rollout: two backends behind one interface, several engines, sampling options, the prompt
length policy, and engines that die mid-generate.

Real engines (vLLM's CPU build and transformers) on the tiny model, real Ray actors.
"""

import threading
import time

import numpy as np
import pytest
import ray

from actors.config import RolloutConfig
from actors.rollout import PromptTooLongError, RolloutActor, fit_prompt
from cluster.config import load_config
from cluster.faults import RestartsExhausted
from cluster.rollout_pool import EngineDiedError, RolloutPool
from common.records import Sampling
from tests.helpers import make_learners, samples_to_batch, start_rollout

PROMPTS = [f"User: {a}+{b}=?\nAssistant: <think>" for a, b in [(1, 2), (13, 4), (7, 70), (55, 5), (9, 9)]]
IDS = [f"q{i}" for i in range(len(PROMPTS))]


# ---- units ---------------------------------------------------------------------------------

def test_prompt_policies():
    ids = list(range(10))
    assert fit_prompt(ids, 10, "error", "q") == ids  # fits exactly
    assert fit_prompt(ids, 4, "truncate_left", "q") == [6, 7, 8, 9]
    assert fit_prompt(ids, 4, "skip", "q") is None
    with pytest.raises(PromptTooLongError, match="prompt 'q7' has 10 tokens; .* leaves 4 for a prompt"):
        fit_prompt(ids, 4, "error", "q7")


def test_sampling_logprobs_apply_temperature_then_top_k_then_top_p():
    import torch

    def processed(logits, **kw):
        return Sampling(n=1, seed=0, **kw).logprobs(logits)

    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    t = processed(logits, temperature=0.5)
    assert torch.allclose(t, torch.log_softmax(logits / 0.5, -1))
    k = processed(logits, top_k=2).exp()
    assert torch.allclose(k, torch.tensor([[np.e / (np.e + 1), 1 / (np.e + 1), 0, 0]]), atol=1e-6)
    # The likeliest token holds 64% of the mass: top_p 0.5 keeps it alone, 0.7 keeps two.
    assert torch.allclose(processed(logits, top_p=0.5).exp(), torch.tensor([[1.0, 0, 0, 0]]))
    assert (processed(logits, top_p=0.7).exp() > 0).sum() == 2
    # Ties at the k-th value are all kept, as both engines keep them.
    assert (processed(torch.tensor([[3.0, 1.0, 1.0, 0.0]]), top_k=2).exp() > 0).sum() == 3
    greedy = processed(logits, temperature=0.0, top_k=1)
    assert torch.allclose(greedy, torch.log_softmax(logits, -1))  # raw, as vLLM reports greedy
    untruncated = Sampling(n=1, seed=0, temperature=0.5, top_k=1).logprobs(logits, truncate=False)
    assert torch.equal(untruncated, t)


@pytest.mark.parametrize("top_k, top_p", [(5, 1.0), (0, 0.5), (5, 0.5), (40, 0.9), (1, 0.3)])
def test_sampling_logprobs_are_exactly_vllms_rule(top_k, top_p):
    # vLLM's CPU sampler called on the same logits: the learner applies Sampling.logprobs to
    # its own logits, so any difference would bias every ratio and importance weight. Rows of
    # tied logits check that ties at the top-k and top-p boundaries are split as vLLM splits them.
    import torch
    from vllm.v1.sample.ops.topk_topp_sampler import apply_top_k_top_p_pytorch

    gen = torch.Generator().manual_seed(top_k * 100 + int(top_p * 10))
    logits = torch.randn(64, 320, generator=gen) * 3
    logits[:8, :50] = logits[:8, :1]
    sampling = Sampling(n=1, seed=0, temperature=0.7, top_k=top_k, top_p=top_p)
    vllm = apply_top_k_top_p_pytorch(logits / 0.7, torch.full((64,), top_k) if top_k else None,
                                     torch.full((64,), top_p) if top_p < 1 else None, allow_cpu_sync=True)
    assert torch.equal(sampling.logprobs(logits), torch.log_softmax(vllm, -1))


# ---- real engines --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def vllm_actor(ray_cluster, tiny_model):
    actor = start_rollout(tiny_model, "vllm")
    yield actor
    ray.kill(actor)


@pytest.fixture(scope="module")
def hf_actor(ray_cluster, tiny_model):
    actor = start_rollout(tiny_model, "transformers")
    yield actor
    ray.kill(actor)


@pytest.mark.slow
def test_backends_agree_on_greedy_answers(vllm_actor, hf_actor):
    greedy = Sampling(n=1, seed=0, temperature=0.0, max_new_tokens=8)
    v = ray.get(vllm_actor.generate.remote(IDS, PROMPTS, greedy), timeout=120)
    h = ray.get(hf_actor.generate.remote(IDS, PROMPTS, greedy), timeout=120)
    assert [s.prompt_id for s in v] == [s.prompt_id for s in h] == IDS
    for a, b in zip(v, h):
        np.testing.assert_array_equal(a.prompt_ids, b.prompt_ids)
        np.testing.assert_array_equal(a.response_ids, b.response_ids)
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-4)
        assert (a.text, a.finish_reason) == (b.text, b.finish_reason)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["vllm", "transformers"])
def test_records_honour_the_sampling_options(vllm_actor, hf_actor, backend):
    actor = vllm_actor if backend == "vllm" else hf_actor
    sampling = Sampling(n=4, seed=3, temperature=0.9, top_p=0.95, top_k=50, max_new_tokens=6, stop=("a",))
    samples = ray.get(actor.generate.remote(IDS[:2], PROMPTS[:2], sampling), timeout=120)
    assert [s.prompt_id for s in samples] == ["q0"] * 4 + ["q1"] * 4
    for s in samples:
        assert len(s.logprobs) == len(s.response_ids) <= 6 and np.all(s.logprobs <= 0)
        assert s.weight_version == 0 and s.prompt_ids.dtype == np.int32
        assert s.truncated == (s.finish_reason == "length")
        if s.finish_reason == "stop" and "a" in s.text:
            assert s.text.endswith("a") and s.text.count("a") == 1  # ends at the first stop string
        if s.truncated:
            assert len(s.response_ids) == 6
    assert any(s.truncated for s in samples)  # a random model rarely stops within 6 tokens
    again = ray.get(actor.generate.remote(IDS[:2], PROMPTS[:2], sampling), timeout=120)
    assert [list(s.response_ids) for s in samples] == [list(s.response_ids) for s in again]  # seeded
    other = ray.get(actor.generate.remote(IDS[:2], PROMPTS[:2], Sampling(**{**sampling.__dict__, "seed": 4})))
    assert [list(s.response_ids) for s in samples] != [list(s.response_ids) for s in other]


TRUNCATED = Sampling(n=4, seed=1, temperature=0.7, top_p=0.5, top_k=5, max_new_tokens=8)


@pytest.fixture(scope="module")
def recomputing_learners(ray_cluster, tiny_model):
    """Learner ranks on the engines' weights (tests keep them there: lr 0), computing log-probs
    with TRUNCATED's cut, or with its temperature alone."""
    from dataclasses import replace

    kinds = {"same": TRUNCATED, "temperature only": replace(TRUNCATED, top_p=1.0, top_k=0)}
    learners = {name: make_learners(tiny_model, 1, 2, micro_batch_size=32, sampling=sampling)[0]
                for name, sampling in kinds.items()}
    yield learners
    for learner in learners.values():
        ray.kill(learner)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["vllm", "transformers"])
def test_learner_recomputes_the_engines_sampling_logprobs_with_top_p_and_top_k(
        vllm_actor, hf_actor, recomputing_learners, backend):
    # Engines report the log-probs of the distribution they sampled (temperature, top-k 5,
    # top-p 0.5); the learner must apply the same to mean the same thing. With two updates the
    # ratio is taken against the engine's log-probs, and lr 0 keeps the policy where it is.
    actor = vllm_actor if backend == "vllm" else hf_actor
    batch = samples_to_batch(ray.get(actor.generate.remote(IDS, PROMPTS, TRUNCATED), timeout=120))
    got = {name: ray.get(learner.train_step.remote(batch, 0.0, 2), timeout=300)
           for name, learner in recomputing_learners.items()}
    assert got["same"]["offpolicy_gap"] < 1e-5, got
    assert got["same"]["ratio_mean"] == pytest.approx(1.0, abs=1e-5) and got["same"]["clip_fraction"] == 0.0
    # A learner ignoring the cut gives every sampled token less mass than the engine did: every
    # ratio is below 1 (the bias the cut would cause), by far more than float noise.
    assert got["temperature only"]["offpolicy_gap"] > 0.05, got
    assert got["temperature only"]["ratio_mean"] < 0.95, got


@pytest.mark.slow
def test_prompt_too_long_is_an_error_naming_it_and_the_engine_keeps_serving(vllm_actor):
    long_prompt = "User: " + "1+" * 200 + "1=?\nAssistant: <think>"
    with pytest.raises(PromptTooLongError, match="prompt 'long' has"):
        ray.get(vllm_actor.generate.remote(["ok", "long"], [PROMPTS[0], long_prompt],
                                           Sampling(n=2, seed=0, max_new_tokens=8)), timeout=120)
    assert len(ray.get(vllm_actor.generate.remote(IDS, PROMPTS, Sampling(n=2, seed=0)), timeout=120)) == 10
    assert ray.get(vllm_actor.generate.remote([], [], Sampling(n=2, seed=0)), timeout=120) == []


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["truncate_left", "skip"])
def test_prompt_too_long_policies_on_a_real_engine(ray_cluster, tiny_model, policy):
    actor = start_rollout(tiny_model, "transformers", max_model_len=40, prompt_too_long=policy)
    long_prompt = "User: " + "1+" * 40 + "1=?\nAssistant: <think>"
    samples = ray.get(actor.generate.remote(["ok", "long"], [PROMPTS[0], long_prompt],
                                            Sampling(n=2, seed=0, max_new_tokens=8)), timeout=120)
    ray.kill(actor)
    if policy == "skip":
        assert [s.prompt_id for s in samples] == ["ok", "ok"]
    else:
        assert [s.prompt_id for s in samples] == ["ok", "ok", "long", "long"]
        assert all(len(s.prompt_ids) == 40 - 8 for s in samples[2:])  # the last 32 tokens kept


def _pool_config(tmp_path, *more, **rollout):
    overrides = [f"rollout.{k}={v}" for k, v in {"threads": 1, "num_cpus": 0.5, **rollout}.items()]
    return load_config(None, overrides + [f"cluster.cache_dir={tmp_path}", *more])


@pytest.mark.slow
def test_two_engines_return_groups_in_prompt_order(ray_cluster, tiny_model, tmp_path, vllm_actor):
    pool = RolloutPool(_pool_config(tmp_path, num_engines=2), tiny_model)
    sampling = Sampling(n=3, seed=11, temperature=1.0, max_new_tokens=8)
    samples = pool.generate(IDS, PROMPTS, sampling, timeout_s=300)
    assert [s.prompt_id for s in samples] == [pid for pid in IDS for _ in range(3)]
    # Prompt i is seeded seed + i on whichever engine samples it: one engine doing all of
    # them returns the very same answers, so the shards were put back in order.
    alone = ray.get(vllm_actor.generate.remote(IDS, PROMPTS, sampling), timeout=120)
    assert [list(s.response_ids) for s in samples] == [list(s.response_ids) for s in alone]
    assert pool.generate([], [], sampling, timeout_s=60) == []
    for actor in pool.actors:
        ray.kill(actor)


@pytest.mark.slow
def test_an_engine_dying_mid_generate_is_replaced_and_its_prompts_sampled_again(ray_cluster, tiny_model, tmp_path):
    from cluster.faults import Faults

    cfg = _pool_config(tmp_path, "cluster.deadline_s=6", engine="transformers", max_restarts=2, max_model_len=256)
    account = Faults.of(cfg)
    pool = RolloutPool(cfg, tiny_model, account=account)
    ray.get(pool.ready_refs(), timeout=120)
    ids, prompts, sampling = IDS * 8, PROMPTS * 8, Sampling(n=4, seed=0, max_new_tokens=100)  # seconds of work
    expected = pool.generate(ids, prompts, sampling, timeout_s=300)
    # Busy is not hung: an engine that returns nothing for longer than cluster.deadline_s (its
    # call waits behind other work here; a long generation on a GPU) answers the pings the
    # pool sends meanwhile, and keeps its work.
    pool.actors[0].__ray_call__.remote(lambda _: time.sleep(9))
    assert [list(s.response_ids) for s in pool.generate(ids, prompts, sampling, timeout_s=300)] == \
        [list(s.response_ids) for s in expected]
    assert account.counts["engine"] == 0

    def kill_soon():
        victim = pool.actors[0]
        threading.Timer(1.0, lambda: ray.kill(victim)).start()
        return victim

    # The pool can bring a new engine to the others' weights (here: the model folder's, as it
    # starts with): the call returns what it would have, sampled again with the same seed.
    pool.revive = lambda index: None
    victim = kill_soon()
    again = pool.generate(ids, prompts, sampling, timeout_s=300)
    assert [list(s.response_ids) for s in again] == [list(s.response_ids) for s in expected]
    assert account.counts["engine"] == 1 and pool.actors[0] is not victim
    # It cannot (the learner is between versions): replaced, and the caller told, at once.
    pool.revive = None
    victim = kill_soon()
    start = time.monotonic()
    with pytest.raises(EngineDiedError, match="rollout engine 0 died") as info:
        pool.generate(ids, prompts, sampling, timeout_s=300)
    assert time.monotonic() - start < 60 and info.value.index == 0  # when it dies, not at the timeout
    assert account.counts["engine"] == 2 and pool.actors[0] is not victim
    samples = pool.generate(IDS, PROMPTS, Sampling(n=2, seed=0, max_new_tokens=4), timeout_s=120)
    assert len(samples) == 10 and {s.weight_version for s in samples} == {0}
    kill_soon()  # the third death is one more than rollout.max_restarts=2 allows
    with pytest.raises(RestartsExhausted, match=r"engine 0 died while generating: .+; rollout.max_restarts=2 used up"):
        pool.generate(ids, prompts, sampling, timeout_s=300)
    pool.shutdown()


class DiesWhileStarting:
    """Stand-in for a rollout actor whose process dies in its constructor."""

    def __init__(self, *args):
        import os

        os._exit(1)


@pytest.mark.slow
def test_a_replacement_that_dies_while_it_starts_is_one_more_fault(ray_cluster, tiny_model, tmp_path, capsys):
    import sys

    from cluster.faults import Faults

    cfg = _pool_config(tmp_path, engine="transformers", max_restarts=3)
    account = Faults.of(cfg)
    pool = RolloutPool(cfg, tiny_model, account=account)
    real = pool._start

    def dies_once(index):  # the first replacement dies while it starts; the next one is real
        ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray's workers cannot import a test
        pool._start = real
        return ray.remote(DiesWhileStarting).options(num_cpus=0).remote()

    pool._start = dies_once
    victim = pool.actors[0]
    pool.replace(0, "idle", "killed", "nothing to redo")
    assert account.counts["engine"] == 2 and pool.actors[0] is not victim
    out = capsys.readouterr().out
    assert "engine 0 died while idle (killed); replaced it" in out
    assert "engine 0 died while starting (its process died" in out
    samples = pool.generate(IDS, PROMPTS, Sampling(n=2, seed=0, max_new_tokens=4), timeout_s=120)
    assert len(samples) == 10  # the second replacement serves
    pool._start = dies_once  # the third death is allowed, the fourth (its replacement's) is not
    with pytest.raises(RestartsExhausted, match=r"^engine 0 died while starting: .+; rollout.max_restarts=3 used up"):
        pool.replace(0, "idle", "killed", "nothing to redo")
    pool.shutdown()


@pytest.mark.slow
def test_the_driver_replaces_a_dead_or_hung_engine_in_any_phase_and_brings_it_to_the_current_weights(
        ray_cluster, tiny_model, tmp_path):
    import os
    import random
    import signal

    from cluster import train
    from cluster.faults import Faults, actor_pid
    from cluster.pipeline import Rollout
    from cluster.prompts import prompt_format
    from cluster.reward_pool import RewardPool
    from cluster.weight_sync import WeightSync
    from rewards.tasks import build_mixture
    from tests.helpers import fixed_batch, run_on_ranks

    cfg = load_config(None, [f"rollout.{k}={v}" for k, v in {"engine": "transformers", "threads": 1, "num_cpus": 0.5,
                                                             "max_restarts": 3, "max_new_tokens": 100}.items()]
                      + [f"cluster.cache_dir={tmp_path}", "cluster.deadline_s=10", "sync.timeout_s=10"])
    learners = make_learners(tiny_model, 1, 2)
    account = Faults.of(cfg)
    pool, tasks = RolloutPool(cfg, tiny_model, account=account), build_mixture(cfg.task)
    actors = train.Actors(learners, None, pool, RewardPool(cfg, tasks.tasks), WeightSync(learners, pool.actors, cfg.sync,
                          "float32"), prompt_format(cfg, tiny_model), (0, 0), account)
    pool.revive = lambda index: train.sync_weights(cfg, actors, actors.sync.version, only=[index])
    run_on_ranks(learners, "train_step", fixed_batch(np.array([1, -1] * 4, dtype=np.float32)), 5e-2, 1)
    train.sync_weights(cfg, actors, 1)
    problems = tasks.sample(random.Random(0), 16)

    # Generating: replaced, given version 1, and its prompts sampled and scored again.
    victim = pool.actors[0]
    threading.Timer(1.0, lambda: ray.kill(victim)).start()
    produced = train.rollout_result(cfg, actors, Rollout.start(cfg, actors, problems, step=1, rng_state=None),
                                    version=1)
    samples = produced.samples
    assert len(samples) == 16 * 8 and {s.weight_version for s in samples} == {1}
    assert [s.prompt_id for s in samples] == [p.id for p in problems for _ in range(8)]
    assert len(produced.reasons) == len(samples) and all(produced.reasons)
    assert account.counts["engine"] == 1

    # Idle, then found by the next sync: replaced and the sync done again. Hung (SIGSTOP) at
    # a sync: found by its deadline, killed and replaced alike.
    run_on_ranks(learners, "train_step", fixed_batch(np.array([-1, 1] * 4, dtype=np.float32)), 5e-2, 1)
    ray.kill(pool.actors[0])
    assert train.sync_weights(cfg, actors, 2)["sync/version"] == 2.0
    os.kill(actor_pid(pool.actors[0]), signal.SIGSTOP)
    start = time.monotonic()
    assert train.sync_weights(cfg, actors, 2)["sync/version"] == 2.0
    assert account.counts["engine"] == 3 and time.monotonic() - start < 60
    assert actors.sync.check(np.arange(1, 30))["sync/logprob_diff_max"] < 1e-4  # the learner's weights
    # The budget spent: the run stops naming the engine, the phase and the cause.
    ray.kill(pool.actors[0])
    with pytest.raises(RestartsExhausted, match=r"^engine 0 died while staging weights version 3: .+; "
                                                r"rollout.max_restarts=3 used up$"):
        train.sync_weights(cfg, actors, 3)
    ray.kill(learners[0])
    pool.shutdown()
    actors.rewarders.shutdown()


def test_a_sleeping_engine_refuses_work_until_it_wakes(tiny_model):
    """Colocated, the driver puts the engine to sleep while its learner rank trains: any
    generate, score or weight load it sends meanwhile is a bug in the order of the phases."""
    actor = RolloutActor(tiny_model, RolloutConfig(engine="transformers", threads=1, max_new_tokens=4), seed=0,
                         colocated=True)
    ids = np.arange(1, 12)
    before = actor.score(ids)
    actor.sleep()
    for call in (lambda: actor.score(ids), lambda: actor.generate(["p"], ["User: 1+2=?"], Sampling(n=1, seed=0)),
                 lambda: actor.commit_weights(1), lambda: actor.rollback_weights()):
        with pytest.raises(RuntimeError, match="asleep"):
            call()
    actor.wake()
    np.testing.assert_array_equal(actor.score(ids), before)
