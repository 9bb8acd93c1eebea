"""The transformers rollout engine: `generate` behind the same interface as the vLLM engine.

The fallback where vLLM cannot run (an architecture it lacks, a platform without a build).
It returns exactly what the vLLM engine returns, with the same meaning:

- log-probs are "processed", like vLLM's `processed_logprobs`: the log-softmax of the
  logits after temperature and the top-k / top-p cut, i.e. of the distribution sampled
  from (`Sampling.logprobs`, the rule the learner applies too; greedy decoding reports the
  raw log-softmax, as vLLM does);
- an answer ends at the end-of-sequence token (kept in its token ids) or after the first
  stop string (kept in its text); otherwise it is cut at `max_new_tokens` ("length").

Differences: one seed per call rather than per prompt, so samples depend on how prompts
are batched (still reproducible for the same call); no prefix cache; slower (see
bench/rollout.py).
"""

from __future__ import annotations

import numpy as np

from common.records import Sampling
from common.weight_sync import WeightReceiver, call_receiver


class TransformersEngine:
    def __init__(self, model_path: str, dtype: str = "float32", device: str = "cpu"):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.device = device
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, dtype))
        self.model.to(device).eval().requires_grad_(False)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None \
            else self.tokenizer.eos_token_id
        self.receiver = WeightReceiver(model_path, self.load_weights)
        self.shares_memory = True  # the weights live in the rollout actor's own process

    def generate_stream(self, prompts: list[list[int]], sampling: Sampling):
        """`generate`'s answers as (prompt index, answers) pairs, all at once at the end: this
        engine decodes the batch in lockstep, so no group is done before the others."""
        if prompts:
            yield list(enumerate(self.generate(prompts, sampling)))

    def generate(self, prompts: list[list[int]], sampling: Sampling) -> list[list[dict]]:
        """`sampling.n` answers per prompt (token-id lists), as the vLLM engine returns them."""
        import torch
        from transformers import GenerationConfig

        if not prompts:
            return []
        width = max(len(p) for p in prompts)
        # Left padding: every prompt ends where generation starts.
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)  # [B, P]
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompts):
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        n = sampling.n
        ids, mask = ids.repeat_interleave(n, 0).to(self.device), mask.repeat_interleave(n, 0).to(self.device)
        # A fresh config: nothing from the model's generation_config.json (penalties, its own
        # temperature) may change what is sampled. transformers' own warpers are off (top_k 0,
        # top_p 1, temperature 1): tokens are drawn from `Sampling.logprobs`, vLLM's rule,
        # which the learner recomputes (transformers' top-p splits tied logits differently).
        warpers = {} if sampling.greedy else dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0)
        config = GenerationConfig(
            max_new_tokens=sampling.max_new_tokens, **warpers,
            eos_token_id=self.tokenizer.eos_token_id, pad_token_id=self.pad_id,
            stop_strings=list(sampling.stop) or None,
            return_dict_in_generate=True, output_logits=True)
        processors = [] if sampling.greedy else [lambda _, scores: sampling.logprobs(scores.float())]
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(sampling.seed)
            out = self.model.generate(input_ids=ids, attention_mask=mask, generation_config=config,
                                      logits_processor=processors, tokenizer=self.tokenizer)
        tokens = out.sequences[:, width:]  # [B*n, T]
        logprobs = torch.stack([sampling.logprobs(step.float())
                                .gather(-1, tokens[:, t, None]).squeeze(-1)
                                for t, step in enumerate(out.logits)], dim=1)  # [B*n, T]
        answers = [self._answer(tokens[row].tolist(), logprobs[row].cpu().numpy(), sampling)
                   for row in range(len(tokens))]
        return [answers[i * n:(i + 1) * n] for i in range(len(prompts))]

    def _answer(self, ids: list[int], logprobs: np.ndarray, sampling: Sampling) -> dict:
        """Cut one generated row where the answer ended, as vLLM would have stopped it."""
        decode = lambda k: self.tokenizer.decode(ids[:k], skip_special_tokens=True)  # noqa: E731
        end, reason = len(ids), "length"
        if self.tokenizer.eos_token_id in ids:
            end, reason = ids.index(self.tokenizer.eos_token_id) + 1, "stop"
        if sampling.stop and any(s in decode(end) for s in sampling.stop):
            lo, hi = 1, end  # the shortest prefix whose text holds a stop string
            while lo < hi:
                mid = (lo + hi) // 2
                lo, hi = (lo, mid) if any(s in decode(mid) for s in sampling.stop) else (mid + 1, hi)
            end, reason = lo, "stop"
        # Like vLLM's incremental detokenizer, drop the bytes of a character left unfinished.
        text = decode(end).rstrip("\ufffd")
        cuts = [text.index(s) + len(s) for s in sampling.stop if s in text]
        if cuts:
            text = text[:min(cuts)]
        return dict(response_ids=np.asarray(ids[:end], dtype=np.int32),
                    logprobs=logprobs[:end].astype(np.float32), text=text, finish_reason=reason)

    def score(self, token_ids: np.ndarray) -> np.ndarray:
        """Raw (temperature 1) log-probs [T-1] of tokens 1..T-1 of a sequence given their prefix."""
        import torch

        ids = torch.as_tensor(np.asarray(token_ids, dtype=np.int64), device=self.device)[None]  # [1, T]
        with torch.no_grad():
            logits = self.model(input_ids=ids).logits[0, :-1].float()  # [T-1, V]
        return torch.log_softmax(logits, -1).gather(-1, ids[0, 1:, None]).squeeze(-1).cpu().numpy()

    def sleep(self) -> None:
        """Free the device memory: the model moves to host memory until `wake` (on CPU: no-op)."""
        import torch

        if self.device != "cpu":
            self.model.to("cpu")
            torch.cuda.empty_cache()

    def wake(self) -> None:
        self.model.to(self.device)

    def weights(self, method: str, *args) -> list:
        """The answer (`common.weight_sync.call_receiver`) of this engine's one weight
        receiver to `method`, as the one worker of an engine."""
        return [call_receiver(self.receiver, method, args)]

    def load_weights(self, named: list) -> None:
        """Copy a whole model's HF-named tensors into the parameters in place."""
        import torch

        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, tensor in named:
                params[name].copy_(tensor)
