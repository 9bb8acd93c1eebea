"""`r1ray train-rm`: train the preference model of R1's last RL stage from pairwise JSONL.

    r1ray train-rm --data pairs.jsonl --out runs/rm [--config FILE] [key=value ...]

Each row of the data is {"prompt", "chosen", "rejected"[, "id"]}: a bare question and two
answers to it, the first preferred. The base model is `model.path` ("tiny", "smollm2" or a
folder); prompts are rendered with the run's template (`task.template`) so the model judges
the same text it will see in RL, and prompt + answer keeps its last `rollout.max_model_len`
tokens. `learner.*` sets the ranks, ZeRO stage, precision and micro-batches;
`reward_model.*` the epochs, batch, learning rate and held-out share. Pairs whose prompt is
in the run's held-out split (the config's task mixture; in a pipeline, also the questions it
evaluates the policy on) are dropped: a reward model that has seen the evaluation questions
would leak their answers into the final RL.

The output folder is an HF sequence-classification model with its tokenizer and
rewards/preference.CALIBRATION_FILE (held-out accuracy and score statistics); RL uses it with
`rewards.preference_model=DIR`. It appears only when complete (written next to it, then
renamed), so an interrupted run leaves no half folder.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import tempfile
from pathlib import Path

import numpy as np

from cluster import placement
from cluster.config import Config, ConfigError
from learner.reward_model import Pair, load_pairs, split_pairs
from learner.schedule import lr_at
from rewards.data import drop_held_out
from rewards.preference import CALIBRATION_FILE, encode, pad_right, pad_token_id
from rewards.tasks import HeldOut


def read_pairs(data: str | Path, what: str, held_out: HeldOut, eval_fraction: float) -> tuple[list[Pair], list[Pair]]:
    """(train, held-out) pairs of `data`: those whose prompt is `held_out` (the run's held-out
    split) dropped, the rest split by prompt (`split_pairs`) for the model's own accuracy."""
    pairs = drop_held_out(load_pairs(data, what), held_out, what, data, question=lambda pair: pair.prompt)
    return split_pairs(pairs, eval_fraction)


def train_reward_model(cfg: Config, data: str, out_dir: str | Path, model_path: str,
                       what: str = "train-rm", *, held_out: HeldOut) -> dict[str, float]:
    """Train a Bradley-Terry reward model on the pairs of `data` whose prompt is not `held_out`,
    from the causal LM `model_path`, write it to `out_dir` and return its metrics."""
    import ray
    from transformers import AutoTokenizer

    out = Path(out_dir).expanduser()
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"{out} already exists and is not empty; the reward model goes to a new folder")
    train, held_pairs = read_pairs(data, what, held_out, cfg.reward_model.eval_fraction)
    if min(cfg.reward_model.batch_size, len(train)) < cfg.learner.num_ranks:
        raise ConfigError(f"a step of {min(cfg.reward_model.batch_size, len(train))} pairs cannot feed "
                          f"learner.num_ranks={cfg.learner.num_ranks} ranks; raise reward_model.batch_size "
                          "or give more pairs")
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    pad_id = pad_token_id(tokenizer)
    train_c, train_r = _tokenize(cfg, model_path, tokenizer, train)
    held_c, held_r = _tokenize(cfg, model_path, tokenizer, held_pairs)
    trainers, group = _start_trainers(cfg, model_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        history = _train(cfg, trainers, train_c, train_r, pad_id)
        calibration = _calibrate(cfg, trainers, held_c, held_r, pad_id)
        ray.get([t.save.remote(str(tmp), model_path) for t in trainers], timeout=cfg.cluster.timeout_s)
        (tmp / CALIBRATION_FILE).write_text(json.dumps(calibration, indent=2))
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        placement.release(trainers, group)
    last = history[-10:]
    return {"rm/train_loss": float(np.mean([m["loss"] for m in last])),
            "rm/train_accuracy": float(np.mean([m["accuracy"] for m in last])),
            "rm/held_out_accuracy": calibration["held_out_accuracy"], "rm/held_out_pairs": float(len(held_c)),
            "rm/steps": float(len(history))}


def _calibrate(cfg: Config, trainers: list, chosen: list[np.ndarray], rejected: list[np.ndarray],
               pad_id: int) -> dict:
    """Pairwise accuracy on the held-out pairs, and the mean and std of all their scores
    (chosen and rejected together), which rewards.preference.normalize calibrates with."""
    import ray

    # Under ZeRO-3 a forward pass gathers weights from every rank: all score, rank 0's counts.
    scorers = trainers if cfg.learner.zero_stage == 3 else trainers[:1]
    ids, mask = pad_right(chosen + rejected, pad_id)  # [2H, L]
    scores = ray.get([t.scores.remote(ids, mask) for t in scorers], timeout=cfg.cluster.timeout_s)[0]  # [2H]
    won = scores[:len(chosen)] > scores[len(chosen):]  # [H]
    return {"mean": float(scores.mean()), "std": float(scores.std()), "held_out_accuracy": float(won.mean()),
            "pairs": len(chosen)}


def _tokenize(cfg: Config, model_path: str, tokenizer, pairs: list[Pair]) -> tuple[list, list]:
    """Token ids of rendered prompt + chosen, and of rendered prompt + rejected, per pair."""
    from cluster.prompts import prompt_format

    fmt = prompt_format(cfg, model_path)
    prompts = [fmt.render(p.prompt) for p in pairs]
    max_len = cfg.rollout.max_model_len
    return (encode(tokenizer, [q + p.chosen for q, p in zip(prompts, pairs)], max_len),
            encode(tokenizer, [q + p.rejected for q, p in zip(prompts, pairs)], max_len))


def _start_trainers(cfg: Config, model_path: str) -> tuple[list, object]:
    """The RewardTrainer ranks, placed as the policy's learner ranks are; returns them
    (constructed) and their placement group."""
    import ray

    from cluster.train import start_learners
    from learner.reward_model import RewardTrainer

    trainers, group = start_learners(cfg, RewardTrainer, model_path, cfg.learner, cfg.algorithm.seed)
    try:  # constructors run remotely: wait here so a failure surfaces at start-up
        ray.get([t.__ray_ready__.remote() for t in trainers], timeout=cfg.cluster.timeout_s)
    except BaseException:
        placement.release(trainers, group)
        raise
    return trainers, group


def _train(cfg: Config, trainers: list, chosen: list[np.ndarray], rejected: list[np.ndarray],
           pad_id: int) -> list[dict[str, float]]:
    """ceil(epochs * pairs / batch_size) optimizer steps on shuffled batches, each split evenly
    over the ranks; returns each step's loss and accuracy (averaged over its pairs)."""
    import ray
    from tqdm import tqdm

    rm = cfg.reward_model
    steps = math.ceil(rm.epochs * len(chosen) / rm.batch_size)
    batches = batch_order(len(chosen), min(rm.batch_size, len(chosen)), steps, random.Random(cfg.algorithm.seed))
    bar = tqdm(batches, desc="reward model", unit="step", dynamic_ncols=True, disable=not cfg.logging.progress)
    history = []
    for step, batch in enumerate(bar):
        shards = np.array_split(np.asarray(batch), len(trainers))
        lr = lr_at(rm.lr, step + 1, max(1, math.ceil(0.1 * steps)))  # warm-up over the first tenth, then constant
        results = ray.get([
            t.train_step.remote(*pad_right([chosen[i] for i in shard], pad_id),
                                *pad_right([rejected[i] for i in shard], pad_id), lr)
            for t, shard in zip(trainers, shards)], timeout=cfg.cluster.timeout_s)
        sizes = [len(s) for s in shards]
        history.append({k: float(np.average([r[k] for r in results], weights=sizes)) for k in ("loss", "accuracy")})
        bar.set_postfix(loss=f"{history[-1]['loss']:.3f}", refresh=False)
    return history


def batch_order(n: int, batch_size: int, steps: int, rng: random.Random) -> list[list[int]]:
    """`steps` batches of `batch_size` indices into n pairs: a stream of shuffled epochs, cut
    into batches (a batch may straddle two epochs, so fractional epochs work)."""
    stream: list[int] = []
    while len(stream) < steps * batch_size:
        epoch = list(range(n))
        rng.shuffle(epoch)
        stream += epoch
    return [stream[i * batch_size:(i + 1) * batch_size] for i in range(steps)]


