"""GRPO math as pure tensor functions: group advantages, the clipped policy loss, the k3 KL.

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
   is the paper's form. Both average over the tensors passed in, i.e. one micro-batch; with
   gradient accumulation the caller decides how micro-batches are weighted.
2. Std normalisation. A_i = (r_i - mean_g) / (std_g + eps) as in the paper, with the
   unbiased sample std (divide by G-1, torch's default, as in TRL) and eps added to the std,
   not the variance. normalize_std=False gives r_i - mean_g (Dr. GRPO: dividing by std
   up-weights prompts that are nearly always solved or nearly never). A group whose rewards
   are all equal gets exactly 0: (r - mean) is not exactly 0 in floating point and dividing
   that rounding error by eps would turn it into a spurious advantage. G == 1 gives all 0.
3. Where the KL applies. As in the paper (and unlike InstructGPT-style PPO) the KL to the
   reference model is a loss term, not a reward penalty: kl_beta * k3 per token, added to
   the per-token policy loss before aggregation, so it is averaged like it. k3 =
   exp(ref - lp) - (ref - lp) - 1 (Schulman, "Approximating KL divergence", 2020) is
   unbiased and never negative. kl_beta defaults to 0 (off, as in DAPO) where the paper used
   0.04; the "kl" metric is reported whenever ref_logprobs is given, even at kl_beta == 0.
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

Padding: mask is 1 on response tokens to train on and 0 elsewhere. Masked positions of the
log-prob tensors may hold anything (0, -inf, NaN); they are zeroed before any exp so they
cannot reach the loss, the metrics or the gradient.
"""

from __future__ import annotations

import torch
from torch import Tensor

AGGREGATIONS = ("token", "sequence")


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


def kl_k3(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """Per-token k3 estimate of KL(pi || pi_ref): exp(ref - lp) - (ref - lp) - 1, >= 0.

    logprobs, ref_logprobs: [N, T] log-probs of the sampled tokens. Returns [N, T].
    """
    log_ratio = ref_logprobs - logprobs  # [N, T] log(pi_ref / pi)
    return torch.exp(log_ratio) - log_ratio - 1.0  # [N, T]


def importance_weights(prox_logprobs: Tensor, behaviour_logprobs: Tensor, mask: Tensor,
                       cap: float) -> Tensor:
    """Truncated per-token importance weights min(pi_prox / mu, cap), detached (point 6).

    prox_logprobs, behaviour_logprobs, mask: [N, T]. Masked positions get 1 (they carry no
    loss anyway, and may hold anything). Returns [N, T].
    """
    if cap < 1.0:
        raise ValueError(f"cap must be >= 1, got cap={cap}")
    keep = mask.to(torch.bool)
    log_w = (prox_logprobs.detach() - behaviour_logprobs.detach()).masked_fill(~keep, 0.0)  # [N, T]
    return torch.exp(log_w).clamp(max=cap)  # [N, T]


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
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    ref_logprobs: Tensor | None = None,
    kl_beta: float = 0.0,
    aggregation: str = "token",
    entropy: Tensor | None = None,
    is_weights: Tensor | None = None,
    kl_logprobs: Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """GRPO loss: -w * min(ratio * A, clip(ratio, 1-clip_low, 1+clip_high) * A) + kl_beta * k3.

    logprobs (with grad), old_logprobs, mask, ref_logprobs, entropy: [N, T]; advantages: [N],
    one per sequence, shared by its tokens. old/ref log-probs and advantages are constants.
    aggregation "token" averages over all unmasked tokens, "sequence" over each sequence's
    unmasked tokens and then over sequences that have any (module docstring, point 1).
    Returns (scalar loss, metrics). Metrics are floats: pg_loss, clip_fraction (share of
    unmasked tokens where the clipped term won the min), ratio_mean, and "kl" / "entropy"
    only when ref_logprobs / entropy are given (a missing key is not a measured 0).
    is_weights [N, T] (from `importance_weights`) weight each token's policy term, for stale
    samples (point 6); adds the metric is_weight_mean. kl_logprobs [N, T] (with grad): the
    policy's log-probs in the distribution the reference's are taken in, where it is not the
    sampling one (top-k / top-p cut the sampled distribution, not the models; point 7).
    """
    _check_loss_args(logprobs, old_logprobs, advantages, mask, clip_low, clip_high,
                     ref_logprobs, kl_beta, aggregation, entropy, is_weights, kl_logprobs)
    keep = mask.to(torch.bool)  # [N, T]
    lp = logprobs.masked_fill(~keep, 0.0)  # [N, T] padding may be NaN/-inf: keep exp finite
    old = old_logprobs.detach().masked_fill(~keep, 0.0)  # [N, T]
    adv = advantages.detach().unsqueeze(-1)  # [N, 1] broadcast over tokens

    ratio = torch.exp(lp - old)  # [N, T] pi / pi_old
    unclipped = ratio * adv  # [N, T]
    clipped = torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high) * adv  # [N, T]
    pg = -torch.minimum(unclipped, clipped)  # [N, T] pessimistic bound, PPO eq. 7
    if is_weights is not None:
        pg = pg * is_weights.detach()  # [N, T] reweighted to the learner's policy (point 6)

    kl = None
    if ref_logprobs is not None:
        ref = ref_logprobs.detach().masked_fill(~keep, 0.0)  # [N, T]
        kl_lp = lp if kl_logprobs is None else kl_logprobs.masked_fill(~keep, 0.0)  # [N, T]
        kl = kl_k3(kl_lp, ref) if kl_beta > 0 else kl_k3(kl_lp.detach(), ref)  # [N, T]
    per_token = pg  # [N, T]
    if kl_beta > 0:
        per_token = pg + kl_beta * kl  # [N, T] KL in the loss, not the reward (point 3)
    loss = _aggregate(per_token, keep, aggregation)  # []

    metrics = _loss_metrics(pg, ratio, unclipped, clipped, kl, entropy, keep, aggregation)
    if is_weights is not None:
        metrics["is_weight_mean"] = masked_mean(is_weights.detach(), keep).item()
    return loss, metrics


def _aggregate(per_token: Tensor, keep: Tensor, aggregation: str) -> Tensor:
    """Reduce a [N, T] per-token loss to a scalar (module docstring, point 1)."""
    if aggregation == "token":
        return masked_mean(per_token, keep)  # [] sum over tokens / number of tokens
    per_seq = masked_mean(per_token, keep, dim=-1)  # [N] 1/|o_i| sum_t
    has_tokens = keep.any(dim=-1)  # [N] an empty sequence has no mean to average
    return masked_mean(per_seq, has_tokens)  # [] 1/G sum_i over non-empty sequences


@torch.no_grad()
def _loss_metrics(
    pg: Tensor,
    ratio: Tensor,
    unclipped: Tensor,
    clipped: Tensor,
    kl: Tensor | None,
    entropy: Tensor | None,
    keep: Tensor,
    aggregation: str,
) -> dict[str, float]:
    """Python floats for logging; no_grad so they add nothing to the autograd graph."""
    clipped_won = (clipped < unclipped).float()  # [N, T] min chose the clipped term
    metrics = {
        "pg_loss": _aggregate(pg, keep, aggregation).item(),
        "clip_fraction": masked_mean(clipped_won, keep).item(),
        "ratio_mean": masked_mean(ratio, keep).item(),
    }
    if kl is not None:
        metrics["kl"] = masked_mean(kl, keep).item()
    if entropy is not None:
        metrics["entropy"] = masked_mean(entropy, keep).item()
    return metrics


def _check_loss_args(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_low: float,
    clip_high: float,
    ref_logprobs: Tensor | None,
    kl_beta: float,
    aggregation: str,
    entropy: Tensor | None,
    is_weights: Tensor | None = None,
    kl_logprobs: Tensor | None = None,
) -> None:
    """Fail loudly on inputs that would otherwise broadcast or clamp into a wrong loss."""
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation={aggregation!r} is not one of {AGGREGATIONS}")
    if kl_beta < 0:
        raise ValueError(f"kl_beta must be >= 0, got kl_beta={kl_beta}")
    if kl_beta > 0 and ref_logprobs is None:
        raise ValueError(f"kl_beta={kl_beta} > 0 needs ref_logprobs, got None")
    if not (0.0 <= clip_low < 1.0 and clip_high >= 0.0):
        raise ValueError(f"need 0 <= clip_low < 1 and clip_high >= 0, "
                         f"got clip_low={clip_low}, clip_high={clip_high}")
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
