"""Builders shared by the learner and weight-sync tests (real actors, tiny fixed batches)."""

import numpy as np
import ray

from common.net import free_port
from common.records import Sampling
from learner.batch import collate
from learner.config import AlgorithmConfig, LearnerConfig
from learner.learner import Learner


def make_learners(model_path, num_ranks, zero_stage, dtype="float32", micro_batch_size=4,
                  sampling=Sampling(n=1, seed=0), learner=None, **algorithm):
    """`num_ranks` learner ranks as Ray actors; `learner` sets more LearnerConfig fields (a
    dict), `algorithm` AlgorithmConfig fields."""
    cfg = LearnerConfig(num_ranks=num_ranks, zero_stage=zero_stage, dtype=dtype, threads=1,
                        num_cpus=0.5, micro_batch_size=micro_batch_size, **(learner or {}))
    algo = AlgorithmConfig(**algorithm)
    port = free_port()
    actor = ray.remote(Learner).options(num_cpus=0.5)
    return [actor.remote(model_path, cfg, algo, sampling, rank, "127.0.0.1", port) for rank in range(num_ranks)]


def fixed_batch(advantages=None):
    # Eight "answers" of 3 to 6 tokens to two prompts; ids are arbitrary tokens of the vocabulary.
    rng = np.random.default_rng(0)
    prompts = [np.array([10, 11, 12])] * 4 + [np.array([20, 21])] * 4
    responses = [rng.integers(30, 60, size=3 + i % 4) for i in range(8)]
    logprobs = [np.full(len(r), -3.0, dtype=np.float32) for r in responses]
    return collate(prompts, responses, pad_id=0, advantages=advantages, sampling_logprobs=logprobs)


def run_on_ranks(learners, method, batch, *args):
    shards = batch.split(len(learners))
    return ray.get([getattr(l, method).remote(s, *args) for l, s in zip(learners, shards)], timeout=300)


def start_rollout(model_path, engine="vllm", seed=0, **overrides):
    """A rollout actor on a tiny model: one thread, half a logical CPU, short answers."""
    from actors.config import RolloutConfig
    from actors.rollout import RolloutActor, actor_env

    cfg = RolloutConfig(**{"engine": engine, "threads": 1, "num_cpus": 0.5, "max_new_tokens": 8, **overrides})
    actor = ray.remote(RolloutActor).options(num_cpus=0.5, runtime_env={"env_vars": actor_env(cfg)}
                                             ).remote(model_path, cfg, seed)
    ray.get(actor.__ray_ready__.remote(), timeout=300)
    return actor


def samples_to_batch(samples, advantages=None):
    """The learner's view of sampled answers (as the driver collates them)."""
    adv = np.zeros(len(samples), dtype=np.float32) if advantages is None else advantages
    return collate([s.prompt_ids for s in samples], [s.response_ids for s in samples], pad_id=0,
                   advantages=adv, sampling_logprobs=[s.logprobs for s in samples])
