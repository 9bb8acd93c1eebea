"""Weight sync: after a sync the engine scores a fixed sequence like the learner does.

Real pieces: a vLLM engine in a rollout actor, a DeepSpeed learner rank, Ray's object store.
"""

import numpy as np
import pytest
import ray

from actors.rollout import RolloutActor
from actors.vllm_engine import vllm_env
from cluster.config import RolloutConfig
from cluster.weight_sync import WeightSyncError, check_sync, sync_weights
from learner.models import count_parameters
from tests.helpers import fixed_batch, make_learners, run_on_ranks

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def rollout(ray_cluster, tiny_model):
    cfg = RolloutConfig(threads=1, num_cpus=0.5, max_new_tokens=8)
    actor = ray.remote(RolloutActor).options(num_cpus=0.5, runtime_env={"env_vars": vllm_env(cfg)}
                                             ).remote(tiny_model, cfg, 0)
    yield actor
    ray.kill(actor)


def test_engine_matches_learner_after_sync(rollout, tiny_model):
    learners = make_learners(tiny_model, 1, 2)
    seq = np.array([1, 10, 11, 12, 40, 41, 42, 43], dtype=np.int64)
    # Same initial weights: they agree before any training.
    check_sync(learners, [rollout], seq, "float32", timeout_s=120)
    run_on_ranks(learners, "train_step", fixed_batch(np.array([1, -1] * 4, dtype=np.float32)), 5e-2, 1)
    # The learner moved; the engine has not been told yet, so the check must fail.
    with pytest.raises(WeightSyncError, match="differ from the learner's"):
        check_sync(learners, [rollout], seq, "float32", timeout_s=120)
    metrics = sync_weights(learners, [rollout], version=1, timeout_s=120)
    worst = check_sync(learners, [rollout], seq, "float32", timeout_s=120)
    assert worst < 1e-4
    assert metrics["sync/version"] == 1 and metrics["sync/bytes"] > 1e6
    samples = ray.get(rollout.generate.remote(["p"], ["User: 1+2=?\nAssistant: <think>"], 3, 0, ()))
    assert [s.weight_version for s in samples] == [1, 1, 1]
    ray.kill(learners[0])


def test_samples_are_groups_with_consistent_logprobs(rollout):
    samples = ray.get(rollout.generate.remote(["a", "b"], ["User: 1+2=?\nAssistant: <think>",
                                                          "User: 3+4=?\nAssistant: <think>"], 4, 7, ()))
    assert [s.prompt_id for s in samples] == ["a"] * 4 + ["b"] * 4
    for s in samples:
        assert len(s.logprobs) == len(s.response_ids) > 0
        assert np.all(s.logprobs <= 0)
        assert s.finish_reason in ("stop", "length")
    # An 8-token budget on a random model: most answers are cut by the length limit.
    assert any(s.finish_reason == "length" for s in samples)
    again = ray.get(rollout.generate.remote(["a", "b"], ["User: 1+2=?\nAssistant: <think>",
                                                        "User: 3+4=?\nAssistant: <think>"], 4, 7, ()))
    assert [list(s.response_ids) for s in samples] == [list(s.response_ids) for s in again]  # seeded


def test_zero3_weights_are_gathered_from_both_ranks(rollout, tiny_model):
    learners = make_learners(tiny_model, 2, 3)
    run_on_ranks(learners, "train_step", fixed_batch(np.array([1, -1] * 4, dtype=np.float32)), 5e-2, 1)
    seq = np.array([1, 10, 11, 12, 40, 41, 42, 43], dtype=np.int64)
    metrics = sync_weights(learners, [rollout], version=7, timeout_s=120)
    # Every parameter arrives whole: the engine now scores like the sharded learner.
    assert check_sync(learners, [rollout], seq, "float32", timeout_s=120) < 1e-4
    assert metrics["sync/bytes"] == 4 * count_parameters(tiny_model)  # all of it, in fp32
    for learner in learners:
        ray.kill(learner)
