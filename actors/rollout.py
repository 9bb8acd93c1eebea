"""The rollout actor: hosts one engine, samples groups, carries the weight version.

The driver creates it as a Ray actor with the engine's environment (see
`actors.vllm_engine.vllm_env`) and calls `generate` once per step; the weight-sync protocol
(cluster/weight_sync.py) calls `update_weights` between steps. A Ray actor runs one method
at a time, which is what makes "flush before load" hold without locks.
"""

from __future__ import annotations

import numpy as np

from actors.records import Sample
from actors.vllm_engine import VLLMEngine
from cluster.config import RolloutConfig


class RolloutActor:
    def __init__(self, model_path: str, cfg: RolloutConfig, seed: int, dtype: str = "float32"):
        import torch

        torch.set_num_threads(cfg.threads)
        self.engine = VLLMEngine(model_path, cfg, seed, dtype)
        self.weight_version = 0

    def generate(self, prompt_ids: list[str], prompts: list[str], group_size: int, seed: int,
                 stop: tuple[str, ...], greedy: bool = False) -> list[Sample]:
        """`group_size` samples per prompt, grouped contiguously in prompt order."""
        groups = self.engine.generate(prompts, n=group_size, seed=seed, stop=stop, greedy=greedy)
        return [Sample(prompt_id=pid, weight_version=self.weight_version, **answer)
                for pid, group in zip(prompt_ids, groups) for answer in group]

    def update_weights(self, weights: dict[str, np.ndarray], version: int) -> tuple[int, int]:
        """Load new weights, then bump the version; returns (version, bytes received)."""
        self.engine.load_weights(weights)
        self.weight_version = version
        return self.weight_version, sum(a.nbytes for a in weights.values())

    def score(self, token_ids: np.ndarray) -> np.ndarray:
        return self.engine.score(token_ids)

    def tokenize(self, texts: list[str]) -> list[np.ndarray]:
        """Token ids as the engine encodes them (no special tokens added)."""
        tok = self.engine.tokenizer
        return [np.asarray(tok.encode(t, add_special_tokens=False), dtype=np.int32) for t in texts]
