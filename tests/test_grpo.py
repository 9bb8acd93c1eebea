"""Tests for learner/grpo.py: hand-checkable numbers per formula, then a slow loop reference.

Each formula test uses 3-6 elements with the arithmetic in a comment. The reference at the
bottom is written element by element in plain Python (torch scalars only where autograd is
needed), so it shares no vectorised code with the module; the module must match it, value
and gradient, on random inputs. Run: OMP_NUM_THREADS=1 python -m pytest tests/test_grpo.py -q
"""

from __future__ import annotations

import math

import pytest
import torch

from learner.grpo import (group_advantages, groups_with_signal, importance_weights, kl_estimate, masked_mean,
                          mismatch_metrics, policy_loss, sequence_kl, token_entropy)

torch.set_num_threads(1)

LN2 = math.log(2.0)


def t(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


def close(actual, expected, atol=1e-6):
    torch.testing.assert_close(torch.as_tensor(actual, dtype=torch.float64),
                               torch.as_tensor(expected, dtype=torch.float64),
                               atol=atol, rtol=0.0)


# ---------------------------------------------------------------- group_advantages


def test_group_advantages_two_groups_of_two():
    # groups [1, 0] and [0, 1]: mean 0.5, deviations +-0.5,
    # sample std = sqrt((0.25 + 0.25) / (2 - 1)) = sqrt(0.5) = 0.707107
    # A = 0.5 / 0.707107 = 0.707107 (eps=0 so the numbers are exact)
    adv = group_advantages(t([1, 0, 0, 1]), group_size=2, eps=0.0)
    a = math.sqrt(0.5)
    close(adv, [a, -a, -a, a])


def test_group_advantages_uses_sample_std_and_eps():
    # group [1, 0, 0]: mean 1/3, deviations [2/3, -1/3, -1/3]
    # sample var = (4/9 + 1/9 + 1/9) / (3 - 1) = 1/3, std = 0.577350
    # (population std would be sqrt(2/9) = 0.471405 and give A_0 = 1.414214)
    # eps = 0.1: A = [2/3, -1/3, -1/3] / 0.677350 = [0.984227, -0.492113, -0.492113]
    # group [2, 2, 2]: all equal -> 0
    adv = group_advantages(t([1, 0, 0, 2, 2, 2]), group_size=3, eps=0.1)
    close(adv, [0.984227, -0.492113, -0.492113, 0, 0, 0])


def test_group_advantages_without_std():
    # r - mean_g only: [1, 0, 0] -> [2/3, -1/3, -1/3]; [5, 3, 1] (mean 3) -> [2, 0, -2]
    adv = group_advantages(t([1, 0, 0, 5, 3, 1]), group_size=3, normalize_std=False)
    close(adv, [2 / 3, -1 / 3, -1 / 3, 2, 0, -2])


@pytest.mark.parametrize("normalize_std", [True, False])
@pytest.mark.parametrize("value,group_size", [(0.1, 7), (1 / 3, 7), (1e6 + 0.1, 3), (1.0, 4)])
def test_group_advantages_all_equal_group_is_exactly_zero(value, group_size, normalize_std):
    # In float32 seven copies of 0.1 have mean 0.1 - 7.45e-9 (and 1e6+0.1 three times is off
    # by 0.0625), so (r - mean) / (0 + 1e-6) would be -0.00745 without the exact-zero rule.
    rewards = torch.full((2 * group_size,), value, dtype=torch.float32)
    rewards[:group_size] = torch.arange(group_size, dtype=torch.float32)  # a normal group first
    adv = group_advantages(rewards, group_size, normalize_std=normalize_std)
    assert torch.equal(adv[group_size:], torch.zeros(group_size))
    assert (adv[:group_size] != 0).sum() >= group_size - 1  # the varied group is untouched


def test_group_advantages_group_size_one_is_zero():
    adv = group_advantages(t([3.0, -1.0, 0.5]), group_size=1)
    assert torch.equal(adv, torch.zeros(3, dtype=torch.float64))


def test_group_advantages_integer_rewards_become_float():
    # [1, 0] -> +-0.707107 as in the first test, returned as float32
    adv = group_advantages(torch.tensor([1, 0]), group_size=2, eps=0.0)
    assert adv.dtype == torch.float32
    close(adv, [math.sqrt(0.5), -math.sqrt(0.5)])


def test_group_advantages_errors():
    with pytest.raises(ValueError, match=r"N=5 .*group_size=2"):
        group_advantages(torch.zeros(5), group_size=2)
    with pytest.raises(ValueError, match=r"group_size=0"):
        group_advantages(torch.zeros(4), group_size=0)
    with pytest.raises(ValueError, match=r"1-D.*\(2, 2\)"):
        group_advantages(torch.zeros(2, 2), group_size=2)


# ---------------------------------------------------------------- KL estimators, masked_mean, entropy


def test_kl_k3_known_values():
    # d = ref - lp; k3 = e^d - d - 1
    # d = 0      -> 1 - 0 - 1            = 0
    # d = ln 2   -> 2 - 0.693147 - 1     = 0.306853
    # d = 1      -> 2.718282 - 1 - 1     = 0.718282
    # d = -ln 2  -> 0.5 + 0.693147 - 1   = 0.193147
    lp = t([[0.0, 0.0], [-1.0, 0.0]])
    ref = t([[0.0, LN2], [0.0, -LN2]])
    close(kl_estimate(lp, ref), [[0.0, 0.306853], [0.718282, 0.193147]])
    # k1 = -d: [0, -ln 2, -1, ln 2]; k2 = d^2 / 2: [0, 0.240227, 0.5, 0.240227]
    close(kl_estimate(lp, ref, "k1"), [[0.0, -LN2], [-1.0, LN2]])
    close(kl_estimate(lp, ref, "k2"), [[0.0, 0.240227], [0.5, 0.240227]])
    with pytest.raises(ValueError, match=r"estimator='k4'"):
        kl_estimate(lp, ref, "k4")


def test_kl_k3_and_k2_are_non_negative():
    g = torch.Generator().manual_seed(0)
    lp, ref = torch.randn(2, 4, 8, generator=g, dtype=torch.float64) * 3
    assert (kl_estimate(lp, ref) >= 0).all() and (kl_estimate(lp, ref, "k2") >= 0).all()


def test_kl_estimators_average_to_the_true_kl_on_samples_of_the_policy():
    # pi = [0.5, 0.3, 0.2], pi_ref = [0.2, 0.3, 0.5]: KL(pi || ref) = 0.5 ln 2.5 + 0.2 ln 0.4
    # = 0.458145 - 0.183258 = 0.274887. k1 and k3 are unbiased: their expectation under pi is
    # exactly that; k2's is not: 0.5 * (0.5 + 0.2) * ln^2 2.5 = 0.35 * 0.839589 = 0.293856.
    pi, ref = t([0.5, 0.3, 0.2]), t([0.2, 0.3, 0.5])
    lp, rlp = pi.log()[None], ref.log()[None]
    expect = {k: float((pi * kl_estimate(lp, rlp, k)[0]).sum()) for k in ("k1", "k2", "k3")}
    assert expect["k1"] == pytest.approx(0.274887, abs=1e-6)
    assert expect["k3"] == pytest.approx(0.274887, abs=1e-6)
    assert expect["k2"] == pytest.approx(0.293856, abs=1e-6)


def test_sequence_kl_sums_each_answers_tokens():
    # Row 0: tokens d = [ln 2, 0] -> k3 [0.306853, 0]; k1 [-ln 2, 0]. Row 1: one token d = -ln 2
    # -> k3 0.193147, k1 ln 2; its padding holds NaN, which must not reach the sum.
    lp = t([[0.0, -1.0], [0.0, float("nan")]])
    ref = t([[LN2, -1.0], [-LN2, 5.0]])
    mask = torch.tensor([[1, 1], [1, 0]])
    close(sequence_kl(lp, ref, mask), [0.306853, 0.193147])
    close(sequence_kl(lp, ref, mask, "k1"), [-LN2, LN2])


def test_masked_mean():
    # all: (1 + 2) / 2 = 1.5; per row: [1.5, 0 (empty row, no NaN)]; the NaN is masked out
    x = t([[1.0, 2.0, float("nan")], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[1, 1, 0], [0, 0, 0]])
    close(masked_mean(x, mask), 1.5)
    close(masked_mean(x, mask, dim=-1), [1.5, 0.0])
    close(masked_mean(x, torch.zeros_like(mask)), 0.0)
    # column means: [1, 2, 0] (third column empty)
    close(masked_mean(x, mask, dim=0), [1.0, 2.0, 0.0])


def test_masked_mean_gradient_skips_masked_nan():
    x = t([[1.0, float("nan")]]).requires_grad_()
    masked_mean(x, torch.tensor([[1, 0]])).backward()
    close(x.grad, [[1.0, 0.0]])


def test_token_entropy():
    # uniform over 4 -> ln 4 = 1.386294; two equal huge logits -> ln 2 (no overflow);
    # one finite logit and -inf elsewhere -> 0 (no 0 * -inf NaN);
    # probs [0.5, 0.25, 0.25] from logits [ln 2, 0, 0] -> 0.5 ln 2 + 2 * 0.25 ln 4 = 1.039721
    inf = float("inf")
    logits = t([[[0.0, 0.0, 0.0, 0.0],
                 [1e4, 1e4, -inf, -inf],
                 [3.0, -inf, -inf, -inf],
                 [LN2, 0.0, 0.0, -inf]]])
    close(token_entropy(logits), [[math.log(4), LN2, 0.0, 1.039721]])


# ---------------------------------------------------------------- policy_loss, by hand


def test_policy_loss_ratio_one_is_plain_policy_gradient():
    # lp == old -> ratio 1, nothing clipped. per-token loss = -A: [-1, -1, 1, 1]
    # token mean = 0; d loss / d lp = -A * ratio / 4 = [[-0.25, -0.25], [0.25, 0.25]]
    lp = t([[-0.5, -1.0], [-2.0, -0.1]]).requires_grad_()
    loss, m = policy_loss(lp, lp.detach(), t([1.0, -1.0]), torch.ones(2, 2))
    loss.backward()
    close(loss, 0.0)
    close(lp.grad, [[-0.25, -0.25], [0.25, 0.25]])
    assert m["clip_fraction"] == 0.0 and m["ratio_mean"] == pytest.approx(1.0)


def test_importance_weights_are_truncated_ratios_and_constants():
    # pi_prox / mu per token: e^0 = 1, e^(ln 1.5) = 1.5, e^(ln 3) = 3 -> truncated at cap 2,
    # e^(-ln 2) = 0.5; the masked position is 1 whatever it holds (here NaN).
    prox = t([[0.0, math.log(1.5)], [math.log(3.0), -math.log(2.0)], [float("nan"), -1.0]]).requires_grad_()
    mu = torch.zeros(3, 2)
    mask = t([[1, 1], [1, 1], [0, 1]])
    w = importance_weights(prox, mu, mask, cap=2.0)
    close(w, [[1.0, 1.5], [2.0, 0.5], [1.0, math.exp(-1.0)]])
    assert not w.requires_grad  # a weight, not a path for the gradient
    with pytest.raises(ValueError, match="cap must be >= 1"):
        importance_weights(prox, mu, mask, cap=0.5)


def test_masked_importance_weights_drop_tokens_or_sequences_outside_the_band():
    # r = pi_prox / mu per token. Row 0: [1, 3] (3 is outside [0.5, 2]); row 1: [1.5, 1.5]; row 2:
    # [0.4, padding]. mis_token: each token's r inside the band, else 0.
    prox = t([[0.0, math.log(3.0)], [math.log(1.5), math.log(1.5)], [math.log(0.4), float("nan")]])
    mu, mask = torch.zeros(3, 2), t([[1, 1], [1, 1], [1, 0]])
    close(importance_weights(prox, mu, mask, "mis_token", low=0.5, high=2.0), [[1.0, 0.0], [1.5, 1.5], [0.0, 1.0]])
    # mis_sequence: prod r = [3, 2.25, 0.4]; band [0.5, 2.5] keeps row 1 alone, weighted 2.25.
    close(importance_weights(prox, mu, mask, "mis_sequence", low=0.5, high=2.5),
          [[0.0, 0.0], [2.25, 2.25], [0.0, 1.0]])
    # geo_mask: geometric means [sqrt 3 = 1.732, 1.5, 0.4]; band [0.5, 1.6] keeps row 1, whose
    # tokens get min(r, cap 2) = 1.5; with cap 1.2, 1.2.
    close(importance_weights(prox, mu, mask, "geo_mask", low=0.5, high=1.6), [[0.0, 0.0], [1.5, 1.5], [0.0, 1.0]])
    close(importance_weights(prox, mu, mask, "geo_mask", cap=1.2, low=0.5, high=1.6),
          [[0.0, 0.0], [1.2, 1.2], [0.0, 1.0]])
    # A sequence ratio too large for a float (1000 tokens at r = e) is outside any band, not NaN.
    long = importance_weights(torch.ones(1, 1000), torch.zeros(1, 1000), torch.ones(1, 1000), "mis_sequence",
                              low=0.5, high=2.0)
    assert (long == 0).all()
    with pytest.raises(ValueError, match=r"low=1.5, high=2"):
        importance_weights(prox, mu, mask, "mis_token", low=1.5, high=2.0)
    with pytest.raises(ValueError, match=r"mode='icepop'"):
        importance_weights(prox, mu, mask, "icepop")


def test_mismatch_metrics():
    # log r over the 3 unmasked tokens: [0, ln 2, -ln 2] -> mean |log r| = 2 ln 2 / 3 = 0.462098;
    # r - 1 - log r: [0, 1 - ln 2 = 0.306853, -0.5 + ln 2 = 0.193147] -> mean 0.166667.
    # Weights [1, 0 | 1, x]: 1 of 3 tokens dropped, in 1 of the 2 sequences.
    prox = t([[0.0, LN2], [-LN2, float("nan")]])
    mu, mask = torch.zeros(2, 2), torch.tensor([[1, 1], [1, 0]])
    m = mismatch_metrics(prox, mu, mask, t([[1.0, 0.0], [1.0, 0.0]]))
    assert m == pytest.approx({"offpolicy_gap": 0.462098, "mismatch_kl": 1 / 6, "masked_tokens": 1 / 3,
                               "masked_sequences": 0.5}, abs=1e-6)
    assert set(mismatch_metrics(prox, mu, mask)) == {"offpolicy_gap", "mismatch_kl"}


def test_policy_loss_with_importance_weights_scales_each_tokens_gradient():
    # Ratio 1 (one update per batch): per-token loss -w * A, token mean over 4 tokens.
    # A = [1, -1], w = [[2, 0.5], [1, 1.5]] -> loss = (-2 - 0.5 + 1 + 1.5) / 4 = 0
    # d loss / d lp = -w * A / 4 = [[-0.5, -0.125], [0.25, 0.375]]
    lp = t([[-0.5, -1.0], [-2.0, -0.1]]).requires_grad_()
    w = t([[2.0, 0.5], [1.0, 1.5]])
    loss, m = policy_loss(lp, lp.detach(), t([1.0, -1.0]), torch.ones(2, 2), is_weights=w)
    loss.backward()
    close(loss, 0.0)
    close(lp.grad, [[-0.5, -0.125], [0.25, 0.375]])
    assert m["is_weight_mean"] == pytest.approx(1.25)
    _, plain = policy_loss(lp, lp.detach(), t([1.0, -1.0]), torch.ones(2, 2))
    assert "is_weight_mean" not in plain


def test_policy_loss_positive_advantage():
    # A = +1, clip 0.2, ratios [1.5, 1.0, 0.5]:
    #   1.5: min(1.5, 1.2) = 1.2 -> clipped, loss -1.2, gradient 0
    #   1.0: min(1.0, 1.0) = 1.0 -> loss -1.0, gradient -ratio * A / 3 = -1/3
    #   0.5: min(0.5, 0.8) = 0.5 -> NOT clipped (a worse token may still be pushed up),
    #        loss -0.5, gradient -0.5 / 3 = -1/6
    # loss = (-1.2 - 1.0 - 0.5) / 3 = -0.9; clip_fraction 1/3; ratio_mean 1.0
    old = t([[-1.0, -1.0, -1.0]])
    lp = (old + t([[math.log(1.5), 0.0, math.log(0.5)]])).requires_grad_()
    loss, m = policy_loss(lp, old, t([1.0]), torch.ones(1, 3))
    loss.backward()
    close(loss, -0.9)
    close(lp.grad, [[0.0, -1 / 3, -1 / 6]])
    close(m["clip_fraction"], 1 / 3)
    close(m["ratio_mean"], 1.0)
    close(m["pg_loss"], -0.9)


def test_policy_loss_negative_advantage():
    # A = -1, clip 0.2, ratios [0.5, 1.5]:
    #   0.5: min(-0.5, -0.8) = -0.8 -> clipped, loss 0.8, gradient 0
    #   1.5: min(-1.5, -1.2) = -1.5 -> NOT clipped, loss 1.5, gradient -A * ratio / 2 = 0.75
    # loss = (0.8 + 1.5) / 2 = 1.15; clip_fraction 0.5
    old = t([[-2.0, -2.0]])
    lp = (old + t([[math.log(0.5), math.log(1.5)]])).requires_grad_()
    loss, m = policy_loss(lp, old, t([-1.0]), torch.ones(1, 2))
    loss.backward()
    close(loss, 1.15)
    close(lp.grad, [[0.0, 0.75]])
    close(m["clip_fraction"], 0.5)


def test_policy_loss_old_logprobs_and_advantages_are_constants():
    # On-policy step with old = the very same tensor as lp (not detached by the caller):
    # the gradient must still be -A * ratio / T = [-1, -1] / 2 = [-0.5, -0.5];
    # if old carried grad, ratio = exp(lp - lp) would be constant and the gradient 0.
    lp = t([[-1.0, -2.0]]).requires_grad_()
    adv = t([1.0]).requires_grad_()
    loss, _ = policy_loss(lp, lp, adv, torch.ones(1, 2))
    loss.backward()
    close(lp.grad, [[-0.5, -0.5]])
    assert adv.grad is None


def test_policy_loss_asymmetric_clip():
    # seq 0: A = +1, ratio 1.25; seq 1: A = -1, ratio 0.85
    # symmetric 0.2 -> bounds [0.8, 1.2]:
    #   seq 0 clipped: loss -1.2, grad 0;  seq 1 inside: loss 0.85, grad -A*r/2 = 0.425
    #   loss = (-1.2 + 0.85) / 2 = -0.175
    # clip_low 0.1, clip_high 0.3 -> bounds [0.9, 1.3]:
    #   seq 0 inside: loss -1.25, grad -r/2 = -0.625;  seq 1 clipped: loss 0.9, grad 0
    #   loss = (-1.25 + 0.9) / 2 = -0.175 (same value, opposite tokens clipped)
    old = t([[-1.0], [-1.0]])
    delta = t([[math.log(1.25)], [math.log(0.85)]])
    adv, mask = t([1.0, -1.0]), torch.ones(2, 1)

    lp = (old + delta).requires_grad_()
    loss, _ = policy_loss(lp, old, adv, mask)
    loss.backward()
    close(loss, -0.175)
    close(lp.grad, [[0.0], [0.425]])

    lp = (old + delta).requires_grad_()
    loss, _ = policy_loss(lp, old, adv, mask, clip_low=0.1, clip_high=0.3)
    loss.backward()
    close(loss, -0.175)
    close(lp.grad, [[-0.625], [0.0]])


def test_policy_loss_token_vs_sequence_aggregation():
    # ratio 1 everywhere so per-token loss = -A. seq 0 (A=+1): 3 tokens, loss -1 each;
    # seq 1 (A=-1): 1 token, loss +1; seq 2 (A=5): no unmasked token.
    # token:    (-1 - 1 - 1 + 1) / 4 = -0.5;  grads -A/4: seq0 -0.25 each, seq1 +0.25
    # sequence: mean(-1, +1) = 0 (seq 2 excluded, not counted as a 0 in a mean of 3);
    #           grads -A / |o_i| / 2: seq0 -1/6 each, seq1 +0.5
    # padding holds garbage (NaN, +-100) that must not reach loss or gradient.
    nan = float("nan")
    lp_rows = [[-1.0, -2.0, -3.0], [-0.5, 100.0, nan], [nan, -100.0, 0.0]]
    old = t([[-1.0, -2.0, -3.0], [-0.5, -100.0, 0.0], [0.0, nan, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0]])
    adv = t([1.0, -1.0, 5.0])
    expected = {"token": (-0.5, [[-0.25] * 3, [0.25, 0, 0], [0] * 3]),
                "sequence": (0.0, [[-1 / 6] * 3, [0.5, 0, 0], [0] * 3])}
    for aggregation, (want_loss, want_grad) in expected.items():
        lp = t(lp_rows).requires_grad_()
        loss, m = policy_loss(lp, old, adv, mask, aggregation=aggregation)
        loss.backward()
        close(loss, want_loss)
        close(lp.grad, want_grad)
        close(m["ratio_mean"], 1.0)


def test_policy_loss_kl_term():
    # ratio 1, A = 0 -> policy term 0. lp = [0, -1], ref = [ln 2, 0]:
    # k3 = [0.306853, 0.718282] (see test_kl_k3_known_values), mean 0.512567
    # kl_beta 0.5 -> loss 0.256284
    # d k3 / d lp = 1 - e^(ref - lp) = [1 - 2, 1 - e] = [-1, -1.718282]; * 0.5 / 2 tokens
    #   -> [-0.25, -0.429570]
    lp = t([[0.0, -1.0]]).requires_grad_()
    ref = t([[LN2, 0.0]])
    loss, m = policy_loss(lp, lp.detach(), t([0.0]), torch.ones(1, 2),
                          ref_logprobs=ref, kl_beta=0.5)
    loss.backward()
    close(loss, 0.256284)
    close(lp.grad, [[-0.25, -0.429570]])
    close(m["kl"], 0.512567)
    close(m["pg_loss"], 0.0)

    # kl_beta 0: KL reported but not in the loss; without ref no "kl" key at all.
    loss, m = policy_loss(lp, lp.detach(), t([0.0]), torch.ones(1, 2), ref_logprobs=ref)
    close(loss, 0.0)
    close(m["kl"], 0.512567)
    assert "kl" not in policy_loss(lp, lp.detach(), t([0.0]), torch.ones(1, 2))[1]


def test_policy_loss_kl_is_taken_on_the_kl_logprobs_when_given():
    # The ratio uses the truncated (sampled) log-probs, the KL the untruncated ones.
    # ratio: lp == old -> 1, A = 0 -> policy term 0 (its gradient flows to lp only through A = 0).
    # KL on kl_lp = [0, -1] against ref [ln 2, 0]: the numbers of test_policy_loss_kl_term,
    # d loss / d kl_lp = [-0.25, -0.429570]; lp gets none of it.
    lp = t([[-0.2, -0.3]]).requires_grad_()
    kl_lp = t([[0.0, -1.0]]).requires_grad_()
    loss, m = policy_loss(lp, lp.detach(), t([0.0]), torch.ones(1, 2), ref_logprobs=t([[LN2, 0.0]]),
                          kl_beta=0.5, kl_logprobs=kl_lp)
    loss.backward()
    close(loss, 0.256284)
    close(m["kl"], 0.512567)
    close(kl_lp.grad, [[-0.25, -0.429570]])
    close(lp.grad, [[0.0, 0.0]])


def test_policy_loss_kl_estimators_in_the_loss():
    # lp = [0, -1], ref = [ln 2, 0], d = ref - lp = [ln 2, 1], kl_beta 0.5, A = 0, 2 tokens.
    # k1 = -d: loss 0.5 * (-ln 2 - 1) / 2 = -0.423287; d k1 / d lp = 1 -> grad [0.25, 0.25]
    # k2 = d^2/2: loss 0.5 * (0.240227 + 0.5) / 2 = 0.185057; d k2 / d lp = -d -> [-0.173287, -0.25]
    lp0 = t([[0.0, -1.0]])
    for estimator, want, grad in (("k1", -0.423287, [[0.25, 0.25]]), ("k2", 0.185057, [[-0.173287, -0.25]])):
        lp = lp0.clone().requires_grad_()
        loss, m = policy_loss(lp, lp.detach(), t([0.0]), torch.ones(1, 2), ref_logprobs=t([[LN2, 0.0]]),
                              kl_beta=0.5, kl_estimator=estimator)
        loss.backward()
        close(loss, want)
        close(lp.grad, grad)


def test_policy_loss_constant_aggregation_divides_by_sequences_times_max_tokens():
    # Ratio 1, per-token loss -A. seq 0 (A=+1) 3 tokens, seq 1 (A=-1) 1 token, seq 2 empty.
    # Dr. GRPO: sum (-1 -1 -1 +1) = -2 over 2 non-empty sequences x max_tokens 4 -> -0.25;
    # every token's gradient is -A / 8, whatever its answer's length.
    lp = t([[-1.0, -2.0, -3.0], [-0.5, 0.0, 0.0], [0.0, 0.0, 0.0]]).requires_grad_()
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0]])
    loss, m = policy_loss(lp, lp.detach(), t([1.0, -1.0, 5.0]), mask, aggregation="constant", max_tokens=4)
    loss.backward()
    close(loss, -0.25)
    close(m["pg_loss"], -0.25)
    close(lp.grad, [[-0.125] * 3, [0.125, 0, 0], [0] * 3])
    with pytest.raises(ValueError, match="max_tokens"):
        policy_loss(lp, lp.detach(), t([1.0, -1.0, 5.0]), mask, aggregation="constant")


def test_gspo_clips_the_sequences_length_normalised_ratio():
    # Seq 0: log-ratios [ln 1.5, 0] -> s = exp(ln 1.5 / 2) = sqrt 1.5 = 1.224745; A = +1,
    # clip 0.2: min(1.224745, 1.2) = 1.2 -> clipped, no gradient for either token.
    # Seq 1: log-ratios [ln 1.1, ln 0.9] -> s = sqrt(0.99) = 0.994987; A = -1: min(-s, -0.994987)
    # is not clipped; d(-s * A)/d lp_t = s * (1/2) per token (the mean of its tokens' log-ratios).
    # sequence aggregation: loss = mean(-1.2, +0.994987) = -0.102506;
    # grad seq 1 = 0.994987 / 2 / 2 sequences = 0.248747 per token.
    old = t([[-1.0, -1.0], [-2.0, -2.0]])
    lp = (old + t([[math.log(1.5), 0.0], [math.log(1.1), math.log(0.9)]])).requires_grad_()
    loss, m = policy_loss(lp, old, t([1.0, -1.0]), torch.ones(2, 2), loss="gspo", aggregation="sequence")
    loss.backward()
    close(loss, -0.102506)
    close(lp.grad, [[0.0, 0.0], [0.248747, 0.248747]])
    close(m["clip_fraction"], 0.5)  # both tokens of seq 0
    close(m["ratio_mean"], (1.224745 + 0.994987) / 2)


def test_cispo_clips_the_weight_and_keeps_every_tokens_gradient():
    # A = +1 on one sequence, ratios [1.5, 1.0, 0.5], clip [0.8, 1.2]: weights [1.2, 1, 0.8],
    # detached. loss = -sum(w * A * lp) / 3 with lp = log(ratio) + old (old = -1):
    # lp = [-0.594535, -1, -1.693147] -> loss = -(-0.713442 - 1 - 1.354518) / 3 = 1.022653.
    # Gradient -w * A / 3 = [-0.4, -1/3, -0.266667]: the clipped token still learns (GRPO: 0).
    old = t([[-1.0, -1.0, -1.0]])
    lp = (old + t([[math.log(1.5), 0.0, math.log(0.5)]])).requires_grad_()
    loss, m = policy_loss(lp, old, t([1.0]), torch.ones(1, 3), loss="cispo")
    loss.backward()
    close(loss, 1.022653)
    close(lp.grad, [[-0.4, -1 / 3, -0.8 / 3]])
    close(m["clip_fraction"], 2 / 3)


def test_dual_clip_bounds_a_negative_advantages_loss():
    # A = -1, ratios [4, 1.1]; clip 0.2, dual clip 3. Token 0: min(-4, -1.2) = -4 < 3 * A = -3
    # -> bounded at -3, loss 3, no gradient. Token 1: min(-1.1, -1.1) = -1.1 (> -3): loss 1.1,
    # gradient ratio * -A / 2 = 0.55. loss = (3 + 1.1) / 2 = 2.05. Without dual clip: (4 + 1.1) / 2.
    old = t([[-2.0, -2.0]])
    lp = (old + t([[math.log(4.0), math.log(1.1)]])).requires_grad_()
    loss, _ = policy_loss(lp, old, t([-1.0]), torch.ones(1, 2), dual_clip=3.0)
    loss.backward()
    close(loss, 2.05)
    close(lp.grad, [[0.0, 0.55]])
    close(policy_loss(lp, old, t([-1.0]), torch.ones(1, 2))[0], 2.55)
    # A positive advantage is untouched: ratio 4, A = +1 -> min(4, 1.2) = 1.2, loss -1.2 either way.
    close(policy_loss(lp[:, :1], old[:, :1], t([1.0]), torch.ones(1, 1), dual_clip=3.0)[0], -1.2)


def test_entropy_bonus_subtracts_its_coefficient_times_the_entropy():
    # Ratio 1, A = 0: the loss is -0.1 * mean(H) = -0.1 * (1 + 3) / 2 = -0.2, and the entropy's
    # gradient is -0.1 / 2 per token; H at the masked position (9) is left out.
    lp = t([[-1.0, -1.0]]).requires_grad_()
    ent = t([[1.0, 3.0, 9.0]])[:, :2].clone().requires_grad_()
    loss, m = policy_loss(lp, lp.detach(), t([0.0]), torch.ones(1, 2), entropy=ent, entropy_coef=0.1)
    loss.backward()
    close(loss, -0.2)
    close(ent.grad, [[-0.05, -0.05]])
    close(m["entropy"], 2.0)


def test_groups_with_signal_are_those_whose_rewards_differ():
    # groups of 3: [1, 0, 1] differ; [0.5, 0.5, 0.5] do not; [0, 0, 1e-9] differ (any difference)
    got = groups_with_signal(t([1, 0, 1, 0.5, 0.5, 0.5, 0, 0, 1e-9]), 3)
    assert got.tolist() == [True, False, True]
    assert groups_with_signal(t([1.0, 2.0]), 1).tolist() == [False, False]  # one answer: no group
    # The advantages agree: exactly 0 in the groups without signal, not elsewhere.
    adv = group_advantages(t([1, 0, 1, 0.5, 0.5, 0.5, 0, 0, 1e-9]), 3).view(3, 3)
    assert (adv != 0).any(dim=1).tolist() == [True, False, True]


def test_policy_loss_metrics_are_floats_and_entropy_is_masked():
    # entropy masked mean over tokens (0, 0), (0, 1), (1, 0): (1 + 2 + 3) / 3 = 2; 9 is padding
    lp = t([[-1.0, -1.0], [-1.0, -1.0]]).requires_grad_()
    ent = t([[1.0, 2.0], [3.0, 9.0]])
    mask = torch.tensor([[1, 1], [1, 0]])
    loss, m = policy_loss(lp, lp.detach(), t([1.0, 1.0]), mask, entropy=ent)
    assert loss.requires_grad and loss.dim() == 0
    assert all(type(v) is float for v in m.values())
    assert set(m) == {"pg_loss", "clip_fraction", "ratio_mean", "entropy"}
    close(m["entropy"], 2.0)


def test_policy_loss_errors():
    lp, adv, mask = torch.zeros(2, 3), torch.zeros(2), torch.ones(2, 3)
    with pytest.raises(ValueError, match=r"'mean'.*token.*sequence.*constant"):
        policy_loss(lp, lp, adv, mask, aggregation="mean")
    with pytest.raises(ValueError, match=r"loss='ppo'"):
        policy_loss(lp, lp, adv, mask, loss="ppo")
    with pytest.raises(ValueError, match=r"dual_clip=3.0.*cispo"):
        policy_loss(lp, lp, adv, mask, loss="cispo", dual_clip=3.0)
    with pytest.raises(ValueError, match=r"dual_clip=0.5"):
        policy_loss(lp, lp, adv, mask, dual_clip=0.5)
    with pytest.raises(ValueError, match=r"entropy_coef=0.1"):
        policy_loss(lp, lp, adv, mask, entropy_coef=0.1)
    with pytest.raises(ValueError, match=r"kl_beta=0.1.*ref_logprobs"):
        policy_loss(lp, lp, adv, mask, kl_beta=0.1)
    with pytest.raises(ValueError, match=r"advantages"):
        policy_loss(lp, lp, adv[:, None], mask)  # [N, 1] would broadcast to [N, N, T]
    with pytest.raises(ValueError, match=r"mask shape"):
        policy_loss(lp, lp, adv, mask[:, :2])
    with pytest.raises(ValueError, match=r"clip_high=-0.1"):
        policy_loss(lp, lp, adv, mask, clip_high=-0.1)


# ---------------------------------------------------------------- slow loop reference


def loop_group_advantages(rewards: list[float], G: int, normalize_std: bool, eps: float):
    out = []
    for start in range(0, len(rewards), G):
        group = rewards[start:start + G]
        if all(r == group[0] for r in group):
            out += [0.0] * G
            continue
        mean = sum(group) / G
        std = math.sqrt(sum((r - mean) ** 2 for r in group) / (G - 1))
        out += [(r - mean) / (std + eps) if normalize_std else r - mean for r in group]
    return out


def loop_policy_loss(lp, old, adv, mask, clip_low, clip_high, ref, kl_beta, aggregation, loss="grpo",
                     dual_clip=0.0, kl_estimator="k3", max_tokens=None, ent=None, entropy_coef=0.0):
    """One token at a time; lp (and ent) are leaf tensors so autograd gives the reference gradient."""
    seq_losses, all_tokens, n_clipped, ratio_sum, kl_sum, n_seq = [], [], 0, 0.0, 0.0, 0
    for i in range(lp.shape[0]):
        tokens = [j for j in range(lp.shape[1]) if mask[i][j]]
        if loss == "gspo" and tokens:  # one ratio per sequence: exp of its mean log-ratio
            seq_ratio = torch.exp(sum(lp[i, j] - old[i][j] for j in tokens) / len(tokens))
        token_losses = []
        for j in tokens:
            ratio = seq_ratio if loss == "gspo" else torch.exp(lp[i, j] - old[i][j])
            clipped_ratio = max(1 - clip_low, min(1 + clip_high, ratio))  # float when clipped
            if loss == "cispo":
                token_loss = -torch.as_tensor(clipped_ratio).item() * adv[i] * lp[i, j]  # detached
                n_clipped += float(clipped_ratio != ratio)
            else:
                surrogate = min(ratio * adv[i], clipped_ratio * adv[i])
                n_clipped += float(clipped_ratio * adv[i] < ratio * adv[i])
                if dual_clip and adv[i] < 0:
                    surrogate = max(surrogate, dual_clip * adv[i])
                token_loss = -surrogate
            ratio_sum += float(ratio.detach())
            if ref is not None:
                d = ref[i][j] - lp[i, j]
                kl = {"k1": -d, "k2": d * d / 2, "k3": torch.exp(d) - d - 1}[kl_estimator]
                kl_sum += float(kl.detach())
                token_loss = token_loss + kl_beta * kl
            if entropy_coef:
                token_loss = token_loss - entropy_coef * ent[i, j]
            token_losses.append(token_loss)
        all_tokens += token_losses
        if token_losses:
            n_seq += 1
            seq_losses.append(sum(token_losses) / len(token_losses))
    if aggregation == "token":
        total = sum(all_tokens) / len(all_tokens)
    elif aggregation == "constant":
        total = sum(all_tokens) / (n_seq * max_tokens)
    else:
        total = sum(seq_losses) / len(seq_losses)
    n = len(all_tokens)
    metrics = {"clip_fraction": n_clipped / n, "ratio_mean": ratio_sum / n, "kl": kl_sum / n}
    return total, metrics


def random_batch(seed: int, N: int = 6, T: int = 5):
    g = torch.Generator().manual_seed(seed)
    lp = -torch.rand(N, T, generator=g, dtype=torch.float64) * 3
    old = lp + 0.3 * torch.randn(N, T, generator=g, dtype=torch.float64)  # ratios ~0.5..2
    ref = lp + 0.5 * torch.randn(N, T, generator=g, dtype=torch.float64)
    adv = torch.randn(N, generator=g, dtype=torch.float64)
    mask = torch.rand(N, T, generator=g) < 0.7
    mask[1] = False  # an all-masked row
    mask[0] = True  # and at least one full row
    return lp, old, ref, adv, mask


@pytest.mark.parametrize("seed", range(4))
def test_group_advantages_matches_loop(seed):
    g = torch.Generator().manual_seed(seed)
    G = 4
    rewards = torch.randint(0, 3, (5 * G,), generator=g).double()  # ties and equal groups
    rewards[:G] += torch.rand(G, generator=g, dtype=torch.float64)  # one continuous group
    rewards[G:2 * G] = 1.0  # one all-equal group for sure
    for normalize_std in (True, False):
        want = loop_group_advantages(rewards.tolist(), G, normalize_std, 1e-6)
        close(group_advantages(rewards, G, normalize_std=normalize_std), want, atol=1e-9)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("aggregation", ["token", "sequence"])
@pytest.mark.parametrize("kl_beta", [0.0, 0.1])
def test_policy_loss_matches_loop(seed, aggregation, kl_beta):
    check_against_loop(seed, dict(aggregation=aggregation, kl_beta=kl_beta))
    lp0, old, ref, adv, mask = random_batch(seed)
    loss, m = policy_loss(lp0, old, adv, mask, clip_low=0.2, clip_high=0.28)
    assert 0.0 < m["clip_fraction"] < 0.5  # the batch really exercises both branches


VARIANTS = {
    "gspo": dict(loss="gspo", aggregation="sequence", clip_low=0.02, clip_high=0.03),  # sequence ratios near 1
    "cispo": dict(loss="cispo", clip_low=1.0, clip_high=0.28),
    "dual_clip": dict(dual_clip=1.5, kl_beta=0.1, kl_estimator="k2"),
    "dr_grpo": dict(aggregation="constant", max_tokens=7, kl_beta=0.1, kl_estimator="k1"),
    "entropy": dict(entropy_coef=0.01, aggregation="sequence"),
}


@pytest.mark.parametrize("seed", [0, 1, 3])  # seed 2 has no GSPO sequence the clip acts on
@pytest.mark.parametrize("variant", VARIANTS)
def test_every_loss_variant_matches_loop(seed, variant):
    check_against_loop(seed, VARIANTS[variant])


def check_against_loop(seed: int, options: dict) -> None:
    """policy_loss against loop_policy_loss on a random batch: loss, gradients (of the
    log-probs and, with an entropy bonus, of the entropy) and metrics."""
    lp0, old, ref, adv, mask = random_batch(seed)
    g = torch.Generator().manual_seed(seed + 100)
    ent0 = torch.rand(lp0.shape, generator=g, dtype=torch.float64) * 2
    options = {"clip_low": 0.2, "clip_high": 0.28, "kl_beta": 0.0, "aggregation": "token", **options}

    lp, ent = lp0.clone().requires_grad_(), ent0.clone().requires_grad_()
    loss, m = policy_loss(lp, old, adv, mask, ref_logprobs=ref, entropy=ent, **options)
    loss.backward()

    lp_ref, ent_ref = lp0.clone().requires_grad_(), ent0.clone().requires_grad_()
    want, want_m = loop_policy_loss(lp_ref, old.tolist(), adv.tolist(), mask.tolist(), ref=ref.tolist(),
                                    ent=ent_ref, **options)
    want.backward()

    close(loss, want.detach())
    close(lp.grad, lp_ref.grad)
    no_grad = torch.zeros_like(ent0)  # no entropy bonus: the entropy gets no gradient
    close(no_grad if ent.grad is None else ent.grad, no_grad if ent_ref.grad is None else ent_ref.grad)
    for key in ("clip_fraction", "ratio_mean", "kl"):
        close(m[key], want_m[key])
    assert (lp.grad[~mask] == 0).all()
    assert m["clip_fraction"] > 0  # the clip acts somewhere in the batch
