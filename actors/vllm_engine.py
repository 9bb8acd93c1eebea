"""The vLLM rollout engine: G samples per prompt with per-token sampling log-probs.

On CPU machines vLLM runs in-process (no engine-core subprocess, "uni" executor, eager
mode): it starts in seconds instead of a minute and weights can be handed to the model
runner directly. The environment that mode needs is set by `vllm_env()`, which the driver
passes to the rollout actor's runtime environment before vLLM is imported.

Log-probs are reported "processed", i.e. after temperature scaling, so they are the
log-probs of the distribution that was actually sampled; the learner divides its logits by
the same temperature when it recomputes them.
"""

from __future__ import annotations

import numpy as np

from actors.records import Sample
from cluster.config import RolloutConfig


def vllm_env(cfg: RolloutConfig) -> dict[str, str]:
    """Environment of a process hosting a CPU vLLM engine (set before `import vllm`)."""
    return {
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",  # engine core in this process
        "VLLM_CPU_KVCACHE_SPACE": str(cfg.kv_cache_gib),
        "VLLM_CPU_OMP_THREADS_BIND": f"0-{cfg.threads - 1}",
        "OMP_NUM_THREADS": str(cfg.threads),
        "VLLM_LOGGING_LEVEL": "ERROR",
    }


class VLLMEngine:
    """A vLLM `LLM` behind the rollout-engine interface: generate, load_weights, score."""

    def __init__(self, model_path: str, cfg: RolloutConfig, seed: int, dtype: str = "float32"):
        from vllm import LLM

        self.cfg = cfg
        self.llm = LLM(
            model=model_path,
            dtype=dtype,
            seed=seed,
            enforce_eager=True,
            distributed_executor_backend="uni",
            max_model_len=cfg.max_model_len,
            logprobs_mode="processed_logprobs",
            worker_extension_cls="cluster.weight_sync.EngineWeightReceiver",
        )
        self.tokenizer = self.llm.get_tokenizer()
        # The first batch pays one-off kernel set-up (seconds); pay it here, not in step 1.
        self.generate(["warm up"], n=2, seed=seed, stop=())

    def generate(self, prompts: list[str], n: int, seed: int, stop: tuple[str, ...],
                 greedy: bool = False) -> list[list[dict]]:
        """Sample `n` answers per prompt; returns per prompt a list of n raw answers.

        Each request gets its own seed (seed + prompt index): results do not depend on how
        prompts are batched, and seeded requests take vLLM's fast CPU sampling path.
        """
        from vllm import SamplingParams

        params = [
            SamplingParams(
                n=n,
                temperature=0.0 if greedy else self.cfg.temperature,
                top_p=1.0 if greedy else self.cfg.top_p,
                max_tokens=self.cfg.max_new_tokens,
                stop=list(stop),
                include_stop_str_in_output=True,
                skip_special_tokens=True,
                logprobs=0,
                seed=seed + i,
            )
            for i in range(len(prompts))
        ]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        return [
            [
                dict(
                    prompt_ids=np.asarray(out.prompt_token_ids, dtype=np.int32),
                    response_ids=np.asarray(c.token_ids, dtype=np.int32),
                    logprobs=np.asarray([lp[t].logprob for t, lp in zip(c.token_ids, c.logprobs)],
                                        dtype=np.float32),
                    text=c.text,
                    finish_reason="length" if c.finish_reason == "length" else "stop",
                )
                for c in out.outputs
            ]
            for out in outputs
        ]

    def score(self, token_ids: np.ndarray) -> np.ndarray:
        """Log-probs [T-1] of tokens 1..T-1 of a fixed sequence given their prefix.

        These are the model's raw log-probs (temperature 1): prompt tokens are not sampled.
        """
        from vllm import SamplingParams, TokensPrompt

        params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=1.0)
        (out,) = self.llm.generate([TokensPrompt(prompt_token_ids=[int(t) for t in token_ids])],
                                   params, use_tqdm=False)
        return np.asarray([lp[int(t)].logprob for t, lp in zip(token_ids[1:], out.prompt_logprobs[1:])],
                          dtype=np.float32)

    def load_weights(self, weights: dict[str, np.ndarray]) -> None:
        """Replace the model's weights in place and drop cached prefixes computed with the old ones."""
        self.llm.collective_rpc("load_policy_weights", args=(weights,))
        self.llm.reset_prefix_cache()
