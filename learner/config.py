"""The learner's config sections: its ranks (`learner.*`) and the GRPO algorithm (`algorithm.*`)."""

from __future__ import annotations

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
    prompts_per_step: int = option(16, lo=1)
    """B: prompts sampled per step."""
    group_size: int = option(8, lo=2)
    """G: answers sampled per prompt; advantages are relative within a group."""
    clip_low: float = option(0.2, lo=0.0, hi=1.0, hi_open=True)
    """PPO clip below 1 (ratio >= 1 - clip_low; below 1, or the lower bound would be 0)."""
    clip_high: float = option(0.2, lo=0.0)
    """PPO clip above 1 (ratio <= 1 + clip_high); larger than clip_low is "clip-higher"."""
    kl_beta: float = option(0.0, lo=0.0)
    """Weight of the k3 KL penalty to the frozen reference (0: no reference model)."""
    kl_reference: str = option("rl_start")
    """The KL penalty's frozen reference: rl_start (the policy as RL starts: after cold-start
    SFT, else model.path; kept in the run folder as reference/ so a resumed run uses the
    same), or an HF model folder with the policy's architecture."""
    aggregation: str = option("token", choices=("token", "sequence"))
    """Average the loss over all tokens of the batch, or per sequence then over sequences."""
    updates_per_step: int = option(2, lo=1)
    """Optimizer steps per batch (mini-batches); 1 is exactly on-policy and never clips."""
    recompute_old_logprobs: bool = option(False)
    """With several updates per step, take the old policy's log-probs from a learner forward
    pass instead of the engine's sampling log-probs (costs one forward; for bf16 engines)."""
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
    max_staleness: int = option(0, lo=0, hi=1)
    """How many optimizer steps the policy that sampled a batch may lag the learner. 0: the
    synchronous loop. 1: the next step's prompts are generated (and scored) while this step
    learns, and the learner corrects for the lag with truncated importance sampling."""
    is_cap: float = option(2.0, lo=1.0)
    """With max_staleness 1: the per-token importance weight pi_learner / pi_sampler is
    truncated at this value (learner/grpo.py, point 6)."""
    seed: int = option(0)
    """Seed of prompt sampling, engine sampling and the learner."""

    def __post_init__(self) -> None:
        if self.kl_reference != "rl_start" and not (Path(self.kl_reference).expanduser() / "config.json").is_file():
            raise ConfigError(f"algorithm.kl_reference={self.kl_reference!r} is neither rl_start nor a Hugging "
                              f"Face model folder (no config.json in it)")
