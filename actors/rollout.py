"""The rollout actor: hosts one engine (vLLM or transformers), samples groups, carries the
weight version.

The driver creates `rollout.num_engines` of these as Ray actors (`cluster.rollout_pool.RolloutPool`)
and calls `generate` once per step; the weight-sync protocol (cluster/weight_sync.py) calls
the `*_weights` methods between steps. A Ray actor runs one method at a time, which is
what makes "flush before load" hold without locks.

Prompts are tokenized here, with the engine's tokenizer, and fitted to the engine's
context: a prompt may use `max_model_len - max_new_tokens` tokens, and a longer one is
handled by `rollout.prompt_too_long` (see `fit_prompt`) before any engine sees it.
"""

from __future__ import annotations

import numpy as np

from actors.config import RolloutConfig
from actors.vllm_engine import vllm_env
from common.records import Sample, Sampling
from common.weight_sync import agreed, shared_file


def actor_env(cfg: RolloutConfig) -> dict[str, str]:
    """Environment variables of a rollout actor's process, for its runtime environment."""
    return vllm_env(cfg) if cfg.engine == "vllm" else {"OMP_NUM_THREADS": str(cfg.threads)}


class PromptTooLongError(ValueError):
    """A prompt does not fit the engine's context and the policy is "error"."""


def fit_prompt(ids: list[int], budget: int, policy: str, prompt_id: str) -> list[int] | None:
    """The prompt's tokens as the engine will see them, or None to leave the prompt out.

    policy: "error" raises naming the prompt, "truncate_left" keeps the last `budget`
    tokens (the question usually ends a prompt), "skip" returns None.
    """
    if len(ids) <= budget:
        return ids
    if policy == "truncate_left":
        return ids[-budget:]
    if policy == "skip":
        return None
    raise PromptTooLongError(
        f"prompt {prompt_id!r} has {len(ids)} tokens; rollout.max_model_len - rollout.max_new_tokens "
        f"leaves {budget} for a prompt. Raise rollout.max_model_len, or set "
        "rollout.prompt_too_long=truncate_left or skip")


def check_fit(model_path: str, prompts: dict[str, str], cfg: RolloutConfig) -> None:
    """Raise `PromptTooLongError` for the first of `prompts` (id -> rendered text) that the
    engines would refuse, tokenized as they will tokenize it: a driver checks the prompts it
    knows before it starts an engine (the engines check every prompt they are given)."""
    if cfg.prompt_too_long != "error":
        return
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    for prompt_id, text in prompts.items():
        fit_prompt(tokenizer.encode(text), cfg.max_model_len - cfg.max_new_tokens, "error", prompt_id)


class RolloutActor:
    def __init__(self, model_path: str, cfg: RolloutConfig, seed: int, dtype: str = "float32",
                 index: int = 0, colocated: bool = False):
        """`colocated`: the engine shares its device with a learner rank and sleeps while it
        trains (`sleep`, `wake`)."""
        import torch

        torch.set_num_threads(cfg.threads)
        device = "cuda" if cfg.num_gpus > 0 else "cpu"
        if cfg.engine == "vllm":
            from actors.vllm_engine import VLLMEngine

            self.engine = VLLMEngine(model_path, cfg, seed, dtype, index, sleep_mode=colocated)
        else:
            from actors.hf_engine import TransformersEngine

            self.engine = TransformersEngine(model_path, dtype, device)  # seeded per call
        self.cfg = cfg
        self.weight_version = 0
        self.sleeping = False

    def sleep(self) -> None:
        """Free the engine's device memory for the learner beside it until `wake`; the engine
        refuses all work meanwhile. On CPU nothing is freed (vLLM has no sleep mode there)."""
        self.engine.sleep()
        self.sleeping = True

    def wake(self) -> None:
        """Take the device memory back: the engine serves the weights it served before `sleep`."""
        self.engine.wake()
        self.sleeping = False

    def _awake(self) -> None:
        if self.sleeping:
            raise RuntimeError("the rollout engine is asleep (its device is the learner's): wake it first")

    def generate(self, prompt_ids: list[str], prompts: list[str], sampling: Sampling) -> list[Sample]:
        """`sampling.n` samples per prompt, grouped contiguously in prompt order.

        Prompts left out by `rollout.prompt_too_long=skip` have no samples.
        """
        self._awake()
        kept, tokens = self._fit(prompt_ids, prompts, sampling)
        groups = self.engine.generate([tokens[i] for i in kept], sampling)
        return [s for i, group in zip(kept, groups) for s in self._samples(prompt_ids[i], tokens[i], group)]

    def generate_stream(self, prompt_ids: list[str], prompts: list[str], sampling: Sampling):
        """`generate`'s groups as they finish: yields lists of (prompt index, its n samples).
        A Ray streaming generator: call with `.options(num_returns="streaming")`."""
        self._awake()
        kept, tokens = self._fit(prompt_ids, prompts, sampling)
        for done in self.engine.generate_stream([tokens[i] for i in kept], sampling):
            yield [(kept[k], self._samples(prompt_ids[kept[k]], tokens[kept[k]], group)) for k, group in done]

    def _fit(self, prompt_ids: list[str], prompts: list[str], sampling: Sampling):
        """(indices of the prompts that fit or were fitted, every prompt's tokens or None)."""
        budget = self.cfg.max_model_len - sampling.max_new_tokens
        tokens = [fit_prompt(self.engine.tokenizer.encode(p), budget, self.cfg.prompt_too_long, pid)
                  for pid, p in zip(prompt_ids, prompts)]
        return [i for i, t in enumerate(tokens) if t is not None], tokens

    def _samples(self, prompt_id: str, tokens: list[int], group: list[dict]) -> list[Sample]:
        return [Sample(prompt_id=prompt_id, prompt_ids=np.asarray(tokens, dtype=np.int32),
                       weight_version=self.weight_version, **answer) for answer in group]

    def score(self, token_ids: np.ndarray) -> np.ndarray:
        """Raw log-probs of a fixed sequence (the weight-sync check)."""
        self._awake()
        return self.engine.score(token_ids)

    def tokenize(self, texts: list[str]) -> list[np.ndarray]:
        """Token ids as the engine encodes them (no special tokens added)."""
        tok = self.engine.tokenizer
        return [np.asarray(tok.encode(t, add_special_tokens=False), dtype=np.int32) for t in texts]

    # ---- weight sync (the engine half; see common/weight_sync.py) -----------------------------
    # Each call runs on every worker of the engine (`engine.weights`); they must all agree.

    def weight_workers(self) -> int:
        """Processes that hold the engine's weights, each a member of the sync group."""
        return len(self.engine.weights("worker_rank"))

    def stage_weights(self, weights: dict[str, np.ndarray], version: int) -> tuple[int, int]:
        """Object-store transport: hold a whole new version beside the served one; returns
        (bytes held, the version served meanwhile)."""
        if self.engine.shares_memory:
            held = self.engine.weights("stage_arrays", version, weights)
        else:
            with shared_file(weights) as path:
                held = self.engine.weights("stage_file", version, path)
        return agreed(held), self.weight_version

    def stage_shared(self, handles: list, version: int) -> tuple[int, int]:
        """CUDA IPC transport: copy the weights of the learner rank beside this engine from
        its CUDA IPC handles and hold them; returns (bytes held, the version served meanwhile)."""
        return agreed(self.engine.weights("stage_ipc", version, handles)), self.weight_version

    def join_sync_group(self, host: str, port: int, first_rank: int, world_size: int, timeout_s: float,
                        device: str) -> None:
        """Broadcast transport: every worker joins the group (ranks from `first_rank` on)."""
        agreed(self.engine.weights("join", host, port, first_rank, world_size, timeout_s, device))

    def receive_weights(self, version: int, manifest: list, bucket_bytes: int,
                        timeout_s: float) -> tuple[int, int]:
        """Broadcast transport: receive a whole new version from learner rank 0 and hold it;
        returns (bytes held, the version served meanwhile)."""
        return agreed(self.engine.weights("receive", version, manifest, bucket_bytes, timeout_s)), self.weight_version

    def commit_weights(self, version: int) -> int:
        """Load the held version in place, then serve it; returns the version now served."""
        self._awake()
        agreed(self.engine.weights("commit", version))
        self.weight_version = version
        return self.weight_version

    def rollback_weights(self) -> int:
        """Another engine did not load this sync's version (or this one did not): load the
        version served before it whole and serve it again; returns the version now served."""
        self._awake()
        self.weight_version = agreed(self.engine.weights("rollback"))
        return self.weight_version

    def release_weights(self) -> None:
        """Every engine loaded this sync's version: drop the copy kept for a rollback."""
        agreed(self.engine.weights("release"))
