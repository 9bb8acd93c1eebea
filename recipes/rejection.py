"""Rejection sampling (R1's third stage, and distillation's teacher traces): k answers per
train prompt from a model, kept only if they are right, well formed and readable.

    stats = rejection_sample(cfg, model_path, "out/data.jsonl", "stage rejection", held_out=mixture.held_out)

The prompts are train prompts: none is in the run's held-out split (`held_out`), so the data
this writes never teaches a later stage an answer it is evaluated on.

A kept answer passes, in this order (the first failure is the reason counted):
  wrong        the task's verifier does not accept it (score below 1)
  truncated    it hit rollout.max_new_tokens
  format       not <think>..</think><answer>..</answer> (rewards/format.py)
  language     language consistency below rejection.min_language (rewards/language.py)
  mixed        its reasoning mixes scripts (e.g. Latin and CJK words)
  short, long  fewer than rejection.min_tokens or more than rejection.max_tokens tokens
  duplicate    the same text (whitespace aside) as an answer already kept for the question
  per_prompt   rejection.per_prompt answers of the question are already kept
Kept rows are written as JSONL with their provenance: {"id", "prompt_id", "task", "prompt",
"response", "model", "model_step", "scores" (the reward breakdown), "tokens"}, the same
prompt/response layout SFT reads. Acceptance statistics are reported per task; a run that
keeps nothing stops with them rather than write an empty dataset.
"""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from contextlib import nullcontext
from pathlib import Path

from cluster.config import Config, RejectionConfig
from cluster.prompts import prompt_format
from rewards.data import write_jsonl
from rewards.format import format_reward
from rewards.language import scripts_of
from rewards.tasks import HeldOut, Mixture, Problem

REASONS = ("wrong", "truncated", "format", "language", "mixed", "short", "long", "duplicate", "per_prompt")


class NothingKeptError(RuntimeError):
    """Rejection sampling kept no answer; the message holds the acceptance statistics."""


def verdict(text: str, breakdown: dict[str, float], tokens: int, truncated: bool, cfg: RejectionConfig,
            max_new_tokens: int) -> str:
    """"ok", or the first filter (of `REASONS`, before dedup) that rejects this answer."""
    longest = cfg.max_tokens or max_new_tokens
    checks = (("wrong", breakdown["correct"] < 1.0), ("truncated", truncated),
              ("format", format_reward(text)[0] < 1.0), ("language", breakdown["language"] < cfg.min_language),
              ("mixed", len(scripts_of(text)) > 1), ("short", tokens < cfg.min_tokens), ("long", tokens > longest))
    return next((name for name, failed in checks if failed), "ok")


def select(groups: list[tuple[object, list]], cfg: RejectionConfig, max_new_tokens: int) -> tuple[list, dict]:
    """The (problem, sample) pairs kept from `groups` [(problem, its k scored samples)], and
    per-task counts {task: Counter(prompts, samples, kept, prompts_kept, <reason>...)}."""
    kept, stats = [], defaultdict(Counter)
    seen, per_prompt = defaultdict(set), Counter()  # by question: a prompt may be drawn twice
    for problem, samples in groups:
        counts, mine = stats[problem.task], 0
        counts["prompts"] += 1
        for s in samples:
            counts["samples"] += 1
            why = verdict(s.text, s.reward_breakdown, len(s.response_ids), s.truncated, cfg, max_new_tokens)
            key = " ".join(s.text.split())
            if why == "ok" and key in seen[problem.id]:
                why = "duplicate"
            if why == "ok" and cfg.per_prompt and per_prompt[problem.id] >= cfg.per_prompt:
                why = "per_prompt"
            if why != "ok":
                counts[why] += 1
                continue
            seen[problem.id].add(key)
            per_prompt[problem.id] += 1
            mine += 1
            kept.append((problem, s))
        counts["kept"] += mine
        counts["prompts_kept"] += mine > 0
    return kept, dict(stats)


def stats_table(stats: dict) -> str:
    """Acceptance per task, one line each: kept / samples, prompts with any kept, rejections by reason."""
    lines = []
    for task, c in sorted(stats.items()):
        why = ", ".join(f"{r} {c[r]}" for r in REASONS if c[r]) or "none rejected"
        lines.append(f"  {task}: kept {c['kept']}/{c['samples']} ({c['kept'] / max(1, c['samples']):.0%}), "
                     f"{c['prompts_kept']}/{c['prompts']} prompts with one or more; rejected: {why}")
    return "\n".join(lines)


def train_prompts(cfg: Config, tasks: Mixture, what: str) -> list[Problem]:
    """`rejection.prompts` train prompts of the mixture's tasks that have a verifier, drawn
    with replacement; none is held out by `tasks` (its tasks' eval splits and its `exclude`)."""
    from rewards.tasks import without_verifier

    unverified = without_verifier(tasks.tasks)
    verified = [t for t in tasks.tasks if t not in unverified]
    if not verified:
        raise NothingKeptError(f"{what}: rejection sampling needs a task with a verifier; the mixture has only "
                               f"{', '.join(unverified)}")
    return tasks.sample(random.Random(cfg.algorithm.seed), cfg.rejection.prompts, "train", names=verified)


def rejection_sample(cfg: Config, model_path: str, out: str | Path, what: str, *,
                     held_out: HeldOut, served: tuple | None = None) -> dict[str, float]:
    """Sample `rejection.k` answers to `rejection.prompts` train prompts of the task mixture
    (none of them `held_out`) with `model_path`, keep those that pass (see the module
    docstring), write them to `out` (atomically); returns acceptance metrics. `served`:
    engines already serving `model_path` and reward workers for the mixture's tasks
    (cluster.evaluate.serving), else the stage starts and stops its own."""
    from cluster.evaluate import serving
    from rewards.tasks import build_mixture

    tasks = build_mixture(cfg.task, held_out, what)
    problems = train_prompts(cfg, tasks, what)
    with (nullcontext(served) if served else serving(cfg, model_path, tasks.tasks)) as (rollouts, rewarders):
        groups = sample_groups(cfg, model_path, rollouts, rewarders, problems, what)
    kept, stats = select(groups, cfg.rejection, cfg.rollout.max_new_tokens)
    print(f"r1ray: {what}: acceptance\n{stats_table(stats)}", flush=True)
    if not kept:
        raise NothingKeptError(f"{what}: rejection sampling kept no answer of {sum(c['samples'] for c in stats.values())}"
                               f" (nothing written to {out}):\n{stats_table(stats)}")
    from learner.models import read_provenance

    model_step = read_provenance(model_path).get("step")
    rows = [{"id": f"{p.id}#{n}", "prompt_id": p.id, "task": p.task, "prompt": p.prompt, "response": s.text,
             "model": str(model_path), "model_step": model_step, "scores": s.reward_breakdown,
             "tokens": len(s.response_ids)} for n, (p, s) in enumerate(kept)]
    write_jsonl(out, rows)
    total = Counter()
    for c in stats.values():
        total.update(c)
    out_metrics = {"rejection/kept": float(total["kept"]), "rejection/acceptance": total["kept"] / total["samples"],
                   "rejection/prompts_kept": total["prompts_kept"] / total["prompts"]}
    for task, c in stats.items():
        out_metrics[f"rejection/acceptance/{task}"] = c["kept"] / max(1, c["samples"])
    return out_metrics


def sample_groups(cfg: Config, model_path: str, rollouts, rewarders, problems: list, what: str) -> list[tuple]:
    """[(problem, its k scored samples)] for `problems`, in chunks."""
    from tqdm import tqdm

    from cluster.evaluate import CHUNK
    from common.records import Sampling

    fmt, k = prompt_format(cfg, model_path), cfg.rejection.k
    groups = []
    bar = tqdm(total=len(problems), desc=f"{what}: sampling", unit="prompt", disable=not cfg.logging.progress)
    for start in range(0, len(problems), CHUNK):
        chunk = problems[start:start + CHUNK]
        ids = [f"{i}:{p.id}" for i, p in enumerate(chunk, start)]  # a prompt may be drawn twice
        by_id = {i: p for i, p in zip(ids, chunk)}
        sampling = Sampling.from_config(cfg.rollout, k, cfg.algorithm.seed + start, fmt.stop)
        samples = rollouts.generate(ids, [fmt.render(p.prompt) for p in chunk], sampling, cfg.cluster.timeout_s)
        rewarders.score(samples, by_id, cfg.cluster.timeout_s)
        answers = defaultdict(list)
        for sample in samples:
            answers[sample.prompt_id].append(sample)
        groups += [(by_id[i], answers[i]) for i in ids]
        bar.update(len(chunk))
    bar.close()
    return groups
