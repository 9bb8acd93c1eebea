"""Learner memory: chunked log-probs, gradient checkpointing and the sharded reference model,
each checked against the computation it replaces.

Fast tests run a small Llama in this process (no DeepSpeed): the chunked head against the
unchunked one and against the plain model's logits; what backward keeps; checkpointed layers.
Slow tests run learner ranks under ZeRO-1, 2 and 3 (tests.helpers.make_learners) on a model
wide enough that ZeRO-3 partitions its matrices (DeepSpeed keeps a tensor under 1e5 elements
whole on every rank, which would leave the default tiny model's head unsharded).

Tolerances: a chunk multiplies fewer rows at a time, which changes the matmul's summation
order, so chunked values differ from unchunked ones by float32 round-off (measured: 4.8e-7 on
log-probs around -5, 1.9e-6 on entropies, 5e-7 of a gradient's largest entry); the tests
allow 1e-5. Checkpointed layers recompute the
same operations on the same inputs: their gradients are equal exactly.
"""

import dataclasses

import numpy as np
import pytest
import torch

from common.records import Sampling
from learner.batch import collate
from learner.learner import RAW, _next_token_logprobs
from learner.rank import checkpoint_layers

VOCAB = 97  # a size no other dimension has, to find [.., V] tensors by shape
SAMPLINGS = [RAW, Sampling(n=1, seed=0, temperature=0.7, top_k=20), Sampling(n=1, seed=0, temperature=0.7, top_p=0.9),
             Sampling(n=1, seed=0, temperature=1.3, top_k=30, top_p=0.8)]


def small_llama(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=False,
                         attn_implementation="eager")
    return LlamaForCausalLM(config).eval()


def sampled_batch(model, sampling):
    """Five answers of 3, 5, 7, 9, 11 tokens (35 targets) sampled from `model` with `sampling`
    after prompts of 2-4 tokens: every target is inside the top-k / top-p cut, as a real
    answer's are (a token outside has log-prob -inf)."""
    rng = np.random.default_rng(0)
    gen = torch.Generator().manual_seed(0)
    prompts, answers = [rng.integers(1, VOCAB, 2 + i % 3) for i in range(5)], []
    with torch.no_grad():
        for i, prompt in enumerate(prompts):
            ids = torch.as_tensor(prompt)[None]  # [1, P]
            for _ in range(3 + 2 * i):
                probs = sampling.logprobs(model(ids).logits[0, -1].float()).exp()  # [V]
                ids = torch.cat([ids, torch.multinomial(probs, 1, generator=gen)[None]], dim=1)
            answers.append(ids[0, len(prompt):].numpy())
    return collate(prompts, answers, pad_id=0)


def logprobs_and_grads(model, batch, sampling, chunk):
    """(log-probs, entropy, untruncated log-probs) [n, L-1] and the gradient of every parameter
    of a loss that weighs the log-probs and the untruncated ones differently."""
    model.zero_grad()
    lp, entropy, raw = _next_token_logprobs(model, batch.input_ids, batch.attention_mask, sampling, batch.loss_mask,
                                            untruncated=True, entropy=True, chunk=chunk)
    weights = torch.linspace(-1, 1, lp.numel()).reshape(lp.shape)  # [n, L-1]
    ((lp * weights).sum() + 0.3 * (raw * weights.flip(1)).sum()).backward()
    return [lp.detach(), entropy, raw.detach()], {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("sampling", SAMPLINGS, ids=["raw", "top-k", "top-p", "top-k+top-p"])
def test_chunked_logprobs_entropy_and_gradients_equal_unchunked_ones(sampling):
    model = small_llama()
    batch = sampled_batch(model, sampling)
    assert batch.loss_mask.sum() == 35
    want, want_grads = logprobs_and_grads(model, batch, sampling, chunk=0)
    assert torch.isfinite(want[0]).all() and (want[1] > 0).any()
    for chunk in (1, 5, 8, 35, 64):  # 5 and 35 divide the 35 targets; 1 chunk per token; 8 does not; 64 > 35
        got, grads = logprobs_and_grads(model, batch, sampling, chunk)
        for name, g, w in zip(("log-probs", "entropy", "untruncated"), got, want):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5, msg=lambda m: f"chunk {chunk} {name}: {m}")
        for name, w in want_grads.items():
            torch.testing.assert_close(grads[name], w, rtol=1e-5, atol=1e-6, msg=lambda m: f"chunk {chunk} {name}: {m}")


def test_unchunked_logprobs_are_the_plain_models():
    # The head runs apart on the target positions only (its forward replaced for the call):
    # the same numbers as the model's own logits at every position, cut to the targets.
    from learner.grpo import entropy_of_logprobs

    sampling = SAMPLINGS[3]
    model = small_llama()
    batch = sampled_batch(model, sampling)
    keep = torch.as_tensor(batch.loss_mask).bool()  # [n, L-1]
    with torch.no_grad():
        lp, entropy, raw = _next_token_logprobs(model, batch.input_ids, batch.attention_mask, sampling,
                                                batch.loss_mask, untruncated=True, entropy=True)
        logits = model(input_ids=torch.as_tensor(batch.input_ids),
                       attention_mask=torch.as_tensor(batch.attention_mask)).logits[:, :-1].float()  # [n, L-1, V]
    targets = torch.as_tensor(batch.input_ids)[:, 1:, None]  # [n, L-1, 1]
    every = sampling.logprobs(logits)  # [n, L-1, V]
    torch.testing.assert_close(lp[keep], every.gather(-1, targets).squeeze(-1)[keep])
    torch.testing.assert_close(entropy[keep], entropy_of_logprobs(every)[keep])
    untruncated = sampling.logprobs(logits, truncate=False)  # [n, L-1, V]
    torch.testing.assert_close(raw[keep], untruncated.gather(-1, targets).squeeze(-1)[keep])
    assert not lp[~keep].any() and not entropy[~keep].any() and not raw[~keep].any()
    assert type(model.lm_head).forward is model.lm_head.forward.__func__  # the head's own forward is back


def test_a_model_that_changes_its_logits_after_the_head_is_refused():
    # The head's replaced forward returns log-probs, which Gemma 2's soft-capping would then bend.
    model = small_llama()
    model.config.final_logit_softcapping = 30.0
    batch = sampled_batch(small_llama(), RAW)
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        _next_token_logprobs(model, batch.input_ids, batch.attention_mask, RAW, batch.loss_mask)


def test_chunked_backward_keeps_no_vocabulary_sized_tensor():
    # What autograd saves for backward outside the checkpoints: without chunks, the [m, V]
    # logits and log-probs; with them, nothing of the vocabulary's size.
    model = small_llama()
    batch = sampled_batch(model, RAW)
    saved = {}
    for chunk in (0, 8):
        shapes = saved[chunk] = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: shapes.append(tuple(t.shape)) or t, lambda t: t):
            lp, _, _ = _next_token_logprobs(model, batch.input_ids, batch.attention_mask, RAW, batch.loss_mask,
                                            entropy=True, chunk=chunk)
        lp.sum().backward()
    assert (35, VOCAB) in saved[0]
    assert [s for s in saved[8] if VOCAB in s] == []


def test_checkpointed_layers_recompute_with_the_same_gradient():
    # Each layer runs twice per step (forward, then again in backward); the gradient is the
    # same to the bit, and attention and MLP stay in eval mode (no dropout).
    batch = sampled_batch(small_llama(), RAW)
    grads, calls = {}, {}
    for checkpointed in (False, True):
        model = small_llama()
        if checkpointed:
            checkpoint_layers(model)
        calls[checkpointed] = []
        model.model.layers[0].register_forward_pre_hook(lambda *_: calls[checkpointed].append(1))
        grads[checkpointed] = logprobs_and_grads(model, batch, RAW, chunk=0)[1]
    assert (len(calls[False]), len(calls[True])) == (1, 2)
    assert not any(m.training for m in model.model.layers[0].modules() if m is not model.model.layers[0])
    for name, g in grads[False].items():
        torch.testing.assert_close(grads[True][name], g, rtol=0, atol=0, msg=name)


# ---- learner ranks under DeepSpeed -------------------------------------------------------------


def wide_model(model_cache, seed=0) -> str:
    """A 2-layer Llama of width 384: its head (324 x 384) and every matrix are over DeepSpeed's
    1e5-element threshold, so ZeRO-3 partitions them."""
    from learner.models import TinyLlamaSpec, tiny_llama_path

    return str(tiny_llama_path(TinyLlamaSpec(hidden_size=384, num_layers=2, num_heads=4, intermediate_size=1024,
                                             seed=seed), model_cache))


@pytest.mark.slow
def test_checkpointing_and_chunks_change_no_number_under_each_zero_stage(ray_cluster, model_cache):
    # The same GRPO step (with a KL to another model) and SFT step, at lr 0, with recomputed
    # layers and 5-token head chunks, then without: equal losses, KL, entropy and gradient
    # norms, and equal across stages too. ZeRO-3's two ranks get answers of different lengths
    # (21 and 15 tokens: different chunk counts, micro-batches accumulated on one of them).
    import ray

    from tests.helpers import fixed_batch, make_learners

    # Functions sent to the ranks are defined here: Ray sends nested functions by value, while
    # this module's own would be imported there as `test_memory`, which the ranks cannot.
    def count_layer_calls(rank):  # the policy's first layer's calls, from now on, in rank.layer_calls
        rank.layer_calls = []
        rank.engine.module.model.layers[0].register_forward_pre_hook(lambda *_: rank.layer_calls.append(1))

    def layer_calls(rank):  # the calls counted since the last time
        calls, rank.layer_calls = len(rank.layer_calls), []
        return calls

    def plain(rank):  # keep everything from now on: layers not recomputed, one head chunk
        rank.engine.module.gradient_checkpointing_disable()
        for module in rank.engine.module.modules():
            module.training = False
        rank.cfg = dataclasses.replace(rank.cfg, logprob_chunk=0)

    batch = fixed_batch(np.array([1.5, 0.5, -1, -1, 1, 0.2, -0.7, -0.3], dtype=np.float32))
    policy, reference = wide_model(model_cache), wide_model(model_cache, seed=1)
    results = {}
    for stage, shards in [(1, [batch]), (2, [batch]), (3, [batch.select(slice(0, 5)), batch.select(slice(5, 8))])]:
        learners = make_learners(policy, len(shards), stage, micro_batch_size=3, kl_beta=0.04,
                                 sampling=Sampling(n=1, seed=0, temperature=0.8),
                                 learner={"gradient_checkpointing": True, "logprob_chunk": 5})
        ray.get([l.load_reference.remote(reference) for l in learners], timeout=300)
        ray.get([l.__ray_call__.remote(count_layer_calls) for l in learners], timeout=60)
        for mode in ("recomputed", "kept"):
            grpo = ray.get([l.train_step.remote(s, 0.0, 1) for l, s in zip(learners, shards)], timeout=300)[0]
            sft = ray.get([l.sft_step.remote(s, 0.0) for l, s in zip(learners, shards)], timeout=300)[0]
            calls = ray.get(learners[0].__ray_call__.remote(layer_calls), timeout=60)
            results[stage, mode] = grpo | {f"sft_{k}": v for k, v in sft.items()}, calls
            ray.get([l.__ray_call__.remote(plain) for l in learners], timeout=60)
        for learner in learners:
            ray.kill(learner)
    (want, _), keys = results[1, "kept"], ("pg_loss", "kl", "entropy", "grad_norm", "sft_loss", "sft_grad_norm")
    assert want["kl"] > 1e-3 and want["grad_norm"] > 0
    for (stage, mode), (got, calls) in results.items():
        np.testing.assert_allclose([got[k] for k in keys], [want[k] for k in keys], rtol=1e-5,
                                   err_msg=f"ZeRO-{stage}, layers {mode}")
        # Rank 0's micro-batches of 3 answers: 3 per step of 8 answers, 2 of 5 (ZeRO-3). The
        # policy's first layer runs once in each forward, and once more in backward when recomputed.
        forwards = 2 * (2 if stage == 3 else 3)  # the GRPO step's and the SFT step's
        assert calls == (2 * forwards if mode == "recomputed" else forwards), (stage, mode, calls)


@pytest.mark.slow
def test_zero3_reference_is_sharded_and_scored_once_per_batch(ray_cluster, model_cache):
    # Two ZeRO-3 ranks: each holds about half of the reference's weights, its log-probs are those
    # of the whole model loaded plainly, and a step of two updates scores it once per micro-batch.
    import ray
    from transformers import AutoModelForCausalLM

    from tests.helpers import fixed_batch, make_learners

    model = wide_model(model_cache)
    batch = fixed_batch(np.array([1, -1, 2, -2, 1, -1, 2, -2], dtype=np.float32))
    learners = make_learners(model, 2, 3, micro_batch_size=2, kl_beta=0.04)
    ray.get([l.load_reference.remote(model) for l in learners], timeout=300)
    held = ray.get([l.__ray_call__.remote(lambda rank: (sum(p.ds_tensor.numel() for p in rank.reference.parameters()),
                                                         sum(p.ds_numel for p in rank.reference.parameters())))
                    for l in learners], timeout=60)
    for local, total in held:
        assert local < 0.55 * total, held  # a half, and the small norm weights every rank keeps

    def score(rank, b):  # the reference's log-probs [n, L-1]; a collective: every rank calls it
        with torch.no_grad():
            return _next_token_logprobs(rank.reference, b.input_ids, b.attention_mask, RAW, b.loss_mask)[0].numpy()

    sharded = ray.get([l.__ray_call__.remote(score, batch) for l in learners], timeout=60)[0]
    whole = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        np.testing.assert_allclose(sharded, score(type("Rank", (), {"reference": whole}), batch), rtol=1e-5, atol=1e-6)

    def count(rank):  # the reference's forwards from now on, in rank.ref_calls
        rank.ref_calls = 0
        rank.reference.module.model.layers[0].register_forward_pre_hook(
            lambda *_: setattr(rank, "ref_calls", rank.ref_calls + 1))

    ray.get([l.__ray_call__.remote(count) for l in learners], timeout=60)
    still = ray.get([l.train_step.remote(s, 0.0, 1) for l, s in zip(learners, batch.split(2))], timeout=300)[0]
    moved = ray.get([l.train_step.remote(s, 1e-2, 2) for l, s in zip(learners, batch.split(2))], timeout=300)[0]
    assert still["kl"] < 1e-9 and moved["kl"] > 1e-6  # the policy is its own reference until it moves
    # Per rank: 4 answers; one update = 2 micro-batches, two updates = 2 mini-batches of 1 each.
    assert ray.get([l.__ray_call__.remote(lambda rank: rank.ref_calls) for l in learners], timeout=60) == [4, 4]
    for learner in learners:
        ray.kill(learner)


@pytest.mark.slow
def test_reward_model_recomputes_its_layers_with_the_same_gradient(ray_cluster, tiny_model):
    # The reward trainer takes learner.gradient_checkpointing too: the same loss and gradient
    # norm with its layers recomputed or kept, and scoring in between leaves them recomputed.
    import ray

    from common.net import free_port
    from learner.config import LearnerConfig
    from learner.reward_model import RewardTrainer

    cfg = LearnerConfig(zero_stage=2, dtype="float32", threads=1, num_cpus=0.5, micro_batch_size=2,
                        gradient_checkpointing=True)
    trainer = ray.remote(RewardTrainer).options(num_cpus=0.5).remote(tiny_model, cfg, 0, 0, "127.0.0.1", free_port())
    rng = np.random.default_rng(0)
    ids = rng.integers(5, 300, (4, 2, 9))  # [pair, chosen / rejected, L]
    mask = np.ones_like(ids)
    mask[1:, 1, 6:] = 0  # rejected answers of different lengths
    step = (ids[:, 0], mask[:, 0], ids[:, 1], mask[:, 1], 0.0)

    def count_layer_calls(rank):  # the first layer's calls from now on, in rank.layer_calls
        rank.layer_calls = 0
        rank.engine.module.model.layers[0].register_forward_pre_hook(
            lambda *_: setattr(rank, "layer_calls", rank.layer_calls + 1))

    def plain(rank):  # layers kept from now on
        rank.engine.module.gradient_checkpointing_disable()
        for module in rank.engine.module.modules():
            module.training = False

    ray.get(trainer.__ray_call__.remote(count_layer_calls), timeout=60)
    recomputed = ray.get(trainer.train_step.remote(*step), timeout=300)
    ray.get(trainer.scores.remote(ids[:, 0], mask[:, 0]), timeout=300)
    again = ray.get(trainer.train_step.remote(*step), timeout=300)
    ray.get(trainer.__ray_call__.remote(plain), timeout=60)
    kept = ray.get(trainer.train_step.remote(*step), timeout=300)
    # Two micro-batches of 2 pairs a step, each layer run in forward and again in backward;
    # one forward for the scores; then two forwards without recomputing.
    assert ray.get(trainer.__ray_call__.remote(lambda rank: rank.layer_calls), timeout=60) == 4 + 1 + 4 + 2
    assert recomputed == again
    assert kept == pytest.approx(recomputed, rel=1e-6) and kept["grad_norm"] > 0
    ray.kill(trainer)
