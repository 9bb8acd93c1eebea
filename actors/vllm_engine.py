"""The vLLM rollout engine: G samples per prompt with per-token sampling log-probs.

Where the engine runs (`rollout.engine_core`):
- in the rollout actor's process ("in_process", the default on CPU): no engine-core
  subprocess and, with one worker, vLLM's "uni" executor in the same process. It starts in
  seconds instead of a minute, and the weight sync hands tensors to the worker directly.
- in a subprocess of its own ("subprocess", the default on GPU, as vLLM runs by default):
  the engine core and, with `rollout.tensor_parallel_size` > 1, one worker process per
  shard. The same topology runs on CPU (the tests run it), with each worker's threads
  pinned to cores of their own.
The environment that choice needs is set by `vllm_env()`, which the driver passes (via
`actors.rollout.actor_env`) to the rollout actor's runtime environment before vLLM is
imported. On GPU machines (`rollout.num_gpus > 0`) the regular vLLM build runs with CUDA
graphs.

Log-probs are reported "processed", i.e. after temperature scaling (and the top-k / top-p
cut, when set), so they are the log-probs of the distribution that was actually sampled;
the learner divides its logits by the same temperature when it recomputes them.

New weights reach the engine's workers, whichever process they are in, through
`common.weight_sync.EngineWeightReceiver` (a vLLM worker extension): `weights` calls it.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from actors.config import RolloutConfig
from actors.reaper import reap_when_gone
from common.records import Sampling


def in_process(cfg: RolloutConfig) -> bool:
    """Whether the engine core runs in the rollout actor's process (`rollout.engine_core`)."""
    return cfg.engine_core == "in_process" or (cfg.engine_core == "auto" and cfg.num_gpus == 0)


def vllm_env(cfg: RolloutConfig) -> dict[str, str]:
    """Environment of a process hosting a vLLM engine (set before `import vllm`)."""
    env = {"VLLM_LOGGING_LEVEL": "ERROR", "OMP_NUM_THREADS": str(cfg.threads),
           "VLLM_ENABLE_V1_MULTIPROCESSING": "0" if in_process(cfg) else "1"}
    if cfg.num_gpus == 0:
        env["VLLM_CPU_KVCACHE_SPACE"] = str(cfg.kv_cache_gib)
    return env


def cpu_binding(index: int, threads: int, workers: int) -> str:
    """VLLM_CPU_OMP_THREADS_BIND for engine `index`: per worker ("|"-separated), `threads`
    cores of this node's own, in turn, so that engines and shards do not all pile onto the
    first cores. Read only where vLLM starts worker processes; in-process, "uni" engines
    use OMP_NUM_THREADS threads wherever the OS puts them."""
    import os

    cores = sorted(os.sched_getaffinity(0))
    first = index * workers * threads
    return "|".join(",".join(str(cores[(first + w * threads + k) % len(cores)]) for k in range(threads))
                    for w in range(workers))


class VLLMEngine:
    """A vLLM `LLM` behind the rollout-engine interface: generate, score, weights."""

    def __init__(self, model_path: str, cfg: RolloutConfig, seed: int, dtype: str = "float32",
                 index: int = 0, sleep_mode: bool = False):
        """`sleep_mode`: the engine can free its device memory between generations (`sleep`):
        on GPUs, vLLM's sleep mode; on CPU vLLM has none, and `sleep` keeps everything."""
        import os

        on_cpu = cfg.num_gpus == 0
        if on_cpu:  # read when the engine starts its workers, so it can be set here, per engine
            os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND",
                                  cpu_binding(index, cfg.threads, cfg.tensor_parallel_size))
        from vllm import LLM

        self.llm = LLM(
            model=model_path,
            dtype=dtype,
            seed=seed,
            enforce_eager=on_cpu,
            distributed_executor_backend="uni" if cfg.tensor_parallel_size == 1 else "mp",
            tensor_parallel_size=cfg.tensor_parallel_size,
            max_model_len=cfg.max_model_len,
            logprobs_mode="processed_logprobs",
            # A prefill cut in chunks makes vLLM rewind a seeded request's generator, which a
            # CPU generator cannot do ("CPU Generator does not use offset"): whole prefills only.
            enable_chunked_prefill=not on_cpu,
            worker_extension_cls="common.weight_sync.EngineWeightReceiver",
            enable_sleep_mode=sleep_mode and not on_cpu,
            **({} if on_cpu else {"gpu_memory_utilization": cfg.gpu_memory_utilization}),
        )
        self.sleep_mode = sleep_mode and not on_cpu
        self.tokenizer = self.llm.get_tokenizer()
        # RPC arguments reach the one worker as they are (no copy, tensors too) only when it
        # runs in this process; otherwise they must be plain data.
        self.shares_memory = in_process(cfg) and cfg.tensor_parallel_size == 1
        self.reaper = None if self.shares_memory else reap_when_gone(os.getpid())  # its own processes
        self.streams = 0  # generate_stream calls so far: part of their request ids
        # The first batch pays one-off kernel set-up (seconds); pay it here, not in step 1.
        self.generate([self.tokenizer.encode("warm up")], Sampling(n=2, seed=seed, max_new_tokens=4))

    def generate(self, prompts: list[list[int]], sampling: Sampling) -> list[list[dict]]:
        """`sampling.n` answers per prompt (token-id lists); per prompt a list of n raw answers.

        Prompt i gets seed `sampling.seed + i`: results do not depend on how prompts are
        batched, and seeded requests take vLLM's fast CPU sampling path.
        """
        from vllm import TokensPrompt

        if not prompts:
            return []
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompts],
                                    self._params(sampling, len(prompts)), use_tqdm=False)
        return [_answers(out) for out in outputs]

    def generate_stream(self, prompts: list[list[int]], sampling: Sampling) -> Iterator[list[tuple[int, list[dict]]]]:
        """What `generate` returns, as soon as it is ready: after each engine step, the
        (prompt index, its n answers) of the prompts whose answers all finished in it. The
        same requests in the same batch as `generate`, so the same answers."""
        from vllm import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        if not prompts:
            return
        self.streams += 1
        engine, index = self.llm.llm_engine, {}
        for i, (p, params) in enumerate(zip(prompts, self._params(sampling, len(prompts)))):
            params.output_kind = RequestOutputKind.FINAL_ONLY  # one output per request, when done
            request = f"stream-{self.streams}-{i}"  # never one of LLM.generate's counter ids
            engine.add_request(request, TokensPrompt(prompt_token_ids=list(p)), params)
            index[request] = i
        while engine.has_unfinished_requests():
            done = [(index[out.request_id], _answers(out)) for out in engine.step() if out.finished]
            if done:
                yield done

    @staticmethod
    def _params(sampling: Sampling, count: int) -> list:
        from vllm import SamplingParams

        return [
            SamplingParams(
                n=sampling.n,
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                top_k=sampling.top_k or -1,
                max_tokens=sampling.max_new_tokens,
                stop=list(sampling.stop),
                include_stop_str_in_output=True,
                skip_special_tokens=True,
                logprobs=0,
                seed=sampling.seed + i,
            )
            for i in range(count)
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

    def sleep(self) -> None:
        """Free the device memory (level 1: weights to host memory, the KV cache dropped)."""
        if self.sleep_mode:
            self.llm.sleep(level=1)

    def wake(self) -> None:
        if self.sleep_mode:
            self.llm.wake_up()

    def weights(self, method: str, *args) -> list:
        """Every worker's answer (`common.weight_sync.call_receiver`) to `method` of its
        weight receiver. A load (commit, rollback) drops the prefixes cached with the old
        weights, also when it fails: it may have changed some weights already."""
        try:
            return self.llm.collective_rpc("r1ray_weights", args=(method, *args))
        finally:
            if method in ("commit", "rollback"):
                self.llm.reset_prefix_cache()


def _answers(out) -> list[dict]:
    """One vLLM RequestOutput as its n raw answers."""
    return [
        dict(
            response_ids=np.asarray(c.token_ids, dtype=np.int32),
            logprobs=np.asarray([lp[t].logprob for t, lp in zip(c.token_ids, c.logprobs)], dtype=np.float32),
            text=c.text,
            finish_reason="length" if c.finish_reason == "length" else "stop",
        )
        for c in out.outputs
    ]
