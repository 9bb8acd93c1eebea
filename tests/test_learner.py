"""The DeepSpeed learner on real Ray actors: its loss, metrics and gradient against numbers
computed by hand or by an independent recomputation, however the batch is cut.

ZeRO-2 with one rank and ZeRO-3 with two ranks (gloo on the CPU accelerator). The batch is
tests.helpers.fixed_batch: 8 answers of 3, 4, 5, 6, 3, 4, 5, 6 tokens to two prompts.
"""

import dataclasses
import os
import shutil
import sys
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import ray

from tests.helpers import fixed_batch, make_learners, run_on_ranks

pytestmark = pytest.mark.slow

LENGTHS = np.array([3, 4, 5, 6, 3, 4, 5, 6])  # answer tokens of fixed_batch's sequences


def test_a_rank_compiles_deepspeed_ops_with_the_environments_ninja():
    # Whatever PATH started the process (here one where a system ninja comes first): processes
    # that found different ninjas rebuilt DeepSpeed's cached CPU op each time they took turns.
    from learner.config import LearnerConfig
    from learner.rank import set_rank_env

    with mock.patch.dict(os.environ, {"PATH": "/usr/local/bin:/usr/bin:/bin"}):
        set_rank_env(LearnerConfig(num_ranks=2), 1, "10.0.0.7", 29500)
        assert shutil.which("ninja") == str(Path(sys.executable).parent / "ninja")
        assert os.environ["PATH"].endswith(":/usr/local/bin:/usr/bin:/bin")
        assert [os.environ[k] for k in ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE",
                                        "DS_ACCELERATOR", "TORCHDYNAMO_DISABLE")] == ["10.0.0.7", "29500", "1", "0",
                                                                                     "2", "cpu", "1"]


def test_each_python_environment_has_its_own_deepspeed_op_cache(monkeypatch):
    # The op's build command holds the environment's paths: two checkouts' environments
    # sharing one folder rebuilt it (a minute) each time they took turns.
    from learner.rank import extensions_dir

    here = extensions_dir("~/.cache/r1ray")
    assert extensions_dir("~/.cache/r1ray") == here  # one folder per environment, found again
    monkeypatch.setattr(sys, "prefix", "/work/other-checkout/.venv")
    there = extensions_dir("~/.cache/r1ray")
    assert here.parent == there.parent == Path("~/.cache/r1ray/torch_extensions").expanduser()
    assert here != there and there.name.startswith(".venv-")


def kill(learners):
    for learner in learners:
        ray.kill(learner)


@pytest.fixture(scope="module")
def ranks(ray_cluster, tiny_model, tmp_path_factory):
    """ranks(num_ranks, zero_stage, micro_batch_size=4, copy=0, **algorithm) -> float32 learner
    ranks as if just started with these settings: each shape is started once per module (~12 s)
    and brought back to its state at start (weights, Adam's moments, RNG, no reference; that
    the restore is exact is test_state_restores_exactly_on_two_ranks's point).
    `copy=1` is a second group of the same shape, for a test that needs two at once."""
    from learner.config import AlgorithmConfig

    started, folder = {}, tmp_path_factory.mktemp("learner-start")

    def get(num_ranks, zero_stage, micro_batch_size=4, copy=0, **algorithm):
        shape = (num_ranks, zero_stage, copy)
        state = str(folder / "-".join(map(str, shape)))
        if shape not in started:
            started[shape] = make_learners(tiny_model, num_ranks, zero_stage)
            ray.get([l.save_state.remote(state) for l in started[shape]], timeout=300)
        learners = started[shape]
        ray.get([l.load_state.remote(state) for l in learners], timeout=300)
        ray.get([l.__ray_call__.remote(configure, micro_batch_size, AlgorithmConfig(**algorithm).resolved())
                 for l in learners], timeout=60)
        return learners

    yield get
    for learners in started.values():
        kill(learners)


# A lambda, which Ray sends by value: a function of this module would be imported in the
# rank's process as `test_learner`, pytest's name for it.
configure = lambda rank, micro_batch_size, algo: rank.__dict__.update(  # noqa: E731
    cfg=dataclasses.replace(rank.cfg, micro_batch_size=micro_batch_size), algo=algo, reference=None,
    reference_path=None)


def token_logprobs(learners, batch, i):
    """Sequence i's answer-token log-probs under the learner's current weights (temperature 1).
    `learners`: one rank, or all of them (a ZeRO-3 forward is a collective)."""
    ids = batch.input_ids[i, : int(batch.attention_mask[i].sum())]
    ranks = learners if isinstance(learners, list) else [learners]
    scores = ray.get([l.score.remote(ids) for l in ranks], timeout=300)[0]
    return scores[batch.loss_mask[i, : len(ids) - 1].astype(bool)]


@pytest.mark.parametrize("num_ranks, zero_stage, dtype", [(1, 2, "float32"), (2, 3, "bfloat16")])
def test_sft_loss_falls_on_a_fixed_batch(ranks, tiny_model, num_ranks, zero_stage, dtype):
    shared = dtype == "float32"
    learners = ranks(num_ranks, zero_stage) if shared else make_learners(tiny_model, num_ranks, zero_stage, dtype)
    batch = fixed_batch()
    losses = [run_on_ranks(learners, "sft_step", batch, 3e-3)[0]["loss"] for _ in range(8)]
    assert losses[-1] < 0.7 * losses[0], losses
    if not shared:
        kill(learners)


def test_grpo_step_raises_good_answers_and_lowers_bad_ones(ranks, tiny_model):
    learners = ranks(2, 3, kl_beta=0.01)
    ray.get([l.load_reference.remote(tiny_model) for l in learners], timeout=300)
    # Answers 0-1 and 4-5 were good (advantage +1), the others bad (-1).
    advantages = np.array([1, 1, -1, -1, 1, 1, -1, -1], dtype=np.float32)
    batch = fixed_batch(advantages)

    def good_minus_bad():  # summed log-prob of the good answers minus the bad ones'
        lp = np.array([token_logprobs(learners, batch, i).sum() for i in range(8)])
        return lp[advantages > 0].mean() - lp[advantages < 0].mean()

    before = good_minus_bad()
    first = run_on_ranks(learners, "train_step", batch, 1e-3, 1)
    second = run_on_ranks(learners, "train_step", batch, 1e-3, 1)
    assert good_minus_bad() > before + 0.5
    assert first[0] == first[1]  # every rank reports the whole batch's metrics
    # One update: ratio 1, nothing clipped, and the loss is the token mean of -A:
    # -(3 + 4 - 5 - 6 + 3 + 4 - 5 - 6) / 36 = 8 / 36.
    m = first[0]
    assert m["ratio_mean"] == 1.0 and m["clip_fraction"] == 0.0
    assert m["pg_loss"] == pytest.approx(8 / 36, rel=1e-6)
    # The reference is the starting policy: no KL at the first step, some after it moved.
    assert m["kl"] < 1e-9 and second[0]["kl"] > 1e-4


def test_the_second_update_clips_as_a_recomputation_says(ranks):
    # Two updates per step: mini-batch 1 (answers 0-3) moves the policy, and mini-batch 2
    # (answers 4-7) is then taken against the old policy, recomputed before the first update.
    # A second learner replays update 1 alone; its log-probs give the ratios update 2 saw.
    adv = np.array([2, 2, -2, -2, 2, 2, -2, -2], dtype=np.float32)
    batch, lr = fixed_batch(adv), 5e-2
    (learner,) = ranks(1, 2, old_logprobs="learner")
    (replay,) = ranks(1, 2, copy=1)
    old = [token_logprobs(replay, batch, i) for i in range(4, 8)]
    m = ray.get(learner.train_step.remote(batch, lr, 2), timeout=300)
    ray.get(replay.train_step.remote(batch.select(slice(0, 4)), lr, 1), timeout=300)
    ratios = [np.exp(token_logprobs(replay, batch, i) - lp) for i, lp in zip(range(4, 8), old)]
    clipped = sum(int(((r > 1.2) if a > 0 else (r < 0.8)).sum()) for r, a in zip(ratios, adv[4:]))
    total = LENGTHS.sum()  # tokens of both mini-batches: update 1's ratios are exactly 1
    assert clipped > 0
    assert m["clip_fraction"] == pytest.approx(clipped / total, rel=1e-6)  # float32 means
    assert m["ratio_mean"] == pytest.approx((LENGTHS[:4].sum() + sum(r.sum() for r in ratios)) / total, rel=1e-5)


def test_old_policy_is_the_engines_sampling_logprobs(ranks):
    (learner,) = ranks(1, 2)
    batch = fixed_batch(np.array([1, 1, -1, -1, 1, 1, -1, -1], dtype=np.float32))
    # With two updates the ratio is taken against the engine's log-probs, -3 for every token
    # here; lr 0 keeps the policy where it is, so every ratio is exp(lp + 3).
    ratios = np.concatenate([np.exp(token_logprobs(learner, batch, i) + 3.0) for i in range(8)])
    m = ray.get(learner.train_step.remote(batch, 0.0, 2), timeout=300)
    assert m["ratio_mean"] == pytest.approx(ratios.mean(), rel=1e-5)
    assert m["offpolicy_gap"] == pytest.approx(np.abs(np.log(ratios[:LENGTHS[:4].sum()])).mean(), rel=1e-5)
    # With the learner's own log-probs in their place every ratio is 1.
    for i in range(len(batch)):
        lp = token_logprobs(learner, batch, i)
        batch.sampling_logprobs[i, batch.loss_mask[i].astype(bool)] = lp
    m = ray.get(learner.train_step.remote(batch, 0.0, 2), timeout=300)
    assert m["ratio_mean"] == pytest.approx(1.0, abs=1e-6) and m["offpolicy_gap"] < 1e-6
    # Nothing was compiled on the way (learner.rank.set_rank_env): DeepSpeed's import of its Muon
    # optimizer no longer pulls in inductor.
    assert not ray.get(learner.__ray_call__.remote(lambda _: "torch._inductor.compile_fx" in sys.modules))


def test_loss_and_gradient_are_the_same_however_the_batch_is_cut(ranks):
    # One batch, four cuts: one micro-batch; micro-batches of 3 (3+3+2, accumulated); two
    # ZeRO-3 ranks with micro-batches of 2; two ZeRO-3 ranks of which one gets nothing (it
    # runs empty micro-batches so that the other's collectives are answered). Each part is
    # weighted by its share of the batch's tokens (or sequences), so the gradient, and the
    # logged loss, must not depend on the cut.
    # Token mean of -A: -(4.5 + 2 - 5 - 6 + 3 + 0.8 - 3.5 - 1.8) / 36 = 6 / 36; sequence mean: -0.2 / 8;
    # constant (Dr. GRPO): the same sum over 8 sequences x 32 tokens (the sampling's max_new_tokens).
    adv = np.array([1.5, 0.5, -1, -1, 1, 0.2, -0.7, -0.3], dtype=np.float32)
    batch = fixed_batch(adv)
    expected = {"token": 6 / 36, "sequence": -0.2 / 8, "constant": 6 / 256}
    results = {aggregation: [] for aggregation in expected}
    # Switches a live rank's aggregation (a lambda, as `configure` is).
    set_aggregation = lambda rank, a: setattr(rank, "algo", dataclasses.replace(rank.algo, aggregation=a))  # noqa: E731
    for num_ranks, zero_stage, micro, shards in [(1, 2, 8, None), (1, 2, 3, None), (2, 3, 2, None),
                                                 (2, 3, 4, [batch, batch.select(slice(0, 0))])]:
        learners = ranks(num_ranks, zero_stage, micro_batch_size=micro)
        shards = shards or batch.split(num_ranks)
        # Every cut takes the same two steps, a step with each aggregation, from the same start.
        for aggregation, got in results.items():
            ray.get([l.__ray_call__.remote(set_aggregation, aggregation) for l in learners], timeout=60)
            got.append(ray.get([l.train_step.remote(s, 1e-3, 1) for l, s in zip(learners, shards)], timeout=300)[0])
    for aggregation, got in results.items():
        assert got[0]["pg_loss"] == pytest.approx(expected[aggregation], rel=1e-6), aggregation
        for key in ("grad_norm", "pg_loss", "entropy"):
            np.testing.assert_allclose([r[key] for r in got[1:]], [got[0][key]] * 3, rtol=1e-4,
                                       err_msg=f"{aggregation} {key}")


def test_importance_weights_against_a_known_behaviour_policy(ranks):
    # max_staleness 1: each token is weighted by min(pi / mu, is_cap). The behaviour policy mu
    # is the learner's own policy with answers 0-3 made half as likely (w = 2, the cap) and
    # answers 4-7 twice as likely (w = 0.5).
    adv = np.array([1, -1, 1, -1, 1, -1, 1, -1], dtype=np.float32)
    batch = fixed_batch(adv)
    (learner,) = ranks(1, 2, max_staleness=1, is_cap=2.0)
    for i in range(8):
        shift = -np.log(2.0) if i < 4 else np.log(2.0)
        batch.sampling_logprobs[i, batch.loss_mask[i].astype(bool)] = token_logprobs(learner, batch, i) + shift
    w = np.where(np.arange(8) < 4, 2.0, 0.5)
    m = ray.get(learner.train_step.remote(batch, 0.0, 1), timeout=300)
    assert m["is_weight_mean"] == pytest.approx((w * LENGTHS).sum() / LENGTHS.sum(), rel=1e-5)
    assert m["pg_loss"] == pytest.approx(-(w * adv * LENGTHS).sum() / LENGTHS.sum(), rel=1e-5)
    # Weights of 1 (mu is the policy) and of 0.5 everywhere (mu twice as likely): the loss is
    # linear in the weights, so the gradient halves.
    norms = {}
    for weight in (1.0, 0.5):
        for i in range(8):
            batch.sampling_logprobs[i, batch.loss_mask[i].astype(bool)] = (token_logprobs(learner, batch, i)
                                                                          - np.log(weight))
        got = ray.get(learner.train_step.remote(batch, 0.0, 1), timeout=300)
        assert got["is_weight_mean"] == pytest.approx(weight, rel=1e-5)
        norms[weight] = got["grad_norm"]
    assert norms[0.5] == pytest.approx(norms[1.0] / 2, rel=1e-4)


def set_sampler(learner, batch, shift):
    """Make the batch's sampling log-probs the learner's own plus `shift[i]` for answer i:
    the sampler then had pi_old / pi_sampler = exp(-shift[i]) on every token of answer i."""
    for i in range(len(batch)):
        batch.sampling_logprobs[i, batch.loss_mask[i].astype(bool)] = token_logprobs(learner, batch, i) + shift[i]


def test_masked_importance_sampling_drops_exactly_the_tokens_and_sequences_outside_the_band(ranks):
    # Answers 0 and 5 had r = 3 on every token (outside [0.5, 2]), the others r = 1. One update
    # at lr 0: pi_old is the learner's current policy, the loss is the token mean of -w * A.
    adv = np.array([1, -1, 1, -1, 1, -1, 1, -1], dtype=np.float32)
    batch = fixed_batch(adv)
    shift = np.where(np.isin(np.arange(8), [0, 5]), -np.log(3.0), 0.0)
    kept = ~np.isin(np.arange(8), [0, 5])
    for mode in ("mis_token", "mis_sequence"):
        (learner,) = ranks(1, 2, mismatch=mode)
        set_sampler(learner, batch, shift)
        m = ray.get(learner.train_step.remote(batch, 0.0, 1), timeout=300)
        assert m["masked_tokens"] == pytest.approx(LENGTHS[~kept].sum() / LENGTHS.sum(), rel=1e-6), mode
        assert m["masked_sequences"] == pytest.approx(2 / 8, rel=1e-6), mode
        assert m["pg_loss"] == pytest.approx(-(adv * LENGTHS)[kept].sum() / LENGTHS.sum(), rel=1e-5), mode
        assert m["offpolicy_gap"] == pytest.approx(np.log(3.0) * LENGTHS[~kept].sum() / LENGTHS.sum(), rel=1e-5)
        assert m["mismatch_kl"] == pytest.approx((3 - 1 - np.log(3.0)) * LENGTHS[~kept].sum() / LENGTHS.sum(),
                                                 rel=1e-5)
    # No correction: the same sampler is only measured, and every token counts.
    (learner,) = ranks(1, 2)
    m = ray.get(learner.train_step.remote(batch, 0.0, 1), timeout=300)
    assert "masked_tokens" not in m and m["pg_loss"] == pytest.approx(-(adv * LENGTHS).sum() / LENGTHS.sum(),
                                                                      abs=1e-6)


def test_cispo_is_reinforce_weighted_by_the_clipped_ratio(ranks):
    # One update: every ratio is 1, inside any clip range, so the loss is -A * lp per token, averaged.
    adv = np.array([1.5, 0.5, -1, -1, 1, 0.2, -0.7, -0.3], dtype=np.float32)
    batch = fixed_batch(adv)
    (learner,) = ranks(1, 2, loss="cispo")
    lp = [token_logprobs(learner, batch, i) for i in range(8)]
    m = ray.get(learner.train_step.remote(batch, 0.0, 1), timeout=300)
    assert m["pg_loss"] == pytest.approx(-sum(a * l.sum() for a, l in zip(adv, lp)) / LENGTHS.sum(), rel=1e-5)


def test_an_entropy_bonus_alone_raises_the_entropy(ranks):
    # Advantages all 0: without a bonus there is no gradient at all; with one, steps raise the
    # entropy of the sampling distribution on the batch's positions.
    batch = fixed_batch(np.zeros(8, dtype=np.float32))
    (learner,) = ranks(1, 2)
    assert ray.get(learner.train_step.remote(batch, 1e-2, 1), timeout=300)["grad_norm"] == 0.0
    (learner,) = ranks(1, 2, entropy_coef=0.1)
    entropies = [ray.get(learner.train_step.remote(batch, 1e-4, 1), timeout=300)["entropy"] for _ in range(3)]
    assert entropies[0] < entropies[1] < entropies[2], entropies


def test_the_kl_folded_into_the_reward_is_each_answers_sum_in_the_shards_order(ranks, tiny_model):
    # The reference is the policy itself (as it starts); the sampler's log-probs are the policy's
    # plus delta_i, so each token's d = ref - mu = -delta_i: k1 = delta_i, k3 = e^-delta_i + delta_i - 1,
    # summed over answer i's tokens. Micro-batches of 3 (3 + 3 + 2), in the shard's order.
    delta = np.array([0.1, -0.2, 0.3, 0.0, 0.5, -0.5, 0.05, 1.0])
    batch = fixed_batch(np.zeros(8, dtype=np.float32))
    for estimator, per_token in (("k1", delta), ("k3", np.exp(-delta) + delta - 1)):
        (learner,) = ranks(1, 2, micro_batch_size=3, kl_beta=0.1, kl_in="reward", kl_estimator=estimator)
        ray.get(learner.load_reference.remote(tiny_model), timeout=300)
        set_sampler(learner, batch, delta)
        got = ray.get(learner.sequence_kl.remote(batch), timeout=300)
        np.testing.assert_allclose(got, per_token * LENGTHS, rtol=1e-4, atol=1e-5, err_msg=estimator)
    # The loss then has no KL term: none is measured, and the reference runs no forward in it.
    m = ray.get(learner.train_step.remote(batch, 0.0, 1), timeout=300)
    assert "kl" not in m


def test_the_kl_reference_is_the_model_it_is_given(ranks, tiny_model, tmp_path):
    # After SFT moved the policy, the policy itself (saved, as the driver saves the RL start)
    # is a reference with no KL; the initial model is not.
    (learner,) = ranks(1, 2, kl_beta=0.04)
    batch = fixed_batch(np.array([1, -1] * 4, dtype=np.float32))
    for _ in range(5):
        ray.get(learner.sft_step.remote(batch, 3e-3), timeout=300)
    ray.get(learner.save.remote(str(tmp_path / "rl_start"), tiny_model), timeout=300)
    kls = {}
    for name, path in [("rl_start", str(tmp_path / "rl_start")), ("initial", tiny_model)]:
        ray.get(learner.load_reference.remote(path), timeout=300)
        kls[name] = ray.get(learner.train_step.remote(batch, 0.0, 1), timeout=300)["kl"]
    assert kls["rl_start"] < 1e-9 and kls["initial"] > 1e-2, kls


def test_mask_truncated_removes_exactly_the_truncated_answers(ranks):
    # The driver zeroes the loss mask of answers cut by the token budget: the loss and the
    # gradient must be those of the batch without them (they still shaped the advantages).
    from cluster.config import load_config
    from cluster.train import learn
    from common.records import Sample

    adv = np.array([1.5, 0.5, -1, -1, 1, 0.2, -0.7, -0.5], dtype=np.float32)
    batch, truncated = fixed_batch(adv), {1, 6}
    samples = []
    for i in range(8):
        start = int(np.argmax(batch.loss_mask[i])) + 1
        end = int(batch.attention_mask[i].sum())
        samples.append(Sample(str(i // 4), batch.input_ids[i, :start], batch.input_ids[i, start:end],
                              np.full(end - start, -3.0, dtype=np.float32), "", "length" if i in truncated else "stop", 0))
    (learner,) = ranks(1, 2, micro_batch_size=3)
    cfg = load_config(None, ["algorithm.mask_truncated=true", "algorithm.updates_per_step=1"])
    masked = learn(cfg, [learner], samples, adv, 0.0)
    keep = [i for i in range(8) if i not in truncated]
    without = learn(cfg, [learner], [samples[i] for i in keep], adv[keep], 0.0)
    assert masked["learner/pg_loss"] == pytest.approx(-(adv * LENGTHS)[keep].sum() / LENGTHS[keep].sum(), rel=1e-6)
    assert masked["learner/grad_norm"] == pytest.approx(without["learner/grad_norm"], rel=1e-5)
    assert masked["learner/entropy"] == pytest.approx(without["learner/entropy"], rel=1e-5)


@pytest.mark.parametrize("zero_stage, dtype", [(3, "bfloat16"), (2, "float32")])
def test_state_restores_exactly_on_two_ranks(ray_cluster, tiny_model, tmp_path, zero_stage, dtype):
    # Weights, Adam's moments and the RNG: the step after a restore is the step after the save.
    # ZeRO-2 writes one model-states file for both ranks: rank 1's RNG must still come back.
    batch = fixed_batch(np.array([1, -1, 2, -2, 1, -1, 2, -2], dtype=np.float32))
    learners = make_learners(tiny_model, 2, zero_stage, dtype)
    run_on_ranks(learners, "train_step", batch, 1e-2, 1)
    ray.get([l.save_state.remote(str(tmp_path)) for l in learners], timeout=300)
    after = run_on_ranks(learners, "train_step", batch, 1e-2, 2)[0]
    scores = token_logprobs(learners, batch, 3)
    kill(learners)
    fresh = make_learners(tiny_model, 2, zero_stage, dtype)
    ray.get([l.load_state.remote(str(tmp_path)) for l in fresh], timeout=300)
    assert run_on_ranks(fresh, "train_step", batch, 1e-2, 2)[0] == after
    np.testing.assert_array_equal(token_logprobs(fresh, batch, 3), scores)
    kill(fresh)
