"""The train batch: samples padded into arrays, and how it is cut into shards and micro-batches.

Shapes (letters fixed for the project): N sequences (N = B prompts * G answers), L padded
length of prompt + response. Targets are shifted by one: position t of a [N, L-1] array is
about token t+1, predicted from tokens 0..t.

Invariants: `loss_mask[i, t] == 1` only where token t+1 of sequence i is a response token;
`sampling_logprobs` is 0 wherever `loss_mask` is 0; padding is on the right, so the causal
model never attends to it before the real tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class TrainBatch:
    input_ids: np.ndarray
    """int64 [N, L]: prompt then response, right-padded."""
    attention_mask: np.ndarray
    """int64 [N, L]: 1 on real tokens."""
    loss_mask: np.ndarray
    """float32 [N, L-1]: 1 where the target token is a response token."""
    advantages: np.ndarray | None = None
    """float32 [N]: one advantage per sequence (None for SFT batches)."""
    sampling_logprobs: np.ndarray | None = None
    """float32 [N, L-1]: the engine's log-prob of each target response token (None for SFT)."""
    segment_ids: np.ndarray | None = None
    """int64 [N, L]: packed SFT rows only (learner/sft.py): which example of the row each
    token belongs to (1, 2, ...; 0 is padding); examples never attend to each other."""

    def __len__(self) -> int:
        return len(self.input_ids)

    @classmethod
    def placeholder(cls) -> "TrainBatch":
        """One sequence of two real tokens with nothing to learn (loss mask 0, advantage 0):
        a micro-batch that runs the collectives of a forward and backward and weighs nothing."""
        return cls(np.zeros((1, 2), dtype=np.int64), np.ones((1, 2), dtype=np.int64),
                   np.zeros((1, 1), dtype=np.float32), np.zeros(1, dtype=np.float32),
                   np.zeros((1, 1), dtype=np.float32))

    def select(self, rows: slice | np.ndarray) -> "TrainBatch":
        """The sequences in `rows` (a slice or an index array), with padding columns beyond
        their longest sequence cut."""
        lengths = self.attention_mask[rows].sum(axis=1)
        length = max(int(lengths.max()) if len(lengths) else 0, 2)
        return TrainBatch(
            input_ids=self.input_ids[rows, :length],
            attention_mask=self.attention_mask[rows, :length],
            loss_mask=self.loss_mask[rows, : length - 1],
            advantages=None if self.advantages is None else self.advantages[rows],
            sampling_logprobs=(None if self.sampling_logprobs is None
                               else self.sampling_logprobs[rows, : length - 1]),
            segment_ids=None if self.segment_ids is None else self.segment_ids[rows, :length],
        )

    def split(self, k: int) -> list["TrainBatch"]:
        """`k` contiguous parts of (almost) equal size; empty ones only when there are fewer
        than `k` sequences (a learner rank then pads its micro-batches, learner/learner.py)."""
        if k < 1:
            raise ValueError(f"cannot split {len(self)} sequences into {k} parts")
        bounds = np.linspace(0, len(self), k + 1).round().astype(int)
        return [self.select(slice(a, b)) for a, b in zip(bounds[:-1], bounds[1:])]


def collate(prompt_ids: list[np.ndarray], response_ids: list[np.ndarray], pad_id: int,
            advantages: np.ndarray | None = None,
            sampling_logprobs: list[np.ndarray] | None = None) -> TrainBatch:
    """Pad prompt+response pairs into a `TrainBatch` (responses are the trained tokens)."""
    n = len(prompt_ids)
    length = max(len(p) + len(r) for p, r in zip(prompt_ids, response_ids))
    input_ids = np.full((n, length), pad_id, dtype=np.int64)  # [N, L]
    attention_mask = np.zeros((n, length), dtype=np.int64)  # [N, L]
    loss_mask = np.zeros((n, length - 1), dtype=np.float32)  # [N, L-1]
    logprobs = np.zeros((n, length - 1), dtype=np.float32) if sampling_logprobs is not None else None
    for i, (p, r) in enumerate(zip(prompt_ids, response_ids)):
        end = len(p) + len(r)
        input_ids[i, :end] = np.concatenate([p, r])
        attention_mask[i, :end] = 1
        # Target t is token t+1, so response token j (at len(p)+j) is target len(p)+j-1.
        loss_mask[i, len(p) - 1 : end - 1] = 1.0
        if logprobs is not None:
            logprobs[i, len(p) - 1 : end - 1] = sampling_logprobs[i]
    adv = None if advantages is None else np.asarray(advantages, dtype=np.float32)
    return TrainBatch(input_ids, attention_mask, loss_mask, adv, logprobs)
