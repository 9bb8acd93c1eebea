"""What each policy-optimisation option costs the learner's step, measured in one process on
one batch: the default job's learner (configs/default.yaml: the tiny Llama, one ZeRO-2 rank,
fp32, two updates per step) trains on the same batch under each option in turn, round after
round, the options in a new random order every round, so that a machine that slows down or
speeds up favours none of them. The table gives each option's median step and its fastest
(the step least disturbed by whatever else the machine ran), each against GRPO's. GRPO
appears twice ("grpo" and "grpo (again)"): the two are identical work, and their difference
is what this measurement cannot resolve.

    .venv/bin/python bench/step_cost.py                 # every option of bench/algorithms.py
    .venv/bin/python bench/step_cost.py --rounds 20 --variants gspo,cispo

The batch has the default job's shape: 16 arithmetic prompts of its task rendered in the R1
template, 8 answers each of 8 to `rollout.max_new_tokens` tokens (random ids; the cost of a
step does not depend on which tokens). That is more than a typical step of the default job
learns from (the groups whose rewards differ, ~15-token answers): the ratios are the point.
One step is `Learner.train_step` with learning rate 0 (so the weights stay as they are and
every round sees the same model), plus, for the KL in the reward, `Learner.sequence_kl` on
the batch, which the driver calls before the step. The options that need the reference model
load it (the policy's own start weights).
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.algorithms import COSTED  # noqa: E402

EXTRA_PASS = {"grpo + tis", "grpo + mis_token", "grpo + geo_mask", "grpo + kl k3 in the loss",
              "grpo + kl k1 in the reward"}
"""The options that run one more forward pass by definition: the reference model's (the KL),
or the learner's recompute of the old policy before the first of two updates (a mismatch
correction needs pi_old / pi_sampler, and with two updates pi_old is not the current policy)."""


def default_batch(cfg, model_path: str, seed: int = 0):
    """A TrainBatch of the default job's shape (module docstring)."""
    from transformers import AutoTokenizer

    from learner.batch import collate
    from rewards.format import render_prompt
    from rewards.tasks import build_mixture

    a, rng = cfg.algorithm, random.Random(seed)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    problems = build_mixture(cfg.task).sample(rng, a.prompts_per_step)
    prompts = [np.array(tokenizer(render_prompt(p.prompt))["input_ids"]) for p in problems]
    prompts = [p for p in prompts for _ in range(a.group_size)]
    draw = np.random.default_rng(seed)
    responses = [draw.integers(10, tokenizer.vocab_size, size=draw.integers(8, cfg.rollout.max_new_tokens + 1))
                 for _ in prompts]
    logprobs = [np.log(draw.uniform(0.05, 1.0, size=len(r))).astype(np.float32) for r in responses]
    advantages = draw.standard_normal(len(prompts)).astype(np.float32)
    return collate(prompts, responses, pad_id=tokenizer.pad_token_id or 0, advantages=advantages,
                   sampling_logprobs=logprobs)


def algorithm(overrides: list[str]):
    """The default job's AlgorithmConfig with a variant's overrides, resolved."""
    from cluster.config import load_config

    return load_config(REPO / "configs/default.yaml", overrides).algorithm.resolved()


def main() -> None:
    import torch

    from bench.machine import describe
    from cluster.config import load_config
    from cluster.train import resolve_model
    from common.net import free_port
    from common.records import Sampling
    from learner.learner import Learner

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", default=",".join(COSTED), help=f"comma-separated, of: {', '.join(COSTED)}")
    parser.add_argument("--rounds", type=int, default=12)
    args = parser.parse_args()
    variants = [v for v in args.variants.split(",") if v != "grpo"]
    for name in variants:
        if name not in COSTED:
            parser.error(f"{name!r} is not one of {', '.join(COSTED)}")
    variants = ["grpo", *variants, "grpo (again)"]

    cfg = load_config(REPO / "configs/default.yaml")
    model_path = resolve_model(cfg)
    batch = default_batch(cfg, model_path)
    sampling = Sampling.from_config(cfg.rollout, n=1, seed=0)
    learner = Learner(model_path, cfg.learner, cfg.algorithm, sampling, 0, "127.0.0.1", free_port())
    algos = {v: algorithm(COSTED[v.removesuffix(" (again)")]) for v in variants}
    steps = cfg.algorithm.updates_per_step

    def step(variant: str) -> float:
        learner.algo = algos[variant]
        wants_reference = learner.algo.kl_beta > 0
        if wants_reference and learner.reference is None:
            learner.load_reference(model_path)
        elif not wants_reference:
            learner.reference = None  # no reference pass is run without one
        start = time.perf_counter()
        if wants_reference and learner.algo.kl_in == "reward":
            learner.sequence_kl(batch)
        learner.train_step(batch, 0.0, steps)
        return time.perf_counter() - start

    print(describe("r1ray bench/step_cost.py " + " ".join(sys.argv[1:])) + f", torch threads {torch.get_num_threads()}",
          flush=True)
    for variant in variants:  # warm-up: the first pass of each allocates its buffers
        step(variant)
    times = {v: [] for v in variants}
    order = random.Random(0)
    for r in range(args.rounds):
        for variant in order.sample(variants, len(variants)):
            times[variant].append(step(variant))
        print(f"step_cost: round {r + 1}/{args.rounds}", file=sys.stderr, flush=True)

    base = statistics.quantiles(times["grpo"], n=4)[1]
    print(f"\n{len(batch)} sequences of up to {batch.input_ids.shape[1]} tokens, {steps} updates per step, "
          f"{args.rounds} rounds in random order; median and interquartile range of one step")
    fastest = min(times["grpo"])
    print("\n| option | step (s), median | IQR (s) | vs grpo | fastest (s) | vs grpo | extra forward pass by "
          "definition |\n|---|---|---|---|---|---|---|")
    for variant, got in times.items():
        q1, med, q3 = statistics.quantiles(got, n=4)
        print(f"| {variant} | {med:.3f} | {q1:.3f}-{q3:.3f} | {med / base - 1:+.1%} | {min(got):.3f} "
              f"| {min(got) / fastest - 1:+.1%} | {'yes' if variant in EXTRA_PASS else ''} |")


if __name__ == "__main__":
    main()
