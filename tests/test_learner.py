"""The DeepSpeed learner on real Ray actors: SFT loss falls, GRPO moves log-probs the right way.

ZeRO-2 with one rank and ZeRO-3 with two ranks (gloo on the CPU accelerator).
"""

import numpy as np
import pytest
import ray

from cluster.config import AlgorithmConfig, LearnerConfig
from cluster.placement import free_port
from learner.batch import collate
from learner.learner import Learner

pytestmark = pytest.mark.slow


def make_learners(model_path, num_ranks, zero_stage, dtype="float32", kl_beta=0.0):
    cfg = LearnerConfig(num_ranks=num_ranks, zero_stage=zero_stage, dtype=dtype, threads=1,
                        num_cpus=0.5, micro_batch_size=4)
    algo = AlgorithmConfig(kl_beta=kl_beta)
    port = free_port()
    actor = ray.remote(Learner).options(num_cpus=0.5)
    return [actor.remote(model_path, cfg, algo, 1.0, rank, "127.0.0.1", port) for rank in range(num_ranks)]


def fixed_batch(advantages=None):
    # Eight short "answers" to two prompts: tokens are arbitrary ids of the tiny vocabulary.
    rng = np.random.default_rng(0)
    prompts = [np.array([10, 11, 12])] * 4 + [np.array([20, 21])] * 4
    responses = [rng.integers(30, 60, size=5) for _ in range(8)]
    logprobs = [np.full(5, -3.0, dtype=np.float32) for _ in range(8)]
    return collate(prompts, responses, pad_id=0, advantages=advantages, sampling_logprobs=logprobs)


def run_on_ranks(learners, method, batch, *args):
    shards = batch.split(len(learners))
    return ray.get([getattr(l, method).remote(s, *args) for l, s in zip(learners, shards)], timeout=300)


@pytest.mark.parametrize("num_ranks, zero_stage, dtype", [(1, 2, "float32"), (2, 3, "bfloat16")])
def test_sft_loss_falls_on_a_fixed_batch(ray_cluster, tiny_model, num_ranks, zero_stage, dtype):
    learners = make_learners(tiny_model, num_ranks, zero_stage, dtype)
    batch = fixed_batch()
    losses = [np.mean([m["loss"] for m in run_on_ranks(learners, "sft_step", batch, 3e-3)])
              for _ in range(8)]
    assert losses[-1] < 0.7 * losses[0], losses
    for learner in learners:
        ray.kill(learner)


def test_grpo_step_raises_good_answers_and_lowers_bad_ones(ray_cluster, tiny_model):
    learners = make_learners(tiny_model, 2, 3, kl_beta=0.01)
    # Answers 0-1 and 4-5 were good (advantage +1), the others bad (-1).
    advantages = np.array([1, 1, -1, -1, 1, 1, -1, -1], dtype=np.float32)
    batch = fixed_batch(advantages)
    seq = batch.input_ids[0, : int(batch.attention_mask[0].sum())]
    bad = batch.input_ids[2, : int(batch.attention_mask[2].sum())]
    before = [ray.get([l.score.remote(s) for l in learners])[0][2:].sum() for s in (seq, bad)]
    for _ in range(3):
        metrics = run_on_ranks(learners, "train_step", batch, 1e-2, 1)
    after = [ray.get([l.score.remote(s) for l in learners])[0][2:].sum() for s in (seq, bad)]
    assert after[0] > before[0] and after[1] < before[1]
    m = metrics[0]
    assert m["ratio_mean"] == pytest.approx(1.0) and m["clip_fraction"] == 0.0  # one update: on-policy
    assert m["kl"] > 0.0 and m["entropy"] > 0.0 and m["grad_norm"] > 0.0
    for learner in learners:
        ray.kill(learner)


def test_several_updates_per_step_clip(ray_cluster, tiny_model):
    (learner,) = make_learners(tiny_model, 1, 2)
    batch = fixed_batch(np.array([2, 2, -2, -2, 2, 2, -2, -2], dtype=np.float32))
    # A large step on the first half moves the second half's ratios away from 1.
    m = ray.get(learner.train_step.remote(batch, 5e-2, 2), timeout=300)
    assert m["clip_fraction"] > 0.0 and m["ratio_mean"] != pytest.approx(1.0)
    ray.kill(learner)
