"""Learner memory: chunked log-probs, checked against the computation they replace.

Fast tests run a small Llama in this process (no DeepSpeed): the chunked head against the
unchunked one and against the plain model's logits; what backward keeps.

Tolerances: a chunk multiplies fewer rows at a time, which changes the matmul's summation
order, so chunked values differ from unchunked ones by float32 round-off (measured <= 2e-6 on
log-probs around -5, about 4 ulps); the tests allow 1e-5.
"""

import numpy as np
import pytest
import torch

from actors.records import Sampling
from learner.batch import collate
from learner.learner import RAW, _next_token_logprobs

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
    torch.testing.assert_close(raw[keep], sampling.logprobs(logits, truncate=False).gather(-1, targets).squeeze(-1)[keep])
    assert not lp[~keep].any() and not entropy[~keep].any() and not raw[~keep].any()
    assert type(model.lm_head).forward is model.lm_head.forward.__func__  # the head's own forward is back


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

