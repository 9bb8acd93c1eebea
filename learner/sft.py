"""Supervised fine-tuning data: prompt/response examples packed into fixed-length rows.

    rows = pack([Example(prompt_ids, response_ids), ...], max_len=256)   # -> TrainBatch
    learner.sft_step(rows.split(num_ranks)[rank], lr)

Packing puts several examples in one row so that a step spends no compute on padding; the
answers of reasoning traces vary from tens to hundreds of tokens, and padded batches of them
are mostly padding. Two things keep a packed row equal to its examples trained apart:
- `segment_ids` number the examples of a row (1, 2, ...; 0 is padding). The learner turns
  them into a block-diagonal causal attention mask, so no token attends to another
  example's, and restarts the positions at 0 with each example (rotary embeddings see the
  same positions as unpacked). tests/test_sft.py checks the logits match unpacked ones.
- `loss_mask` is 1 only where the target is a response token: prompt tokens carry no loss,
  and neither does the first token of the next example (it is not predicted from this one).

Pure numpy: imports neither Ray nor torch (STYLE.md point 9).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from learner.batch import TrainBatch


@dataclass(frozen=True)
class Example:
    prompt_ids: np.ndarray
    """int [P]: the rendered prompt's tokens (no loss)."""
    response_ids: np.ndarray
    """int [R]: the answer's tokens (the loss is on these)."""

    def __len__(self) -> int:
        return len(self.prompt_ids) + len(self.response_ids)


def pack(examples: list[Example], max_len: int, pad_id: int = 0) -> TrainBatch:
    """Pack `examples`, in order, into rows of at most `max_len` tokens (first fit: each
    example goes into the first row with room, so the order within a row is kept)."""
    too_long = [i for i, e in enumerate(examples) if len(e) > max_len]
    if too_long:
        i = too_long[0]
        raise ValueError(f"{len(too_long)} example(s) are longer than {max_len} tokens (the first, "
                         f"number {i}, has {len(examples[i])}); raise rollout.max_model_len or shorten them")
    if not examples:
        raise ValueError("nothing to pack: no examples")
    rows: list[list[Example]] = []
    free: list[int] = []
    for example in examples:
        for r, room in enumerate(free):
            if len(example) <= room:
                rows[r].append(example)
                free[r] -= len(example)
                break
        else:
            rows.append([example])
            free.append(max_len - len(example))
    length = max(max_len - room for room in free)
    ids = np.full((len(rows), length), pad_id, dtype=np.int64)  # [N, L]
    segments = np.zeros((len(rows), length), dtype=np.int64)  # [N, L]
    loss_mask = np.zeros((len(rows), length - 1), dtype=np.float32)  # [N, L-1]
    for r, row in enumerate(rows):
        at = 0
        for s, e in enumerate(row, 1):
            p, n = len(e.prompt_ids), len(e)
            ids[r, at:at + n] = np.concatenate([e.prompt_ids, e.response_ids])
            segments[r, at:at + n] = s
            loss_mask[r, at + p - 1:at + n - 1] = 1.0  # targets at+p .. at+n-1: the response
            at += n
    return TrainBatch(input_ids=ids, attention_mask=(segments > 0).astype(np.int64), loss_mask=loss_mask,
                      segment_ids=segments)


def positions(segment_ids: np.ndarray) -> np.ndarray:
    """int64 [N, L]: each token's position within its own example (0 on padding)."""
    pos = np.zeros_like(segment_ids)
    for r, row in enumerate(segment_ids):
        starts = np.flatnonzero(np.diff(row, prepend=-1))  # where a segment (or padding) begins
        run = np.arange(len(row)) - np.repeat(starts, np.diff(np.append(starts, len(row))))
        pos[r] = np.where(row > 0, run, 0)
    return pos


def allowed_attention(segment_ids: np.ndarray) -> np.ndarray:
    """bool [N, L, L]: query t may attend to key u iff u <= t and both are in one example
    (padding attends only to itself, so no row of the mask is empty)."""
    n, length = segment_ids.shape
    causal = np.tri(length, dtype=bool)  # [L, L]
    same = segment_ids[:, :, None] == segment_ids[:, None, :]  # [N, L, L]
    return same & causal
