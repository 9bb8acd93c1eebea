"""The learner's config sections: its ranks (`learner.*`) and the GRPO algorithm (`algorithm.*`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from common.config import ConfigError, option


@dataclass(frozen=True)
class LearnerConfig:
    num_ranks: int = option(1, lo=1)
    """DeepSpeed data-parallel ranks, one Ray actor each."""
    num_cpus: float = option(1.0, lo=0.0, lo_open=True)
    """CPUs reserved per learner rank."""
    num_gpus: float = option(0.0, choices=(0.0, 1.0))
    """GPUs per learner rank: 0 trains on the CPU (gloo), 1 on a GPU (NCCL)."""
    memory_gb: float = option(0.0, lo=0.0)
    """Host memory reserved per learner rank in Ray's scheduler (0: none reserved)."""
    threads: int = option(2, lo=1)
    """Torch compute threads per rank."""
    zero_stage: int = option(2, choices=(1, 2, 3))
    """DeepSpeed ZeRO stage."""
    dtype: str = option("auto", choices=("auto", "float32", "bfloat16"))
    """Training precision, also the engines' (fp16 is not supported on CPU). auto is bf16 where
    it is fast (GPUs from Ampere on, CPUs with AMX or AVX512-BF16), else fp32; it is resolved
    when the config loads (cluster/precision.py), so the run's config.yaml records the choice."""
    lr: float = option(5e-5, lo=0.0, lo_open=True)
    """Peak learning rate of the RL stage."""
    warmup_steps: int = option(10, lo=0)
    """Linear warm-up steps of the learning rate."""
    weight_decay: float = option(0.0, lo=0.0)
    """AdamW weight decay."""
    grad_clip: float = option(1.0, lo=0.0)
    """Gradient norm clip (0 disables)."""
    micro_batch_size: int = option(64, lo=1)
    """Sequences per forward/backward on one rank; gradients accumulate over the rest."""
    attention: str = option("auto", choices=("auto", "eager", "sdpa"))
    """The learner's attention kernels: auto is eager on CPU (faster than SDPA's CPU kernels
    on short sequences) and sdpa on GPU."""
    gradient_checkpointing: bool = option(False)
    """Recompute each transformer layer's activations in backward instead of keeping them (one
    more forward of the layers; bench/RESULTS.md, learner memory). Also the reward model's."""
    logprob_chunk: int = option(1024, lo=0)
    """Answer tokens per chunk of the LM head and log-softmax: each chunk's [chunk, vocab]
    logits are recomputed in backward instead of kept (0: all tokens at once, kept). 1024
    costs one more head forward, 2-7% of the learner's work from 7B down to 135M parameters,
    and caps the log-softmax at ~3.6 GB in bf16 for a 152k vocabulary (bench/RESULTS.md)."""


@dataclass(frozen=True)
class AlgorithmConfig:
    steps: int = option(220, lo=0)
    """GRPO steps."""
    max_minutes: float = option(0.0, lo=0.0)
    """Also stop after the step that ends this many minutes after RL started or resumed (0: no
    limit), and finish as after the last step (held-out accuracy, the model saved): runs
    compared on equal wall-clock budgets (bench/algorithms.py)."""
    prompts_per_step: int = option(16, lo=1)
    """B: prompts sampled per step."""
    group_size: int = option(8, lo=2)
    """G: answers sampled per prompt; advantages are relative within a group."""
    loss: str = option("grpo", choices=("grpo", "gspo", "cispo"))
    """The policy loss (learner/grpo.py, point 9): grpo (the clipped token ratio), gspo (Qwen's:
    the clipped sequence ratio), cispo (MiniMax-M1's: the clipped importance weight times a
    REINFORCE gradient for every token)."""
    clip_low: float | None = option(None, lo=0.0, hi=1.0)
    """The clip range's lower side: the ratio (weight, for cispo) is kept >= 1 - clip_low (1: no
    lower bound). null: the loss's paper: 0.2 (grpo), 3e-4 (gspo), 1 (cispo)."""
    clip_high: float | None = option(None, lo=0.0)
    """The clip range's upper side: <= 1 + clip_high; above clip_low is "clip-higher" (DAPO:
    0.28). null: the loss's paper: 0.2 (grpo), 4e-4 (gspo), 5 (cispo: MiniMax-M1 tunes it and
    publishes no value; 5 lets all but outlying weights through)."""
    dual_clip: float = option(0.0, lo=0.0)
    """Dual clip (c > 1): for A < 0 a token's loss is at most -c * A; 0 is off. Not with cispo,
    whose clip range is its only one."""
    kl_beta: float = option(0.0, lo=0.0)
    """Weight of the KL penalty to the frozen reference (0: no reference model is loaded or run)."""
    kl_estimator: str = option("k3", choices=("k1", "k2", "k3"))
    """The per-token KL estimator (learner/grpo.py, point 3): k3 is the paper's; k2 in the loss
    has the true KL gradient; k1 in the loss regularises nothing (use it in the reward)."""
    kl_in: str = option("loss", choices=("loss", "reward"))
    """Where the KL penalty goes: a term of the loss (the paper's), or folded into each answer's
    reward before the group advantages (InstructGPT's; uses the sampler's log-probs, so it
    needs rollout.top_p=1 and top_k=0)."""
    kl_reference: str = option("rl_start")
    """The KL penalty's frozen reference: rl_start (the policy as RL starts: after cold-start
    SFT, else model.path; kept in the run folder as reference/ so a resumed run uses the
    same), an HF model folder with the policy's architecture, or none (no reference: kl_beta
    must be 0)."""
    entropy_coef: float = option(0.0, lo=0.0)
    """Entropy bonus: -entropy_coef * H per token in the loss (0: none; the entropy is then
    logged, without its gradient)."""
    aggregation: str = option("auto", choices=("auto", "token", "sequence", "constant"))
    """How the per-token loss is averaged: over all tokens of the batch, per sequence then over
    sequences, or summed and divided by rollout.max_new_tokens per sequence (constant: Dr. GRPO,
    with normalize_std=false). auto: sequence for gspo (its paper's), token otherwise."""
    updates_per_step: int = option(2, lo=1)
    """Optimizer steps per batch (mini-batches); 1 is exactly on-policy and never clips."""
    old_logprobs: str = option("auto", choices=("auto", "sampler", "learner"))
    """pi_old of the ratio, with several updates per step: the engines' sampling log-probs
    (sampler; free), or the learner's own, recomputed before the first update (learner; one
    more forward pass; for engines whose numerics differ, as in bf16). With one update the
    learner's current policy is pi_old whatever this says. auto: learner when a mismatch
    correction is on, sampler otherwise."""
    mismatch: str = option("auto", choices=("auto", "none", "tis", "mis_token", "mis_sequence", "geo_mask"))
    """Correct each token for the sampler/learner mismatch r = pi_old / pi_sampler (learner/grpo.py,
    point 11): tis (truncated at is_cap), mis_token / mis_sequence (drop tokens / sequences
    whose r leaves [mismatch_low, mismatch_high]), geo_mask (drop sequences whose geometric-mean
    r does, truncate the rest at is_cap). auto: tis with max_staleness 1, none otherwise."""
    is_cap: float = option(2.0, lo=1.0)
    """tis and geo_mask: the per-token weight pi_old / pi_sampler is truncated at this value."""
    mismatch_low: float | None = option(None, lo=0.0, hi=1.0)
    """The band's lower end for mis_token, mis_sequence and geo_mask. null: 0.5, or 0.99 for
    geo_mask (a geometric mean over a sequence moves far less than one token's ratio)."""
    mismatch_high: float | None = option(None, lo=1.0)
    """The band's upper end. null: 2, or 1.01 for geo_mask."""
    mask_truncated: bool = option(False)
    """Leave answers cut by rollout.max_new_tokens out of the loss (they still count in
    their group's advantages); otherwise they are learned from like the others."""
    normalize_std: bool = option(True)
    """Divide advantages by the group's standard deviation."""
    dynamic_sampling: bool = option(False)
    """DAPO's dynamic sampling: groups whose rewards are all equal (no signal) are dropped and
    more prompts are sampled, a step's worth per round, until prompts_per_step groups with
    signal are in the batch or dynamic_sampling_rounds extra rounds are spent. Off, groups
    without signal are still left out of the batch, which is then smaller."""
    dynamic_sampling_rounds: int = option(3, lo=1)
    """Most extra generation rounds per step with dynamic_sampling."""
    prompt_filter: str = option("none", choices=("none", "skip"))
    """Online difficulty filtering (cluster/curriculum.py): skip, drawing another in its place, a
    prompt whose answers so far (a group's worth at least) were all right or all wrong: its
    advantages would be 0, so it would cost a group's generation and teach nothing. The share
    of draws skipped is logged (prompts/skipped)."""
    curriculum: str = option("none", choices=("none", "learnability"))
    """Weight each task of the mixture by its learnability 4p(1-p) (p: its running pass rate;
    at least 0.1) times its task weight, so tasks nearly always or never solved are drawn less."""
    max_staleness: int = option(0, lo=0, hi=1)
    """How many optimizer steps the policy that sampled a batch may lag the learner. 0: the
    synchronous loop. 1: the next step's prompts are generated (and scored) while this step
    learns, and the learner corrects for the lag (mismatch, tis by default)."""
    seed: int = option(0)
    """Seed of prompt sampling, engine sampling and the learner."""

    def __post_init__(self) -> None:
        if self.kl_reference not in ("rl_start", "none") and not (Path(self.kl_reference).expanduser()
                                                                 / "config.json").is_file():
            raise ConfigError(f"algorithm.kl_reference={self.kl_reference!r} is neither rl_start, none nor a "
                              f"Hugging Face model folder (no config.json in it)")

    def resolved(self) -> AlgorithmConfig:
        """This config with every field whose default depends on others (auto, null) chosen,
        after refusing combinations that make no sense with one line naming both keys. The
        loader calls it (cluster/config.py), so a run's config.yaml records the choices; the
        learner calls it again (a no-op then) for configs built in code."""
        clip_low, clip_high = PAPER_CLIPS[self.loss]
        mismatch = self.mismatch if self.mismatch != "auto" else "tis" if self.max_staleness else "none"
        geo = mismatch == "geo_mask"
        out = dataclasses.replace(
            self,
            aggregation=self.aggregation if self.aggregation != "auto" else
            "sequence" if self.loss == "gspo" else "token",
            clip_low=clip_low if self.clip_low is None else self.clip_low,
            clip_high=clip_high if self.clip_high is None else self.clip_high,
            mismatch=mismatch,
            old_logprobs=self.old_logprobs if self.old_logprobs != "auto" else
            "sampler" if mismatch == "none" else "learner",
            mismatch_low=(0.99 if geo else 0.5) if self.mismatch_low is None else self.mismatch_low,
            mismatch_high=(1.01 if geo else 2.0) if self.mismatch_high is None else self.mismatch_high,
        )
        out._check_combinations()
        return out

    def _check_combinations(self) -> None:
        bad = None
        if self.loss == "gspo" and self.aggregation != "sequence":
            bad = (f"algorithm.loss=gspo clips one ratio per sequence and averages over sequences; "
                   f"algorithm.aggregation={self.aggregation} would weigh a sequence by its length (use sequence)")
        elif self.loss == "cispo" and self.dual_clip:
            bad = (f"algorithm.loss=cispo clips the importance weight, its only clip range; "
                   f"algorithm.dual_clip={self.dual_clip:g} would add a second (set it to 0)")
        elif self.dual_clip and self.dual_clip <= 1:
            bad = f"algorithm.dual_clip={self.dual_clip:g} must be 0 (off) or above 1 (it bounds the loss at -c * A)"
        elif self.kl_beta > 0 and self.kl_reference == "none":
            bad = (f"algorithm.kl_beta={self.kl_beta:g} estimates a KL to a reference model, but "
                   f"algorithm.kl_reference=none has none (set kl_beta=0 or name a reference)")
        elif self.mismatch != "none" and self.old_logprobs == "sampler":
            bad = (f"algorithm.mismatch={self.mismatch} weights tokens by pi_old / pi_sampler, which "
                   f"algorithm.old_logprobs=sampler makes 1 (use learner)")
        if bad:
            raise ConfigError(bad)


PAPER_CLIPS = {"grpo": (0.2, 0.2), "gspo": (3e-4, 4e-4), "cispo": (1.0, 5.0)}
"""(clip_low, clip_high) of each loss's paper (DeepSeekMath; GSPO sec. 5.1; MiniMax-M1: no lower
bound, the upper one tuned), where the config leaves them null."""
