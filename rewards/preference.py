"""The preference model as a reward: scores answers that no rule can check (R1's general data).

    scorer = ray.remote(PreferenceScorer).remote("runs/rm", "calibrated", batch_size=32, max_len=256)
    rewards = ray.get(scorer.score.remote(rendered_prompts, responses))

The folder is what `r1ray train-rm` writes (learner/reward_model.py): an HF
sequence-classification model with one label, its tokenizer, and `CALIBRATION_FILE` with the
mean and std of its raw scores on held-out pairs. Raw Bradley-Terry scores have an arbitrary
offset and scale, so before they mix with rule rewards (0 or 1) they are normalised:
"calibrated" maps the held-out scores' mean to 0.5 and one std to sigmoid(1) = 0.73.

The scorer tokenises prompt + answer exactly as training does (`encode` here,
keeping the last tokens so the answer is always seen) and reads the score at the last token.

Where the score is read: HF takes the rightmost token that is not `pad_token_id`. Batches are
right-padded (`pad_right`), so that is the last real token even when the pad id also occurs inside a
text (the tiny tokenizer's "<pad>", id 0, only does if the text spells it out); only a text
that ends with the pad token is read one token early. `set_pad_token` makes sure the id is set.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

CALIBRATION_FILE = "r1ray_reward_model.json"
"""Written by `r1ray train-rm` into the model folder: {"mean", "std", "held_out_accuracy", "pairs"}."""

RULES = ("calibrated", "sigmoid", "none")


def normalize(scores: np.ndarray, rule: str, stats: dict | None, clip: float = 0.0) -> np.ndarray:
    """Rewards from raw scores [N]: "calibrated" = sigmoid((s - mean) / std) with the held-out
    statistics `stats` (std floored at 1e-6), "sigmoid" = sigmoid(s), "none" = s; then, if
    `clip` > 0, min(reward, clip)."""
    if rule not in RULES:
        raise ValueError(f"preference normalisation {rule!r} is not known; choose one of {', '.join(RULES)}")
    scores = np.asarray(scores, dtype=np.float64)
    if rule == "sigmoid":
        scores = _sigmoid(scores)
    elif rule == "calibrated":
        if stats is None:
            raise ValueError(f"preference normalisation 'calibrated' needs the statistics in {CALIBRATION_FILE}, "
                             "which `r1ray train-rm` writes into the model folder; or use sigmoid or none")
        scores = _sigmoid((scores - stats["mean"]) / max(float(stats["std"]), 1e-6))
    return np.minimum(scores, clip) if clip > 0 else scores


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))  # = 1 / (1 + e^-x), without overflow for large |x|


def read_calibration(model_dir: str | Path) -> dict | None:
    """The held-out statistics saved with a reward model, or None if the folder has none."""
    path = Path(model_dir) / CALIBRATION_FILE
    return json.loads(path.read_text()) if path.is_file() else None


# ---- tokens -----------------------------------------------------------------------------------


def encode(tokenizer, texts: list[str], max_len: int) -> list[np.ndarray]:
    """Token ids of each text, keeping its LAST `max_len` tokens: a long prompt loses its
    beginning, never the answer that is being judged (the score is read at the end)."""
    return [np.asarray(ids[-max_len:], dtype=np.int64) for ids in tokenizer(texts)["input_ids"]]


def pad_right(seqs: list[np.ndarray], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids [N, L], attention mask [N, L]) with L the longest sequence, padded on the right."""
    width = max(len(s) for s in seqs)
    ids = np.full((len(seqs), width), pad_id, dtype=np.int64)  # [N, L]
    mask = np.zeros((len(seqs), width), dtype=np.int64)  # [N, L]
    for row, s in enumerate(seqs):
        ids[row, :len(s)], mask[row, :len(s)] = s, 1
    return ids, mask


def unpad(ids: np.ndarray, mask: np.ndarray) -> list[np.ndarray]:
    """The rows of right-padded ids [N, L] without their padding."""
    return [row[:n] for row, n in zip(ids, mask.sum(axis=1))]


def pad_token_id(tokenizer) -> int:
    """The id that pads reward-model batches: the tokenizer's pad token, else its eos."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError(f"the tokenizer of {tokenizer.name_or_path} has neither a pad nor an eos token; "
                         "the reward model needs one to pad batches")
    return int(pad)


def set_pad_token(model, tokenizer) -> int:
    """Give `model.config` a pad id (`pad_token_id(tokenizer)` unless it has one) and return it:
    HF's classification models need it to find each sequence's last token in a batch."""
    if model.config.pad_token_id is None:
        model.config.pad_token_id = pad_token_id(tokenizer)
    return int(model.config.pad_token_id)


def sequence_scores(model, ids: np.ndarray, mask: np.ndarray):
    """Scores [N] (float32) of right-padded sequences [N, L] under a sequence-classification
    model with one label (or a DeepSpeed engine around one)."""
    import torch

    module = getattr(model, "module", model)
    device = next(module.parameters()).device
    out = model(input_ids=torch.as_tensor(ids, device=device), attention_mask=torch.as_tensor(mask, device=device),
                use_cache=False)
    return out.logits[:, 0].float()  # [N]


class PreferenceScorer:
    """Holds a reward model (float32, eval mode) and scores batches of answers; run it as a
    Ray actor. `batch_size` answers per forward pass; at most `max_len` tokens per answer
    (prompt + response; a longer prompt loses its beginning)."""

    def __init__(self, model_dir: str, rule: str, batch_size: int, max_len: int, threads: int = 1, clip: float = 0.0):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        folder = Path(model_dir).expanduser()
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"rewards.preference_model={model_dir!r} is not a model folder (no "
                                    "config.json); give a folder written by `r1ray train-rm`")
        if rule not in RULES:
            raise ValueError(f"rewards.preference_normalize={rule!r} is not known; choose one of {', '.join(RULES)}")
        self.stats = read_calibration(folder)
        if rule == "calibrated" and self.stats is None:
            raise FileNotFoundError(f"{folder} has no {CALIBRATION_FILE}: rewards.preference_normalize=calibrated "
                                    "needs a folder written by `r1ray train-rm` (or use sigmoid or none)")
        torch.set_num_threads(threads)
        self.rule, self.batch_size, self.max_len, self.clip = rule, batch_size, max_len, clip
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.model = AutoModelForSequenceClassification.from_pretrained(folder, dtype=torch.float32).eval()
        self.pad_id = set_pad_token(self.model, self.tokenizer)

    def score(self, prompts: list[str], responses: list[str]) -> list[float]:
        """Normalised rewards of `responses` to the already rendered `prompts`, in input order.

        Answers are sorted by length so each batch pads to lengths like its own (right
        padding, which the last-token read and the scores do not depend on)."""
        import torch

        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses; give one prompt per response")
        if not prompts:
            return []
        seqs = encode(self.tokenizer, [p + r for p, r in zip(prompts, responses)], self.max_len)
        order = np.argsort([len(s) for s in seqs], kind="stable")
        raw = np.zeros(len(seqs), dtype=np.float64)  # [N], in input order
        with torch.no_grad():
            for start in range(0, len(order), self.batch_size):
                rows = order[start:start + self.batch_size]
                ids, mask = pad_right([seqs[i] for i in rows], self.pad_id)  # [n, L]
                raw[rows] = sequence_scores(self.model, ids, mask).numpy()
        return normalize(raw, self.rule, self.stats, self.clip).tolist()
