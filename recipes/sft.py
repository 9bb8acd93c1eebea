"""Supervised fine-tuning on JSONL traces: R1's cold start, its SFT on rejection-sampled data
mixed with general data, and distillation's student training.

    metrics = sft(cfg, model_path, "traces.jsonl", "out/model", "stage cold_start", held_out=mixture.held_out)

Each row is {"prompt": question, "response": what follows the rendered prompt}; the prompt is
rendered as the policy sees it in RL (cluster/prompts.py), so SFT and RL agree on where an
answer starts. Examples are packed into rows of `rollout.max_model_len` tokens
(learner/sft.py: no attention across examples, loss on response tokens only) and trained on
the same DeepSpeed learner ranks as RL (`Learner.sft_step`). With `sft.mix_path`, each epoch
adds `sft.mix_ratio` general rows per main row, drawn with replacement. Rows of either file
whose question is in the run's held-out split (`held_out`) are dropped, and counted.
"""

from __future__ import annotations

import dataclasses
import math
import random
from pathlib import Path

import numpy as np

from cluster import placement
from cluster.config import Config
from cluster.prompts import PromptFormat, prompt_format
from learner.schedule import lr_at
from learner.sft import Example, pack
from rewards.data import drop_held_out, read_jsonl
from rewards.tasks import HeldOut


def load_examples(path: str | Path, tokenizer, fmt: PromptFormat, what: str, held_out: HeldOut) -> list[Example]:
    """The prompt/response rows of `path` whose question is not `held_out`, tokenized (errors
    name `what`, the file, the line and the field). Without stop strings (chat template) the
    answer ends with end-of-sequence."""
    rows = drop_held_out(read_jsonl(path, ("prompt", "response"), what), held_out, what, path)
    eos = [tokenizer.eos_token_id] if not fmt.stop and tokenizer.eos_token_id is not None else []
    prompts = tokenizer([fmt.render(r["prompt"]) for r in rows])["input_ids"]
    responses = tokenizer([r["response"] for r in rows], add_special_tokens=False)["input_ids"]
    return [Example(np.asarray(p, dtype=np.int64), np.asarray(r + eos, dtype=np.int64))
            for p, r in zip(prompts, responses)]


def epoch_examples(main: list[Example], general: list[Example], ratio: float, rng: random.Random) -> list[Example]:
    """One epoch: every main example and round(ratio * len(main)) general ones drawn with
    replacement, shuffled together."""
    extra = [rng.choice(general) for _ in range(round(ratio * len(main)))] if general else []
    epoch = main + extra
    rng.shuffle(epoch)
    return epoch


def sft(cfg: Config, model_path: str, data: str | Path, out_dir: str | Path, what: str, *,
        held_out: HeldOut) -> dict[str, float]:
    """Fine-tune `model_path` on `data` (plus `sft.mix_path` at `sft.mix_ratio`), without the
    rows whose question is `held_out`, and write the result to `out_dir` as an HF folder
    (atomically); returns the run's metrics. Bad data stops it before any actor starts."""
    import ray
    from tqdm import tqdm
    from transformers import AutoTokenizer

    from cluster.train import start_learners
    from learner.learner import RAW, Learner

    c, max_len = cfg.sft, cfg.rollout.max_model_len
    tokenizer, fmt = AutoTokenizer.from_pretrained(model_path), prompt_format(cfg, model_path)
    main = load_examples(data, tokenizer, fmt, what, held_out)
    general = load_examples(c.mix_path, tokenizer, fmt, f"{what} (sft.mix_path)", held_out) if c.mix_ratio > 0 else []
    rows_per_step = max(cfg.learner.num_ranks, c.tokens_per_step // max_len)
    rng = random.Random(cfg.algorithm.seed)
    epochs = [pack(epoch_examples(main, general, c.mix_ratio, rng), max_len, tokenizer.pad_token_id or 0)
              for _ in range(math.ceil(c.epochs))]
    rows = sum(len(e) for e in epochs[:-1]) + round(len(epochs[-1]) * (c.epochs - math.ceil(c.epochs) + 1))
    steps = max(1, math.ceil(rows / rows_per_step))
    algo = dataclasses.replace(cfg.algorithm, kl_beta=0.0)  # no reference model
    learners, group = start_learners(cfg, Learner, model_path, cfg.learner, algo, RAW)
    timeout = cfg.cluster.timeout_s
    losses = []
    bar = tqdm(range(steps), desc=what, unit="step", dynamic_ncols=True, disable=not cfg.logging.progress)
    batches = (epoch.select(slice(a, a + rows_per_step)) for epoch in epochs
               for a in range(0, len(epoch), rows_per_step))
    for step, batch in zip(bar, batches):
        if len(batch) < len(learners):  # an epoch's last rows, fewer than the ranks: next epoch
            continue
        shards = batch.split(len(learners))
        # Warm-up over the first tenth of the steps, then cosine decay toward a tenth of the peak.
        lr = lr_at(c.lr, step + 1, max(1, steps // 10), total=steps)
        first, *_ = ray.get([l.sft_step.remote(s, lr) for l, s in zip(learners, shards)], timeout=timeout)
        losses.append(first["loss"])
        bar.set_postfix(loss=f"{first['loss']:.3f}", refresh=False)
    bar.close()
    _save_atomic(learners, Path(out_dir), model_path, timeout, kind="sft", step=len(losses), base=model_path,
                 data=str(data))
    placement.release(learners, group)
    n = max(1, len(losses) // 10)
    return {"sft/examples": float(len(main)), "sft/general_examples": float(round(c.mix_ratio * len(main))) if general
            else 0.0, "sft/steps": float(len(losses)), "sft/loss_first": float(np.mean(losses[:n])),
            "sft/loss_last": float(np.mean(losses[-n:]))}


def _save_atomic(learners: list, out_dir: Path, tokenizer_dir: str, timeout: float, **provenance) -> None:
    """Every rank takes part (ZeRO gathers); the folder appears only when complete."""
    import shutil

    import ray

    from learner.models import write_provenance

    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    ray.get([l.save.remote(str(tmp), tokenizer_dir) for l in learners], timeout=timeout)
    write_provenance(tmp, **provenance)
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
