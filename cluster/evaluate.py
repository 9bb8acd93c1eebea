"""Evaluation on held-out problems: pass@1 (greedy and sampled), pass@k and maj@k.

    r1ray eval --model runs/grpo-x/model --task arithmetic --k 8        [--prompts 200] [key=value ...]

The same code scores the held-out set during training (`eval.every`). For each problem:
one greedy answer, and with k > 1 also k answers sampled at `rollout.temperature`.

- `pass@1/greedy`: share of problems whose greedy answer is right;
- `pass@1`: mean share of right answers among the k samples (the expected pass@1 when
  sampling);
- `pass@k`: share of problems with at least one right answer among the k (the unbiased
  estimator of Chen et al., 2021, with n = k samples);
- `maj@k`: share of problems where the most common final answer among the k is right
  (ties go to the answer seen first). Answers vote by the verifier's equivalence classes
  (`rewards.math.canonical_answer`): "0.5", "1/2" and "\\frac{1}{2}" are one answer.
With `eval.length_buckets` = n > 0, the k sampled answers are also split by length into n
equal ranges of tokens up to `rollout.max_new_tokens`: `by_length/<lo>-<hi>/pass@1` is the
share of right answers in a range (NaN when it holds none), `by_length/<lo>-<hi>/share` the
share of all sampled answers that fall in it. Whether longer answers are the right ones.
An answer is right only at full credit (its checker's score is 1.0): a task with partial
credit (`task.code.partial_credit`) scores 0.5 for half the tests passed, and two half-right
answers are not a right one. Each metric is reported over all problems and per task
(`.../<task>`) when several tasks are mixed. A prompt skipped as too long counts as wrong.
"""

from __future__ import annotations

from collections import Counter
from contextlib import contextmanager
from math import comb

import numpy as np

from cluster.config import Config
from cluster.prompts import PromptFormat, prompt_format
from common.records import Sampling
from rewards import arithmetic
from rewards.format import clean
from rewards.math import canonical_answer, extract_answer
from rewards.tasks import Problem

CHUNK = 32  # prompts per generate call: the progress bar's grain


def pass_at_k(n: int, c: int, k: int) -> float:
    """Probability that at least one of k answers drawn from n (c of them right) is right."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    return 1.0 - comb(n - c, k) / comb(n, k)


def majority_correct(answers: list[str | None], scores: list[float]) -> float:
    """1.0 if the most common final answer is right (full credit), else 0.0 (None: no answer,
    never the majority unless nothing answered)."""
    votes = Counter(a for a in answers if a is not None)
    if not votes:
        return 0.0
    top = votes.most_common(1)[0][0]  # Counter keeps first-seen order among ties
    return float(scores[answers.index(top)] == 1.0)


def by_length(lengths: list[int], right: list[bool], max_tokens: int, buckets: int) -> dict[str, float]:
    """Accuracy and share of answers by length (module docstring): `buckets` equal ranges of
    [0, max_tokens] tokens, each [lo, hi) but the last, which holds max_tokens (and anything
    longer) too; `by_length/0-7/pass@1` for lengths 0 to 7."""
    lengths, right = np.asarray(lengths), np.asarray(right, dtype=bool)
    edges = np.linspace(0, max_tokens, buckets + 1).round().astype(int)
    out = {}
    for i, (lo, hi) in enumerate(zip(edges[:-1], edges[1:])):
        last = i == buckets - 1
        inside = (lengths >= lo) & ((lengths < hi) | last)
        key = f"by_length/{lo}-{hi if last else hi - 1}"
        out[f"{key}/pass@1"] = float(right[inside].mean()) if inside.any() else float("nan")
        out[f"{key}/share"] = float(inside.mean()) if len(lengths) else float("nan")
    return out


def fallen(now: dict[str, float], start: dict[str, float], by: float) -> list[str]:
    """The held-out greedy figures of an evaluation during RL (`now`: eval/pass@1/greedy, and
    .../<task> per task of a mixture) more than `by` below their value as RL began (`start`:
    the run's results, accuracy/before_rl[/<task>]), each as "<what> <start> -> <now>"."""
    out = []
    for key, value in now.items():
        if key.startswith("eval/pass@1/greedy"):
            what = key.removeprefix("eval/pass@1/greedy")
            before = start.get("accuracy/before_rl" + what)
            if before is not None and value < before - by:
                out.append(f"{what.lstrip('/') or 'held-out accuracy'} {before:.3f} -> {value:.3f}")
    return out


def vote_key(text: str, last_number: bool = False) -> str | None:
    """The answer a vote counts, read as the checkers read it: the marked final answer (or,
    with `task.answer=last_number`, else the last number), as its equivalence class's key."""
    answer = extract_answer(text)
    if answer is None and last_number:
        answer = arithmetic.last_number(clean(text))
    return None if answer is None else canonical_answer(answer)


def evaluate(cfg: Config, rollouts, rewarders, fmt: PromptFormat, problems: list[Problem], k: int,
             progress: bool = False, prefix: str = "eval/") -> dict[str, float]:
    """The metrics above for `problems`, rendered by `fmt`, sampled by `rollouts` (a
    RolloutPool) and scored by `rewarders` (a RewardPool)."""
    from tqdm import tqdm

    by_id = {p.id: p for p in problems}
    greedy: dict[str, list] = {p.id: [] for p in problems}
    sampled: dict[str, list] = {p.id: [] for p in problems}
    lengths: list[tuple[int, bool]] = []  # (tokens, right) of every sampled answer
    bar = tqdm(total=len(problems), desc="eval", unit="prompt", disable=not progress, dynamic_ncols=True)
    for start in range(0, len(problems), CHUNK):
        chunk = problems[start:start + CHUNK]
        runs = [(greedy, Sampling.from_config(cfg.rollout, 1, cfg.algorithm.seed, fmt.stop, greedy=True))]
        if k > 1:
            runs.append((sampled, Sampling.from_config(cfg.rollout, k, cfg.algorithm.seed, fmt.stop)))
        for into, sampling in runs:
            samples = rollouts.generate([p.id for p in chunk], [fmt.render(p.prompt) for p in chunk], sampling,
                                        cfg.cluster.timeout_s, "evaluating")
            rewarders.score(samples, by_id, cfg.cluster.timeout_s)
            for s in samples:
                into[s.prompt_id].append((s.reward_breakdown["correct"],
                                          vote_key(s.text, cfg.task.answer == "last_number")))
                if into is sampled:
                    lengths.append((len(s.response_ids), s.reward_breakdown["correct"] == 1.0))
        bar.update(len(chunk))
    bar.close()
    tasks = sorted({p.task for p in problems})
    out: dict[str, float] = {}
    for task in [None, *tasks] if len(tasks) > 1 else [None]:
        ids = [p.id for p in problems if task in (None, p.task)]
        suffix = f"/{task}" if task else ""
        out[f"{prefix}pass@1/greedy{suffix}"] = float(np.mean([bool(greedy[i]) and greedy[i][0][0] == 1.0
                                                               for i in ids]))
        if k > 1:
            per = [([c for c, _ in sampled[i]], [a for _, a in sampled[i]]) for i in ids]
            right = [sum(score == 1.0 for score in c) for c, _ in per]  # full credit only
            out[f"{prefix}pass@1{suffix}"] = float(np.mean([r / k for r in right]))
            out[f"{prefix}pass@{k}{suffix}"] = float(np.mean([pass_at_k(k, r, k) for r in right]))
            out[f"{prefix}maj@{k}{suffix}"] = float(np.mean([majority_correct(a, c) for c, a in per]))
    if k > 1 and cfg.eval.length_buckets:
        got = by_length([n for n, _ in lengths], [r for _, r in lengths], cfg.rollout.max_new_tokens,
                        cfg.eval.length_buckets)
        out |= {prefix + key: v for key, v in got.items()}
    return out


def print_table(results: dict[str, float], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    print(title)
    table = Table()
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in results.items():
        table.add_row(key, f"{value:.3f}")
    Console().print(table)


def evaluate_model(cfg: Config, model_path: str, tasks: dict, problems: list[Problem], k: int = 1,
                   progress: bool = False) -> dict[str, float]:
    """`evaluate` with engines and reward workers of its own, stopped afterwards (keys without
    the eval/ prefix, e.g. pass@1/greedy)."""
    with serving(cfg, model_path, tasks) as (rollouts, rewarders):
        return evaluate(cfg, rollouts, rewarders, prompt_format(cfg, model_path), problems, k,
                        progress=progress, prefix="")


@contextmanager
def serving(cfg: Config, model_path: str, tasks: dict):
    """Rollout engines serving `model_path` and reward workers for `tasks`, ready, as
    (RolloutPool, RewardPool); both are stopped on exit. Starts (or joins) the Ray cluster
    if this process has none yet."""
    import ray

    from cluster import placement
    from cluster.faults import Faults
    from cluster.reward_pool import RewardPool
    from cluster.rollout_pool import RolloutPool

    placement.connect(cfg)
    account = Faults.of(cfg)
    rollouts, rewarders = RolloutPool(cfg, model_path, account=account), RewardPool(cfg, tasks, account=account)
    rollouts.revive = lambda index: None  # every engine serves the model folder, as a fresh one does
    try:
        ray.get(rollouts.ready_refs() + rewarders.ready_refs(), timeout=cfg.cluster.timeout_s)
        yield rollouts, rewarders
    finally:
        rollouts.shutdown()
        rewarders.shutdown()

