"""GRPO math as pure tensor functions: group advantages, the policy losses (GRPO, GSPO, CISPO),
the KL estimators, the rollout-training mismatch corrections.

Nothing here knows about Ray, DeepSpeed or vLLM; the learner calls these on tensors it already
holds, and tests/test_grpo.py checks each one against hand arithmetic and a slow loop reference.

Dimension letters used in the shape comments (fixed for the whole project):
    B prompts, G answers per prompt, N = B*G sequences, T tokens (padded response length).

The objective is GRPO from DeepSeekMath (Shao et al. 2024, arXiv:2402.03300, eq. 3), as used
for DeepSeek-R1. Where this module departs from that formula, and why:

1. Loss averaging. The paper averages each answer over its own tokens (1/|o_i|) and then
   over the G answers. The default here, aggregation="token", averages over all unmasked
   tokens of the batch, so every token weighs the same whatever its answer's length; with
   1/|o_i| a token of a long wrong answer is penalised less than one of a short wrong answer
   (DAPO, arXiv:2503.14476 sec. 3.3; Dr. GRPO, arXiv:2503.20783). aggregation="sequence"
   is the paper's form. aggregation="constant" is Dr. GRPO's (arXiv:2503.20783 sec. 3.1):
   the sum over all tokens divided by a constant, max_tokens per sequence (the rollout's
   max_new_tokens), so neither an answer's length nor the batch's token count scales its
   tokens' gradient. All three average over the tensors passed in, i.e. one micro-batch;
   with gradient accumulation the caller decides how micro-batches are weighted (by tokens,
   or by sequences for "sequence" and "constant").
2. Std normalisation. A_i = (r_i - mean_g) / (std_g + eps) as in the paper, with the
   unbiased sample std (divide by G-1, torch's default, as in TRL) and eps added to the std,
   not the variance. normalize_std=False gives r_i - mean_g (Dr. GRPO: dividing by std
   up-weights prompts that are nearly always solved or nearly never). A group whose rewards
   are all equal gets exactly 0: (r - mean) is not exactly 0 in floating point and dividing
   that rounding error by eps would turn it into a spurious advantage. G == 1 gives all 0.
3. Where the KL applies. As in the paper (and unlike InstructGPT-style PPO) the KL to the
   reference model is by default a loss term, not a reward penalty: kl_beta * k per token,
   added to the per-token policy loss before aggregation, so it is averaged like it. The
   estimator k of KL(pi || pi_ref) from a token sampled by pi (Schulman, "Approximating KL
   divergence", 2020), with d = ref - lp = log(pi_ref / pi):
     k1 = -d              unbiased, negative on some tokens; in the loss its gradient is
                          grad(lp), whose expectation under pi is 0: it does not regularise.
     k2 = d^2 / 2         biased, >= 0; in the loss its gradient is -d grad(lp), the true
                          gradient of KL(pi || pi_ref) on samples of pi.
     k3 = exp(d) - d - 1  unbiased and >= 0 (the paper's); its gradient in the loss is that of
                          KL(pi_ref || pi), not of KL(pi || pi_ref).
   kl_beta defaults to 0 (off, as in DAPO) where the paper used 0.04; the "kl" metric is
   reported whenever ref_logprobs is given, even at kl_beta == 0. The alternative,
   InstructGPT's, folds the KL into the reward (`sequence_kl`, algorithm.kl_in=reward): each
   answer's reward loses kl_beta * sum_t k(mu, pi_ref) over the tokens the sampler mu chose,
   before the group advantages, and the loss has no KL term.
4. Clip-higher. The paper clips the ratio to [1-eps, 1+eps]; here the two sides are
   clip_low and clip_high (DAPO uses 0.2 / 0.28) so unlikely tokens of good answers can
   gain probability faster, which slows entropy collapse. Defaults (0.2, 0.2) are the paper.
5. Old log-probs. pi_old is chosen by the caller (learner/learner.py). With one gradient step
   per batch (the paper's single update per exploration stage) it is the current policy,
   detached: the ratio is exactly 1, the clip never acts and the gradient is the plain
   policy gradient -A * grad(log pi). With several optimizer steps per batch it is the
   engine's sampling log-probs (the behaviour policy; in fp32 they match the learner's to
   ~1e-7, which the learner reports every step as learner/offpolicy_gap), or, when
   configured, the learner's own recompute before the first step, for engines whose
   numerics differ more.

6. Stale samples. With algorithm.max_staleness = 1 a batch may have been sampled by the
   policy one optimizer step behind the learner (the behaviour policy mu, whose log-probs
   the engine reports). The ratio stays pi / pi_old with pi_old the learner's current
   (proximal) policy, and each token's loss is weighted by w = min(pi_old / mu, is_cap),
   detached: truncated importance sampling, as in decoupled PPO (Hilton et al. 2021,
   arXiv:2110.00641) and IMPALA's truncated weights (Espeholt et al. 2018). With one
   update per batch this is the plain policy gradient reweighted to the current policy.
   w also absorbs the engine's numeric differences; the cap bounds the variance.
7. Top-k / top-p. The engines sample from the truncated distribution and report its
   log-probs; the learner computes the same truncation (`Sampling.logprobs`), so the ratio,
   the importance weights and the entropy are those of the distribution actually sampled
   from. The KL compares the policy and the reference at the temperature without the cuts:
   it regularises the model, and a sampled token outside the reference's nucleus would
   otherwise cost an infinite penalty.
8. Groups without signal. A group whose G rewards are all equal has advantage 0 for every
   answer and teaches nothing; the driver leaves such groups out of the learner's batch
   (`groups_with_signal`), so they neither dilute the loss's normaliser nor receive the KL
   term, and a step with no such group takes no optimizer step (Adam's momentum would
   still move the weights). DAPO's dynamic sampling (arXiv:2503.14476 sec. 3.2,
   `algorithm.dynamic_sampling`) goes further and samples more prompts to refill the batch.
9. Other losses (`loss`). "gspo" (Qwen's GSPO, arXiv:2507.18071 eq. 5-7): the ratio is the
   sequence's, s_i = exp(mean_t (lp - old)) (length-normalised), clipped and min-ed like
   the token ratio and shared by the sequence's tokens; averaged per sequence (aggregation
   "sequence") this is the paper's objective, value and gradient. The paper clips s_i at
   [1 - 3e-4, 1 + 4e-4]. "cispo" (MiniMax-M1, arXiv:2506.13585 eq. 4): the token's
   importance weight is clipped, not its update, and the gradient is REINFORCE's for every
   token: loss -sg(clip(ratio, 1 - clip_low, 1 + clip_high)) * A * lp; a token whose ratio
   left the range still moves. MiniMax sets no lower bound (clip_low = 1: weight >= 0)
   and tunes the upper one.
   Dual clip (`dual_clip` = c > 1; Ye et al. 2020, arXiv:1912.09729): for A < 0 the clipped
   term is bounded, -min(ratio * A, clip(ratio) * A) <= -c * A, so a token the policy has
   made far likelier than the sampler did cannot dominate the batch.
10. Entropy bonus (`entropy_coef`): -entropy_coef * H per token, added before aggregation,
   with the entropy H of the sampling distribution computed with its gradient.
11. Rollout-training mismatch (`importance_weights`, `mismatch_metrics`). The engines'
   log-probs mu and the learner's pi_old differ (bf16 kernels, top-p, quantisation, a lag):
   the modes correct each token's policy term by a detached weight of r = pi_old / mu:
     tis           min(r, cap): truncated IS (point 6; Yao et al. 2025, "Your efficient RL
                   framework secretly brings you off-policy RL training").
     mis_token     r where low <= r <= high, else 0: the token is dropped (masked IS;
                   IcePop, in Ring-1T's report).
     mis_sequence  the sequence's ratio prod_t r where it is in [low, high], else 0, for
                   all its tokens: whole sequences are dropped.
     geo_mask      min(r, cap) for the tokens of sequences whose geometric-mean ratio
                   exp(mean_t log r) is in [low, high]; 0 for those of the others.
   The learner's pi_old is its own log-probs before the step (free with one update per
   step, one more forward pass otherwise): the behaviour policy the weights correct for is
   always the sampler's.

Padding: mask is 1 on response tokens to train on and 0 elsewhere. Masked positions of the
log-prob tensors may hold anything (0, -inf, NaN); they are zeroed before any exp so they
cannot reach the loss, the metrics or the gradient.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

LOSSES = ("grpo", "gspo", "cispo")
AGGREGATIONS = ("token", "sequence", "constant")
KL_ESTIMATORS = ("k1", "k2", "k3")
MISMATCH = ("none", "tis", "mis_token", "mis_sequence", "geo_mask")


def group_advantages(
    rewards: Tensor, group_size: int, normalize_std: bool = True, eps: float = 1e-6
) -> Tensor:
    """A_i = (r_i - mean_g) / (std_g + eps) over each contiguous group of G answers.

    rewards: [N], rows g*G .. g*G+G-1 are the answers to prompt g. std is the unbiased sample
    std. Groups whose rewards are all equal, and every group when G == 1, get exactly 0.
    Returns [N] in the rewards' floating dtype (float32 for integer rewards).
    """
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [N], got shape {tuple(rewards.shape)}")
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got group_size={group_size}")
    n = rewards.shape[0]
    if n % group_size != 0:
        raise ValueError(f"N={n} rewards is not a multiple of group_size={group_size}")
    if not rewards.is_floating_point():
        rewards = rewards.float()
    if group_size == 1:
        return torch.zeros_like(rewards)  # one answer has no group to be compared with

    r = rewards.view(-1, group_size)  # [B, G]
    adv = r - r.mean(dim=1, keepdim=True)  # [B, G]
    if normalize_std:
        adv = adv / (r.std(dim=1, keepdim=True) + eps)  # [B, G] unbiased std, as TRL
    all_equal = ~groups_with_signal(rewards, group_size)[:, None]  # [B, 1]
    adv = adv.masked_fill(all_equal, 0.0)  # [B, G] exact 0, not rounding error / eps
    return adv.reshape(-1)  # [N]


def groups_with_signal(rewards: Tensor, group_size: int) -> Tensor:
    """[B] bool: whether group g's rewards differ (its advantages are not all 0; point 8).

    rewards: [N], rows g*G .. g*G+G-1 are the answers to prompt g.
    """
    r = rewards.view(-1, group_size)  # [B, G]
    return (r != r[:, :1]).any(dim=1)  # [B]


def kl_estimate(logprobs: Tensor, ref_logprobs: Tensor, estimator: str = "k3") -> Tensor:
    """Per-token estimate of KL(pi || pi_ref) from tokens sampled by pi (point 3): k1 = -d,
    k2 = d^2 / 2, k3 = exp(d) - d - 1, with d = ref - lp.

    logprobs, ref_logprobs: [N, T] log-probs of the sampled tokens. Returns [N, T].
    """
    d = ref_logprobs - logprobs  # [N, T] log(pi_ref / pi)
    if estimator == "k1":
        return -d  # [N, T]
    if estimator == "k2":
        return 0.5 * d * d  # [N, T]
    if estimator == "k3":
        return torch.exp(d) - d - 1.0  # [N, T]
    raise ValueError(f"estimator={estimator!r} is not one of {KL_ESTIMATORS}")


def sequence_kl(logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor, estimator: str = "k3") -> Tensor:
    """[N]: each answer's KL estimate, summed over its unmasked tokens, for the penalty folded
    into the reward (point 3): reward_i - kl_beta * sequence_kl_i.

    logprobs: [N, T] of the policy that sampled the answers; ref_logprobs, mask: [N, T].
    """
    keep = mask.to(torch.bool)
    kl = kl_estimate(logprobs.masked_fill(~keep, 0.0), ref_logprobs.masked_fill(~keep, 0.0), estimator)  # [N, T]
    return torch.where(keep, kl, 0.0).sum(dim=-1)  # [N]


def importance_weights(prox_logprobs: Tensor, behaviour_logprobs: Tensor, mask: Tensor, mode: str = "tis",
                       cap: float = 2.0, low: float = 0.5, high: float = 2.0) -> Tensor:
    """Detached per-token weights of r = pi_prox / mu that correct for the rollout-training
    mismatch (points 6 and 11): `mode` tis, mis_token, mis_sequence or geo_mask; `cap`
    truncates (tis, geo_mask), [low, high] is the band outside which tokens or sequences are
    dropped (weight 0).

    prox_logprobs, behaviour_logprobs, mask: [N, T]. Masked positions get 1 (they carry no
    loss anyway, and may hold anything). Returns [N, T].
    """
    if cap < 1.0:
        raise ValueError(f"cap must be >= 1, got cap={cap}")
    if not 0.0 <= low <= 1.0 <= high:
        raise ValueError(f"need 0 <= low <= 1 <= high, got low={low}, high={high}")
    keep = mask.to(torch.bool)  # [N, T]
    log_r = (prox_logprobs.detach() - behaviour_logprobs.detach()).masked_fill(~keep, 0.0)  # [N, T]
    r = torch.exp(log_r)  # [N, T]
    if mode == "tis":
        w = r.clamp(max=cap)  # [N, T]
    elif mode == "mis_token":
        w = torch.where((r >= low) & (r <= high), r, 0.0)  # [N, T]
    elif mode == "mis_sequence":
        log_rho = log_r.sum(dim=-1, keepdim=True)  # [N, 1] log prod_t r; exp may overflow: compared in logs
        inside = (log_rho >= _log(low)) & (log_rho <= _log(high))  # [N, 1]
        w = torch.where(inside, torch.exp(log_rho), 0.0).expand_as(r)  # [N, T]
    elif mode == "geo_mask":
        log_geo = masked_mean(log_r, keep, dim=-1).unsqueeze(-1)  # [N, 1] log of the geometric mean
        inside = (log_geo >= _log(low)) & (log_geo <= _log(high))  # [N, 1]
        w = torch.where(inside, r.clamp(max=cap), 0.0)  # [N, T]
    else:
        raise ValueError(f"mode={mode!r} is not one of {MISMATCH[1:]}")
    return w.masked_fill(~keep, 1.0)  # [N, T]


def _log(x: float) -> float:
    return float("-inf") if x == 0 else math.log(x)


@torch.no_grad()
def mismatch_metrics(prox_logprobs: Tensor, behaviour_logprobs: Tensor, mask: Tensor,
                     weights: Tensor | None = None) -> dict[str, float]:
    """How far the sampler mu is from the learner's pi_prox on these tokens (point 11):
    offpolicy_gap (mean |log r|), mismatch_kl (the k3 estimate of KL(mu || pi_prox) from mu's
    samples: mean of r - 1 - log r) and, given the `weights` the loss used, masked_tokens (share
    of tokens weighted 0) and masked_sequences (share of non-empty sequences with such a token).
    """
    keep = mask.to(torch.bool)  # [N, T]
    log_r = (prox_logprobs - behaviour_logprobs).masked_fill(~keep, 0.0)  # [N, T]
    out = {"offpolicy_gap": masked_mean(log_r.abs(), keep).item(),
           "mismatch_kl": masked_mean(torch.exp(log_r) - 1.0 - log_r, keep).item()}
    if weights is not None:
        dropped = keep & (weights == 0)  # [N, T]
        out["masked_tokens"] = masked_mean(dropped.double(), keep).item()
        out["masked_sequences"] = masked_mean(dropped.any(dim=-1).double(), keep.any(dim=-1)).item()
    return out


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of x over positions where mask is nonzero; 0 (not NaN) where mask is all 0.

    mask must broadcast to x's shape. dim=None reduces everything to a scalar. Values at
    masked positions never reach the result, even NaN or inf.
    """
    keep = mask.to(torch.bool).expand_as(x)
    total = torch.where(keep, x, 0.0).sum(dim=dim)  # where, not x * mask: NaN * 0 is NaN
    count = keep.sum(dim=dim)
    return total / count.clamp(min=1)


def token_entropy(logits: Tensor) -> Tensor:
    """Entropy of softmax(logits) at every position: [N, T, V] -> [N, T].

    log_softmax goes through logsumexp, so large logits do not overflow; -inf logits (banned
    tokens) contribute 0 instead of 0 * -inf = NaN. Computed in the logits' dtype.
    """
    return entropy_of_logprobs(torch.log_softmax(logits, dim=-1))  # [N, T]


def entropy_of_logprobs(logp: Tensor) -> Tensor:
    """`token_entropy` from log-probs the caller already has: [N, T, V] -> [N, T]."""
    p_logp = logp.exp() * logp.masked_fill(torch.isneginf(logp), 0.0)  # [N, T, V]
    return -p_logp.sum(dim=-1)  # [N, T]


def policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    loss: str = "grpo",
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: float = 0.0,
    ref_logprobs: Tensor | None = None,
    kl_beta: float = 0.0,
    kl_estimator: str = "k3",
    aggregation: str = "token",
    max_tokens: int | None = None,
    entropy: Tensor | None = None,
    entropy_coef: float = 0.0,
    is_weights: Tensor | None = None,
    kl_logprobs: Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """The policy loss, per token before aggregation:
        w * pg + kl_beta * k(lp, ref) - entropy_coef * H,
    with pg = -min(ratio * A, clip(ratio, 1-clip_low, 1+clip_high) * A) for "grpo" (the ratio
    the token's) and "gspo" (the ratio the sequence's, point 9), -sg(clip(ratio)) * A * lp for
    "cispo"; w the `is_weights` (1 when None).

    logprobs (with grad), old_logprobs, mask, ref_logprobs, entropy: [N, T]; advantages: [N],
    one per sequence, shared by its tokens. old/ref log-probs and advantages are constants;
    entropy carries its gradient where entropy_coef > 0. aggregation "token" averages over all
    unmasked tokens, "sequence" over each sequence's unmasked tokens and then over sequences
    that have any, "constant" sums over tokens and divides by max_tokens per such sequence
    (point 1). dual_clip > 1 bounds the clipped term for A < 0 (point 9).
    Returns (scalar loss, metrics). Metrics are floats: pg_loss, clip_fraction (share of
    unmasked tokens where the clip acted: the clipped term won the min, or cispo's weight was
    clipped), ratio_mean, and "kl" / "entropy" only when ref_logprobs / entropy are given (a
    missing key is not a measured 0). is_weights [N, T] (from `importance_weights`) weight each
    token's policy term (points 6, 11); adds the metric is_weight_mean. kl_logprobs [N, T] (with
    grad): the policy's log-probs in the distribution the reference's are taken in, where it is
    not the sampling one (top-k / top-p cut the sampled distribution, not the models; point 7).
    """
    _check_loss_args(logprobs, old_logprobs, advantages, mask, loss, clip_low, clip_high, dual_clip,
                     ref_logprobs, kl_beta, kl_estimator, aggregation, max_tokens, entropy, entropy_coef,
                     is_weights, kl_logprobs)
    keep = mask.to(torch.bool)  # [N, T]
    lp = logprobs.masked_fill(~keep, 0.0)  # [N, T] padding may be NaN/-inf: keep exp finite
    old = old_logprobs.detach().masked_fill(~keep, 0.0)  # [N, T]
    adv = advantages.detach().unsqueeze(-1)  # [N, 1] broadcast over tokens

    if loss == "gspo":  # the sequence's length-normalised ratio, shared by its tokens (point 9)
        ratio = torch.exp(masked_mean(lp - old, keep, dim=-1)).unsqueeze(-1).expand_as(lp)  # [N, T]
    else:
        ratio = torch.exp(lp - old)  # [N, T] pi / pi_old
    bounded = torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)  # [N, T]
    if loss == "cispo":  # clip the weight, not the update: every token keeps its gradient
        unclipped = clipped = None
        pg = -bounded.detach() * adv * lp  # [N, T]
        clip_acted = bounded != ratio  # [N, T]
    else:
        unclipped, clipped = ratio * adv, bounded * adv  # [N, T] each
        surrogate = torch.minimum(unclipped, clipped)  # [N, T] pessimistic bound, PPO eq. 7
        if dual_clip > 0:
            surrogate = torch.where(adv < 0, torch.maximum(surrogate, dual_clip * adv), surrogate)  # [N, T]
        pg = -surrogate  # [N, T]
        clip_acted = clipped < unclipped  # [N, T] min chose the clipped term
    if is_weights is not None:
        pg = pg * is_weights.detach()  # [N, T] reweighted to the learner's policy (points 6, 11)

    kl = None
    if ref_logprobs is not None:
        ref = ref_logprobs.detach().masked_fill(~keep, 0.0)  # [N, T]
        kl_lp = lp if kl_logprobs is None else kl_logprobs.masked_fill(~keep, 0.0)  # [N, T]
        kl = kl_estimate(kl_lp if kl_beta > 0 else kl_lp.detach(), ref, kl_estimator)  # [N, T]
    per_token = pg  # [N, T]
    if kl_beta > 0:
        per_token = per_token + kl_beta * kl  # [N, T] KL in the loss, not the reward (point 3)
    if entropy_coef > 0:
        per_token = per_token - entropy_coef * entropy.masked_fill(~keep, 0.0)  # [N, T] (point 10)
    loss_value = _aggregate(per_token, keep, aggregation, max_tokens)  # []

    with torch.no_grad():
        metrics = {"pg_loss": _aggregate(pg, keep, aggregation, max_tokens).item(),
                   "clip_fraction": masked_mean(clip_acted.double(), keep).item(),
                   "ratio_mean": masked_mean(ratio, keep).item()}
        if kl is not None:
            metrics["kl"] = masked_mean(kl, keep).item()
        if entropy is not None:
            metrics["entropy"] = masked_mean(entropy, keep).item()
        if is_weights is not None:
            metrics["is_weight_mean"] = masked_mean(is_weights, keep).item()
    return loss_value, metrics


def _aggregate(per_token: Tensor, keep: Tensor, aggregation: str, max_tokens: int | None = None) -> Tensor:
    """Reduce a [N, T] per-token loss to a scalar (module docstring, point 1)."""
    if aggregation == "token":
        return masked_mean(per_token, keep)  # [] sum over tokens / number of tokens
    has_tokens = keep.any(dim=-1)  # [N] an empty sequence has no mean to average
    if aggregation == "constant":
        total = torch.where(keep, per_token, 0.0).sum()  # [] sum over every token
        return total / (has_tokens.sum().clamp(min=1) * max_tokens)  # [] Dr. GRPO's constant normaliser
    per_seq = masked_mean(per_token, keep, dim=-1)  # [N] 1/|o_i| sum_t
    return masked_mean(per_seq, has_tokens)  # [] 1/G sum_i over non-empty sequences


def _check_loss_args(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    loss: str,
    clip_low: float,
    clip_high: float,
    dual_clip: float,
    ref_logprobs: Tensor | None,
    kl_beta: float,
    kl_estimator: str,
    aggregation: str,
    max_tokens: int | None,
    entropy: Tensor | None,
    entropy_coef: float,
    is_weights: Tensor | None = None,
    kl_logprobs: Tensor | None = None,
) -> None:
    """Fail loudly on inputs that would otherwise broadcast or clamp into a wrong loss."""
    for name, value, valid in (("loss", loss, LOSSES), ("aggregation", aggregation, AGGREGATIONS),
                               ("kl_estimator", kl_estimator, KL_ESTIMATORS)):
        if value not in valid:
            raise ValueError(f"{name}={value!r} is not one of {valid}")
    if aggregation == "constant" and not (max_tokens and max_tokens > 0):
        raise ValueError(f"aggregation='constant' needs max_tokens > 0, got max_tokens={max_tokens}")
    if kl_beta < 0:
        raise ValueError(f"kl_beta must be >= 0, got kl_beta={kl_beta}")
    if kl_beta > 0 and ref_logprobs is None:
        raise ValueError(f"kl_beta={kl_beta} > 0 needs ref_logprobs, got None")
    if entropy_coef < 0 or (entropy_coef > 0 and entropy is None):
        raise ValueError(f"entropy_coef={entropy_coef} must be >= 0, and > 0 needs entropy")
    if not (0.0 <= clip_low <= 1.0 and clip_high >= 0.0):
        raise ValueError(f"need 0 <= clip_low <= 1 and clip_high >= 0, "
                         f"got clip_low={clip_low}, clip_high={clip_high}")
    if dual_clip and (dual_clip <= 1.0 or loss == "cispo"):
        raise ValueError(f"dual_clip={dual_clip} must be 0 (off) or > 1, and 0 with loss='cispo'")
    if logprobs.dim() != 2:
        raise ValueError(f"logprobs must be [N, T], got shape {tuple(logprobs.shape)}")
    others = {"old_logprobs": old_logprobs, "mask": mask, "ref_logprobs": ref_logprobs,
              "entropy": entropy, "is_weights": is_weights, "kl_logprobs": kl_logprobs}
    for name, t in others.items():
        if t is not None and t.shape != logprobs.shape:
            raise ValueError(f"{name} shape {tuple(t.shape)} != logprobs shape "
                             f"{tuple(logprobs.shape)}")
    if advantages.shape != logprobs.shape[:1]:
        raise ValueError(f"advantages must be [N]={tuple(logprobs.shape[:1])}, "
                         f"got shape {tuple(advantages.shape)}")
