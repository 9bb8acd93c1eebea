"""Rejection sampling's filters, deduplication and acceptance statistics (pure functions over
real `Sample` records; the sampling itself runs in tests/test_recipe.py), and its prompts."""

import numpy as np
import pytest

from cluster.config import RejectionConfig
from common.records import Sample
from recipes.rejection import select, stats_table, verdict
from rewards.tasks import Problem

GOOD = "7+8=15 4+3+1=8</think><answer>85</answer>"


def _sample(text, correct=1.0, tokens=10, finish="stop", language=1.0):
    ids = np.arange(tokens, dtype=np.int32)
    return Sample("p", np.zeros(3, np.int32), ids, np.zeros(tokens, np.float32), text, finish, 1,
                  reward_breakdown={"correct": correct, "format": 1.0, "language": language, "length": 0.0})


@pytest.mark.parametrize("sample, reason", [
    (_sample(GOOD), "ok"),
    (_sample(GOOD, correct=0.0), "wrong"),
    (_sample(GOOD, finish="length"), "truncated"),
    (_sample("7+8=15 <answer>85</answer>"), "format"),
    (_sample(GOOD, language=0.5), "language"),
    (_sample("add the 列 first</think><answer>85</answer>", language=1.0), "mixed"),
    (_sample(GOOD, tokens=2), "short"),
    (_sample(GOOD, tokens=30), "long"),
])
def test_each_filter_rejects_for_its_reason(sample, reason):
    cfg = RejectionConfig(min_tokens=3, max_tokens=20, min_language=0.9)
    got = verdict(sample.text, sample.reward_breakdown, len(sample.response_ids), sample.truncated, cfg, 32)
    assert got == reason


def test_max_tokens_defaults_to_the_answer_budget():
    cfg = RejectionConfig(max_tokens=0)
    assert verdict(GOOD, _sample(GOOD).reward_breakdown, 32, False, cfg, 32) == "ok"
    assert verdict(GOOD, _sample(GOOD).reward_breakdown, 33, False, cfg, 32) == "long"


def test_duplicates_and_the_per_prompt_cap_are_counted_per_task():
    a, b = Problem("a", "arithmetic", "47+38=?", None), Problem("k", "knights", "who?", None)
    groups = [
        (a, [_sample(GOOD), _sample(GOOD.replace(" ", "  ")), _sample(GOOD, correct=0.0),
             _sample("9+9=18</think><answer>85</answer>"), _sample("1+1=2</think><answer>85</answer>")]),
        (b, [_sample(GOOD, correct=0.0)]),
        (a, [_sample(GOOD), _sample("2+2=4</think><answer>85</answer>")]),  # drawn again: same question
    ]
    kept, stats = select(groups, RejectionConfig(per_prompt=2), 32)
    assert [s.text for _, s in kept] == [GOOD, "9+9=18</think><answer>85</answer>"]
    assert dict(stats["arithmetic"]) == {"prompts": 2, "samples": 7, "kept": 2, "prompts_kept": 1, "duplicate": 2,
                                         "wrong": 1, "per_prompt": 2}
    assert stats["knights"]["kept"] == 0 and stats["knights"]["prompts_kept"] == 0
    table = stats_table(stats)
    assert "arithmetic: kept 2/7 (29%), 1/2 prompts" in table and "knights: kept 0/1 (0%)" in table


def test_prompts_are_train_prompts_outside_the_runs_held_out_split():
    import random

    from cluster.config import load_config
    from recipes.rejection import train_prompts
    from rewards.tasks import build_mixture

    cfg = load_config(None, ["cold_start.steps=0", "task.arithmetic.max_digits=1", "rejection.prompts=600"])
    plain = build_mixture(cfg.task)
    train = sorted({p.prompt for p in plain.sample(random.Random(0), 1000)})
    evaluated = set(train[::4])  # held out by the run's evaluation, not by the task's own split
    prompts = {p.prompt for p in train_prompts(cfg, build_mixture(cfg.task, lambda q: q in evaluated), "stage x")}
    assert prompts == set(train) - evaluated
    assert not any(plain.held_out(q) for q in prompts)


def test_on_policy_pairs_put_each_distinct_wrong_answer_under_a_right_one():
    from recipes.pairs import pair_up

    q1, q2, q3 = (Problem(f"q{i}", "general", f"sort {i} 1", str(i)) for i in (1, 2, 3))
    right_a, right_b = "in order</think><answer>1 1</answer>", "in order</think>  <answer>1 1</answer>"
    groups = [(q1, [_sample(right_a), _sample("x</think><answer>1</answer>", correct=0.0),
                    _sample(right_b), _sample("x</think><answer>1</answer>", correct=0.0),  # the same wrong twice
                    _sample("y</think><answer>1 1 1</answer>", correct=0.0),
                    _sample("z</think><answer>2</answer>", correct=0.0)]),
              (q2, [_sample(right_a), _sample(right_a)]),  # nothing wrong: no pair
              (q3, [_sample("x</think><answer>3</answer>", correct=0.0)])]  # nothing right: no pair
    pairs, counts = pair_up(groups)
    assert [(p["prompt"], p["chosen"], p["rejected"]) for p in pairs] == [
        ("sort 1 1", right_a, "x</think><answer>1</answer>"),
        ("sort 1 1", right_b, "y</think><answer>1 1 1</answer>"),  # the right ones in turn
        ("sort 1 1", right_a, "z</think><answer>2</answer>")]
    assert len({p["id"] for p in pairs}) == 3 and {p["source"] for p in pairs} == {"policy"}
    assert counts == {"samples": 9, "right": 4, "wrong": 5, "questions_with_both": 1, "pairs": 3}
