"""The preference (reward) model of DeepSeek-R1's last RL stage: Bradley-Terry on answer pairs.

R1 rewards general-domain answers, which no rule can check, with a model trained on human
preference pairs (paper, section 2.3.4). Here that model is a causal LM with a new scalar
head (HF `...ForSequenceClassification`, num_labels=1): the score s(x) of a text x is the
head's output at its last token, and pairs (prompt, chosen, rejected) train it to maximise
log sigmoid(s(prompt+chosen) - s(prompt+rejected)), the Bradley-Terry likelihood.

    pairs = load_pairs("pairs.jsonl", "train-rm")
    train, held_out = split_pairs(pairs, 0.1)

This module holds the pure pieces (the loss, reading and splitting pairs) and
`RewardTrainer`, one DeepSpeed ZeRO data-parallel rank per Ray actor (learner/rank.py) like
the policy's learner.
The driver is recipes/reward_model.py (`r1ray train-rm`); rewards/preference.py serves it and
holds the tokenising, padding and score readout that training and serving share.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from learner.config import LearnerConfig
from learner.rank import DeepSpeedRank, global_sum
from rewards.data import DatasetError, read_jsonl
from rewards.preference import pad_right, sequence_scores, set_pad_token, unpad

# ---- the loss ---------------------------------------------------------------------------------


def bradley_terry_loss(chosen, rejected):
    """(mean of -log sigmoid(chosen - rejected), share of pairs with chosen > rejected).

    `chosen` and `rejected` are float tensors [N] of scalar scores, pair i in row i. The
    loss is the negative log-likelihood that each chosen answer is preferred under the
    Bradley-Terry model P(chosen > rejected) = sigmoid(s_c - s_r); logsigmoid keeps it
    finite for large margins. Accuracy is a python float, for logging.
    """
    import torch.nn.functional as F

    margin = chosen - rejected  # [N]
    loss = -F.logsigmoid(margin).mean()
    accuracy = float((margin > 0).float().mean())
    return loss, accuracy


# ---- pairs ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pair:
    """One preference: for `prompt` (a bare question), answer `chosen` beats `rejected`."""

    prompt: str
    chosen: str
    rejected: str
    id: str


def load_pairs(path: str | Path, what: str) -> list[Pair]:
    """The pairs of a JSONL file of {"prompt", "chosen", "rejected"[, "id"]} rows.

    Ids are the row's "id", else "<file name>:<row index>" (0-based, blank lines skipped).
    Errors name `what` reads the file, the line and the field (rewards.data.read_jsonl).
    """
    rows = read_jsonl(path, ("prompt", "chosen", "rejected"), what)
    name = Path(path).name
    return [Pair(r["prompt"], r["chosen"], r["rejected"], str(r.get("id", f"{name}:{i}")))
            for i, r in enumerate(rows)]


def split_pairs(pairs: list[Pair], eval_fraction: float) -> tuple[list[Pair], list[Pair]]:
    """(train, held out): all pairs of one prompt on the same side, so the held-out accuracy
    measures answers to unseen questions. Deterministic and stable as the file grows: a
    prompt is held out when crc32(prompt) % 1000 < eval_fraction * 1000."""
    cut = eval_fraction * 1000
    held = [zlib.crc32(p.prompt.encode("utf-8")) % 1000 < cut for p in pairs]
    train = [p for p, h in zip(pairs, held) if not h]
    held_out = [p for p, h in zip(pairs, held) if h]
    if not train or not held_out:
        raise DatasetError(f"splitting {len(pairs)} pairs by prompt with eval_fraction={eval_fraction:g} "
                           f"left {len(train)} to train and {len(held_out)} held out; both need pairs "
                           "(more distinct prompts, or another reward_model.eval_fraction)")
    return train, held_out


# ---- the trainer: one DeepSpeed rank ----------------------------------------------------------


class RewardTrainer(DeepSpeedRank):
    """One data-parallel rank of Bradley-Terry training; create `cfg.num_ranks` of these as Ray
    actors (recipes/reward_model.py). Every ZeRO stage works: under ZeRO-3 every rank must
    call `scores` (with the same data) and `save` together, since both gather the weights.

    Loss normalisation is the rank's (learner/rank.py): each micro-batch's loss is weighted by
    its share of the step's pairs over all ranks.
    """

    def __init__(self, model_path: str, cfg: LearnerConfig, seed: int, rank: int, master_addr: str,
                 master_port: int):
        """`seed` makes the new score head start alike on every rank."""
        super().__init__(cfg, seed, rank, master_addr, master_port)
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        # From a causal LM folder: the LM head is dropped, the score head [1, hidden] is new.
        model = AutoModelForSequenceClassification.from_pretrained(
            model_path, num_labels=1, dtype=torch.float32, attn_implementation=self.attention)
        self.pad_id = set_pad_token(model, AutoTokenizer.from_pretrained(model_path))
        self._start_engine(model)

    def train_step(self, chosen_ids: np.ndarray, chosen_mask: np.ndarray, rejected_ids: np.ndarray,
                   rejected_mask: np.ndarray, lr: float) -> dict[str, float]:
        """One optimizer step on this rank's pairs: right-padded ids and masks [N, Lc], [N, Lr]
        (pair i in row i of both). Chosen and rejected answers of a micro-batch go through one
        forward pass together. Returns this rank's mean loss and accuracy, and the grad norm."""
        chosen, rejected = unpad(chosen_ids, chosen_mask), unpad(rejected_ids, rejected_mask)
        n, step = len(chosen), self.cfg.micro_batch_size
        total = global_sum(n, self.device)  # pairs over all ranks
        loss_sum = correct = 0.0
        for start in range(0, n, step):
            m = len(chosen[start:start + step])
            ids, mask = pad_right(chosen[start:start + step] + rejected[start:start + step], self.pad_id)  # [2m, L]
            scores = sequence_scores(self.engine, ids, mask)  # [2m]: chosen then rejected
            loss, accuracy = bradley_terry_loss(scores[:m], scores[m:])
            self.engine.backward(loss * (m / total * self.cfg.num_ranks), scale_wrt_gas=False)
            loss_sum, correct = loss_sum + loss.item() * m, correct + accuracy * m
        grad_norm = self._optimizer_step(lr)
        return {"loss": loss_sum / n, "accuracy": correct / n, "grad_norm": grad_norm}

    def scores(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """Scores [N] (float32) of right-padded sequences [N, L], without gradients."""
        import torch

        seqs, step = unpad(ids, mask), 2 * self.cfg.micro_batch_size  # a training micro-batch's rows
        modes = {module: module.training for module in self.engine.module.modules()}
        self.engine.eval()
        try:
            with torch.no_grad():
                parts = [sequence_scores(self.engine, *pad_right(seqs[i:i + step], self.pad_id)).cpu().numpy()
                         for i in range(0, len(seqs), step)]
        finally:  # each module's own mode back (rank.checkpoint_layers sets only the layers')
            for module, training in modes.items():
                module.training = training
        return np.concatenate(parts)
