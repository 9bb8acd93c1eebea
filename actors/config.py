"""The rollout actors' config section (`rollout.*`)."""

from __future__ import annotations

from dataclasses import dataclass

from common.config import ConfigError, option


@dataclass(frozen=True)
class RolloutConfig:
    engine: str = option("vllm", choices=("vllm", "transformers"))
    """Sampling backend: vLLM, or transformers `generate` where vLLM cannot run."""
    num_engines: int = option(1, lo=1)
    """Rollout actors; a step's prompts are split among them, each group stays on one."""
    num_cpus: float = option(0.9, lo=0.0, lo_open=True)
    """CPUs reserved per rollout actor (fractions let it share a core)."""
    num_gpus: float = option(0.0, lo=0.0)
    """GPUs per rollout actor; 0 runs the engine on the CPU (vLLM's CPU build)."""
    memory_gb: float = option(0.0, lo=0.0)
    """Host memory reserved per rollout actor in Ray's scheduler (0: none reserved)."""
    placement: str = option("pack", choices=("pack", "spread"))
    """Put the rollout actors on as few nodes as possible, or one per node where possible."""
    tensor_parallel_size: int = option(1, lo=1)
    """Workers one vLLM engine shards the model over: as many GPUs per engine on GPUs; on
    CPUs, as many processes of `threads` threads each."""
    engine_core: str = option("auto", choices=("auto", "in_process", "subprocess"))
    """Where a vLLM engine runs: in the rollout actor's process, or in processes of its own
    (an engine-core process, and one worker process per shard with tensor parallelism; how
    vLLM runs on GPUs). auto: in-process on CPU (starts in seconds), subprocess on GPU."""
    threads: int = option(2, lo=1)
    """Compute threads per CPU engine; they run while the learner idles."""
    temperature: float = option(1.0, lo=0.0, lo_open=True)
    """Sampling temperature; the learner divides its logits by the same value."""
    top_p: float = option(1.0, lo=0.0, hi=1.0, lo_open=True)
    """Nucleus sampling mass (below 1 the sampled distribution differs from the learner's:
    the difference shows in the off-policy gap)."""
    top_k: int = option(0, lo=0)
    """Sample among the k likeliest tokens only (0: all tokens)."""
    max_new_tokens: int = option(32, lo=1)
    """Longest answer; longer ones stop with finish reason "length" (truncated)."""
    max_model_len: int = option(256, lo=16)
    """Prompt plus answer tokens an engine holds per sequence: a prompt may use at most
    max_model_len - max_new_tokens of them."""
    prompt_too_long: str = option("error", choices=("error", "truncate_left", "skip"))
    """What happens to a longer prompt: stop with an error naming it, keep its last tokens,
    or leave it out of the step (counted in `rollout/skipped_prompts`)."""
    max_restarts: int = option(3, lo=0)
    """Times per run a rollout actor that died or hung is replaced, brought to the current
    weights and its unfinished work redone (cluster/faults.py); 0 makes an engine failure stop
    the run with the actor's error."""
    kv_cache_gib: int = option(1, lo=1)
    """KV-cache memory of a CPU vLLM engine."""
    gpu_memory_utilization: float = option(0.9, lo=0.0, hi=1.0, lo_open=True)
    """Share of its GPU's memory a GPU vLLM engine may take (weights, activations, KV cache);
    colocated with a learner rank (cluster.colocate), leave the learner its share."""

    def __post_init__(self) -> None:
        if self.max_new_tokens >= self.max_model_len:
            raise ConfigError(f"rollout.max_new_tokens={self.max_new_tokens} must be < "
                              f"rollout.max_model_len={self.max_model_len}")
        if 0 < self.num_gpus < self.tensor_parallel_size:
            raise ConfigError(f"rollout.tensor_parallel_size={self.tensor_parallel_size} needs rollout.num_gpus "
                              f">= {self.tensor_parallel_size} per engine (got {self.num_gpus:g})")
        if self.engine == "transformers" and self.tensor_parallel_size > 1:
            raise ConfigError("rollout.tensor_parallel_size > 1 needs rollout.engine=vllm")
