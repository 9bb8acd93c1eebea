"""The records that cross process boundaries: how to sample (`Sampling`), and one sampled
answer (`Sample`) and how answers are grouped.

The driver sends a `Sampling` with each generate call, a rollout actor returns `Sample`s,
reward workers fill in `reward` and `reward_breakdown`, the driver turns them into a train
batch. Token arrays travel as numpy arrays (never lists of floats) so Ray moves them
without pickling per element.

Invariants (checked by `Sample.__post_init__` and `check_groups`):
- `len(logprobs) == len(response_ids)`: one sampling log-prob per generated token;
- `finish_reason` is "stop" (stop string or end of sequence) or "length" (truncated);
- every group holds exactly G samples of one prompt, made by one weight version.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Sampling:
    """Sampling parameters of one generate call; both engine backends honour every field."""

    n: int
    """G: answers per prompt."""
    seed: int
    """Seed of this call; vLLM seeds prompt i with seed + i, so results do not depend on how
    prompts are batched or sharded over engines."""
    temperature: float = 1.0
    """0 means greedy decoding (top_p and top_k are then ignored)."""
    top_p: float = 1.0
    top_k: int = 0
    """0: no top-k cut."""
    max_new_tokens: int = 32
    stop: tuple[str, ...] = ()
    """Stop strings; the answer ends with the first one, which is kept in its text."""

    @classmethod
    def from_config(cls, cfg, n: int, seed: int, stop: tuple[str, ...] = (), greedy: bool = False) -> "Sampling":
        """Training sampling from a `RolloutConfig` (or greedy decoding for evaluation)."""
        return cls(n=n, seed=seed, temperature=0.0 if greedy else cfg.temperature, top_p=cfg.top_p,
                   top_k=cfg.top_k, max_new_tokens=cfg.max_new_tokens, stop=tuple(stop))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def truncates(self) -> bool:
        """Whether top-k or top-p cut the distribution (sampled from, so log-probs differ)."""
        return not self.greedy and (self.top_k > 0 or self.top_p < 1.0)

    def logprobs(self, logits, truncate: bool = True):
        """Log-probs [.., V] of the distribution sampled from: logits / temperature, then the
        top-k cut, then the top-p cut (tokens outside get -inf). Greedy: the raw log-softmax.

        This is vLLM's rule (its CPU sampler, `apply_top_k_top_p_pytorch`), step for step:
        keep the k largest logits, ties included; sort ascending and drop the tokens whose
        cumulative probability is <= 1 - top_p, always keeping the likeliest. Tokens tied at
        the top-p boundary are split by the order of one sort of the unmasked logits, as vLLM
        does (transformers' warpers sort after the top-k cut and may split them otherwise, so
        the transformers engine samples through this function too). The learner calls it on
        its own logits and so recomputes exactly what an engine reported. `truncate=False`
        applies the temperature only.
        """
        import torch

        if self.greedy:
            return torch.log_softmax(logits, -1)
        logits = logits / self.temperature
        k = min(self.top_k, logits.shape[-1]) if truncate else 0
        if truncate and self.top_p < 1.0:
            ascending, order = logits.sort(dim=-1)
            if k:
                ascending = ascending.masked_fill(ascending < ascending[..., -k:][..., :1], float("-inf"))
            drop = ascending.softmax(-1).cumsum(-1) <= 1.0 - self.top_p
            drop[..., -1] = False  # the likeliest token always stays
            logits = logits.scatter(-1, order, ascending.masked_fill(drop, float("-inf")))
        elif k:
            kth = torch.topk(logits, k, dim=-1).values[..., -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        return torch.log_softmax(logits, -1)


@dataclass
class Sample:
    prompt_id: str
    """Id of the task problem this answers; the G samples of a group share it."""
    prompt_ids: np.ndarray
    """int32 [P]: the prompt's token ids as the engine saw them."""
    response_ids: np.ndarray
    """int32 [R]: generated token ids, stop string included."""
    logprobs: np.ndarray
    """float32 [R]: the engine's log-prob of each generated token (at the sampling temperature)."""
    text: str
    """The decoded response."""
    finish_reason: str
    """ "stop" (stop string or end of sequence) or "length" (hit max_new_tokens: truncated)."""
    weight_version: int
    """Version of the policy weights that generated it (0 = the initial model)."""
    reward: float = 0.0
    """Total reward, filled in by a reward worker."""
    reward_breakdown: dict[str, float] = field(default_factory=dict)
    """Named reward components (e.g. correct, format) before weighting."""

    @property
    def truncated(self) -> bool:
        """The answer was cut by the token budget (the algorithm may mask it out)."""
        return self.finish_reason == "length"

    def __post_init__(self) -> None:
        if len(self.logprobs) != len(self.response_ids):
            raise ValueError(f"sample {self.prompt_id}: {len(self.logprobs)} log-probs for "
                             f"{len(self.response_ids)} response tokens")
        if self.finish_reason not in ("stop", "length"):
            raise ValueError(f"sample {self.prompt_id}: finish_reason {self.finish_reason!r} "
                             "is not 'stop' or 'length'")


def check_groups(samples: list[Sample], group_size: int) -> None:
    """Raise unless `samples` is contiguous groups of `group_size`, one prompt and version each."""
    if len(samples) % group_size:
        raise ValueError(f"{len(samples)} samples do not form groups of {group_size}")
    for start in range(0, len(samples), group_size):
        group = samples[start:start + group_size]
        if len({s.prompt_id for s in group}) != 1 or len({s.weight_version for s in group}) != 1:
            raise ValueError(f"group at {start} mixes prompts or weight versions: "
                             f"{[(s.prompt_id, s.weight_version) for s in group]}")
