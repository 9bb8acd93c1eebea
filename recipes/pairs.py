"""On-policy preference pairs: a reward model trained only on pairs someone wrote beforehand is
blind to the mistakes the policy it will score actually makes, and RL finds those mistakes
(reward hacking). This samples the policy's own answers and pairs them.

    stats = policy_pairs(cfg, "runs/r1/sft/model", "runs/r1/preferences/data.jsonl", "out.jsonl",
                         "stage policy_pairs", held_out=...)

1. `rejection.k` answers to `rejection.prompts` train prompts of the tasks with no verifier
   (task.general), sampled from the model as rejection sampling does (recipes/rejection.py).
2. Each answer is labelled by the prompt's reference answer: the miniature's stand-in for the
   people who label preference data. No reward reads the reference; the reward model learns
   from the labels, and RL reads the reward model only.
3. For each question with right and wrong answers, each distinct wrong answer is paired
   against a right one (in turn): {"id", "prompt", "chosen", "rejected", "source": "policy"}.
   The pairs of `data` (e.g. the synthetic near misses), if given, come first.

The prompts are train prompts (none `held_out`), so the reward model never sees a held-out question.
"""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

from cluster.config import Config
from rewards.data import read_jsonl, write_jsonl
from rewards.tasks import HeldOut


class NoPairsError(RuntimeError):
    """Sampling gave no question with both a right and a wrong answer; the message says how many of each."""


def pair_up(groups: list[tuple[object, list]]) -> tuple[list[dict], Counter]:
    """Pairs from [(problem, its scored samples)] (see the module docstring), and counts:
    samples, right, wrong, questions with both, pairs."""
    pairs, counts = [], Counter()
    for problem, samples in groups:
        right, wrong = {}, {}  # distinct texts, whitespace aside, in the order sampled
        for s in samples:
            counts["samples"] += 1
            right_answer = s.reward_breakdown["correct"] == 1.0
            counts["right" if right_answer else "wrong"] += 1
            (right if right_answer else wrong).setdefault(" ".join(s.text.split()), s.text)
        if not right or not wrong:
            continue
        counts["questions_with_both"] += 1
        chosen = list(right.values())
        for n, rejected in enumerate(wrong.values()):
            pairs.append({"id": f"{problem.id}#pair{n}", "prompt": problem.prompt, "chosen": chosen[n % len(chosen)],
                          "rejected": rejected, "source": "policy"})
    counts["pairs"] = len(pairs)
    return pairs, counts


def policy_pairs(cfg: Config, model_path: str, data: str, out: str | Path, what: str, *,
                 held_out: HeldOut) -> dict[str, float]:
    """Steps 1-3 above; writes `out` (atomically: `data`'s pairs, then the policy's) and returns
    metrics: pairs/policy, pairs/given, pairs/wrong_rate (the model's share of wrong answers)."""
    from cluster.evaluate import serving
    from recipes.rejection import sample_groups
    from rewards.tasks import build_mixture, without_verifier

    given = read_jsonl(data, ("prompt", "chosen", "rejected"), what) if data else []
    tasks = build_mixture(cfg.task, held_out, what)
    judged = without_verifier(tasks.tasks)
    if not judged:
        raise NoPairsError(f"{what}: on-policy pairs are for tasks with no verifier (task.general); "
                           f"the mixture has {', '.join(tasks.tasks)}")
    problems = tasks.sample(random.Random(cfg.algorithm.seed), cfg.rejection.prompts, "train", names=judged)
    with serving(cfg, model_path, tasks.tasks) as (rollouts, rewarders):  # scores by the reference only
        groups = sample_groups(cfg, model_path, rollouts, rewarders, problems, what)
    pairs, counts = pair_up(groups)
    print(f"r1ray: {what}: {counts['samples']} answers, {counts['wrong']} wrong; {counts['questions_with_both']} of "
          f"{len(problems)} questions had right and wrong ones: {len(pairs)} pairs (+{len(given)} from {data or '-'})",
          flush=True)
    if not pairs:
        raise NoPairsError(f"{what}: no question had both a right and a wrong answer among {counts['samples']} "
                           f"({counts['wrong']} wrong; nothing written to {out}): raise rejection.k or "
                           "rejection.prompts, or sample at a higher rollout.temperature")
    write_jsonl(out, given + pairs)
    return {"pairs/policy": float(len(pairs)), "pairs/given": float(len(given)),
            "pairs/wrong_rate": counts["wrong"] / counts["samples"]}
