"""Evaluation metrics: the pass@k estimator, majority votes, and `evaluate` on an answer key
it must reproduce exactly; then `r1ray eval` through its real entry point, and a run that
stops early on a held-out fall."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cluster.config import load_config
from cluster.evaluate import evaluate, fallen, majority_correct, pass_at_k
from cluster.prompts import prompt_format
from common.records import Sample
from rewards.tasks import build_mixture

REPO = Path(__file__).resolve().parents[1]


def test_pass_at_k_is_the_unbiased_estimator():
    assert pass_at_k(8, 0, 8) == 0.0 and pass_at_k(8, 1, 8) == 1.0
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert pass_at_k(4, 2, 2) == pytest.approx(1 - 1 / 6)  # 1 - C(2,2)/C(4,2)
    with pytest.raises(ValueError, match="n=4, c=5"):
        pass_at_k(4, 5, 1)


def test_early_stopping_names_each_held_out_figure_fallen_below_rls_start():
    start = {"accuracy/before_rl": 0.80, "accuracy/before_rl/arithmetic": 0.70, "accuracy/before_rl/general": 0.875,
             "accuracy/before_rl/pass@1": 0.9}
    now = {"eval/pass@1/greedy": 0.76, "eval/pass@1/greedy/arithmetic": 0.72, "eval/pass@1/greedy/general": 0.80,
           "eval/pass@1": 0.1, "reward/preference": 0.9}
    assert fallen(now, start, 0.05) == ["general 0.875 -> 0.800"]  # 0.04 below: kept; sampled figures not read
    assert fallen(now, start, 0.03) == ["held-out accuracy 0.800 -> 0.760", "general 0.875 -> 0.800"]
    assert fallen(now, start, 0.075) == []  # 0.075 below is not more than 0.075
    assert fallen(now, {}, 0.0) == []  # a resumed run of an older version: nothing to compare with


@pytest.mark.slow
def test_a_run_whose_held_out_accuracy_falls_goes_back_to_the_last_evaluation_that_held(tmp_path):
    # A small model learns sums in the cold start (0.75 held out); RL at a learning rate that wrecks
    # it makes held-out accuracy fall at the first evaluation. The run stops there and its
    # model, its after-RL result and its engines are the policy RL started from.
    from safetensors.torch import load_file

    from learner.models import PROVENANCE
    from tests.test_e2e import SHORT, read_rows, run

    proc, _ = run([*SHORT, "model.hidden_size=64", "model.num_layers=2", "model.num_heads=2",
                   "model.intermediate_size=256", "cold_start.steps=400", "cold_start.lr=3e-3",
                   "rollout.engine=transformers", "rollout.max_new_tokens=32", "learner.dtype=float32",
                   "learner.lr=0.5", "learner.warmup_steps=0", "algorithm.steps=3", "algorithm.prompts_per_step=8",
                   "algorithm.group_size=8", "eval.every=1", "eval.k=1", "eval.stop_drop=0.01",
                   "logging.run_name=fall"], tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run_dir = tmp_path / "runs" / "fall"
    results = json.loads((run_dir / "results.json").read_text())
    assert results["accuracy/before_rl"] >= 0.5  # something to fall from
    rows = read_rows(run_dir / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1]
    assert rows[0]["eval/pass@1/greedy"] < results["accuracy/before_rl"] - 0.01
    assert "stopping RL after step 1 of 3" in proc.stdout and "going back to step 0" in proc.stdout
    assert results["rl/stopped_early_at"] == 1 and results["rl/kept_step"] == 0
    assert results["accuracy/after_rl"] == results["accuracy/before_rl"]  # greedy, the same weights
    kept = load_file(run_dir / "checkpoints" / "step-000000" / "model" / "model.safetensors")
    fell = load_file(run_dir / "checkpoints" / "step-000001" / "model" / "model.safetensors")
    final = load_file(run_dir / "model" / "model.safetensors")
    assert all(torch.equal(final[k], kept[k]) for k in kept)
    assert not all(torch.equal(fell[k], kept[k]) for k in kept)
    assert json.loads((run_dir / "model" / PROVENANCE).read_text())["step"] == 0


def test_majority_vote_takes_the_most_common_answer_first_seen_on_ties():
    assert majority_correct(["5", "6", "6", None], [1.0, 0.0, 0.0, 0.0]) == 0.0
    assert majority_correct(["5", "6", "5", "6"], [1.0, 0.0, 1.0, 0.0]) == 1.0
    assert majority_correct([None, None], [0.0, 0.0]) == 0.0


class AnswerKey:
    """Stand-in rollout pool (unit-test double): answers each problem from a fixed key, each
    answer as many tokens long as its text."""

    def __init__(self, key):
        self.key = key

    def generate(self, prompt_ids, prompts, sampling, timeout_s, phase="generating"):
        out = []
        for pid in prompt_ids:
            texts = [self.key[pid][0]] if sampling.greedy else self.key[pid][1]
            assert len(texts) == sampling.n
            out += [Sample(pid, np.zeros(1, np.int32), np.zeros(len(t), np.int32), np.zeros(len(t), np.float32),
                           f"x</think><answer>{t}</answer>", "stop", 0) for t in texts]
        return out


class Checker:
    """Stand-in reward pool (unit-test double): the real checkers, called in process."""

    def __init__(self, tasks):
        self.tasks = tasks

    def score(self, samples, problems, timeout_s):
        for s in samples:
            p = problems[s.prompt_id]
            s.reward_breakdown = {"correct": self.tasks[p.task].check(s.text, p)[0]}


def test_evaluate_reproduces_an_answer_key():
    cfg = load_config(None, ["cold_start.steps=0"])
    tasks = build_mixture(cfg.task)
    a, b, c = tasks.eval_problems(0, 3)
    gold = {p.id: p.reference.answer for p in (a, b, c)}
    key = {a.id: (gold[a.id], [gold[a.id], "0", gold[a.id], "0"]),   # 2 of 4 right, tie -> first (right)
           b.id: ("0", ["0", "0", "1", gold[b.id]]),                   # 1 of 4, majority "0" wrong
           c.id: ("0", ["0", "1", "2", "3"])}                          # none right
    got = evaluate(cfg, AnswerKey(key), Checker(tasks.tasks), prompt_format(cfg, "unused"), [a, b, c], k=4)
    assert got == pytest.approx({"eval/pass@1/greedy": 1 / 3, "eval/pass@1": (2 / 4 + 1 / 4) / 3,
                                 "eval/pass@4": 2 / 3, "eval/maj@4": 1 / 3})


def test_accuracy_by_length_splits_the_sampled_answers():
    from cluster.evaluate import by_length

    got = by_length([0, 7, 8, 15, 31, 32, 40], [True, False, True, True, False, True, True], 32, 4)
    assert got == pytest.approx({
        "by_length/0-7/pass@1": 1 / 2, "by_length/0-7/share": 2 / 7,
        "by_length/8-15/pass@1": 1.0, "by_length/8-15/share": 2 / 7,
        "by_length/16-23/pass@1": np.nan, "by_length/16-23/share": 0.0,
        "by_length/24-32/pass@1": 2 / 3, "by_length/24-32/share": 3 / 7}, nan_ok=True)  # 40: past the end
    cfg = load_config(None, ["cold_start.steps=0", "eval.length_buckets=2", "rollout.max_new_tokens=16"])
    tasks = build_mixture(cfg.task)
    a, b = tasks.eval_problems(0, 2)
    long_wrong = "0" * 12  # 12 tokens, in 8-16; every gold here is 1-3 digits, in 0-7
    key = {a.id: ("0", [a.reference.answer, long_wrong, a.reference.answer]),
           b.id: ("0", ["0" if b.reference.answer != "0" else "1", long_wrong, b.reference.answer])}
    got = evaluate(cfg, AnswerKey(key), Checker(tasks.tasks), prompt_format(cfg, "unused"), [a, b], k=3)
    assert {k: v for k, v in got.items() if "by_length" in k} == pytest.approx({
        "eval/by_length/0-7/pass@1": 3 / 4, "eval/by_length/0-7/share": 4 / 6,
        "eval/by_length/8-16/pass@1": 0.0, "eval/by_length/8-16/share": 2 / 6})


class HalfCredit:
    """Stand-in reward pool (unit-test double): a partial-credit checker that gives the answer
    "half" 0.5 (half the tests passed) and anything else 0.0."""

    def score(self, samples, problems, timeout_s):
        for s in samples:
            s.reward_breakdown = {"correct": 0.5 if s.text.endswith("<answer>half</answer>") else 0.0}


def test_half_right_answers_are_not_right():
    cfg = load_config(None, ["cold_start.steps=0"])
    p, = build_mixture(cfg.task).eval_problems(0, 1)
    key = {p.id: ("half", ["half", "half", "0"])}  # summed, the two halves would make one pass
    got = evaluate(cfg, AnswerKey(key), HalfCredit(), prompt_format(cfg, "unused"), [p], k=3)
    assert got == {"eval/pass@1/greedy": 0.0, "eval/pass@1": 0.0, "eval/pass@3": 0.0, "eval/maj@3": 0.0}


def test_equal_answers_in_different_forms_vote_together():
    from cluster.evaluate import vote_key

    forms = ["3", "3", "0.5", "1/2", "\\frac{1}{2}", "(B)", "B"]
    keys = [vote_key(f"<answer>{a}</answer>") for a in forms]
    assert keys == ["3", "3", "1/2", "1/2", "1/2", "B", "B"]
    # Read as raw strings, "3" (twice, seen first) would win over three singletons.
    assert majority_correct(keys[:5], [0.0, 0.0, 1.0, 1.0, 1.0]) == 1.0


@pytest.mark.slow
def test_eval_command_prints_its_table(tmp_path, tiny_model):
    proc = subprocess.run([sys.executable, "-m", "r1ray", "eval", "--model", tiny_model, "--task", "countdown",
                           "--k", "2", "--prompts", "4", "rollout.max_new_tokens=8", "rollout.engine=transformers",
                           "task.countdown.num_numbers=3", f"cluster.cache_dir={tmp_path}"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for metric in ["pass@1/greedy", "pass@1", "pass@2", "maj@2", "countdown, 4 held-out problems"]:
        assert metric in proc.stdout, proc.stdout


def test_eval_command_refuses_an_unknown_task(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "r1ray", "eval", "--model", "tiny", "--task", "poetry"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--task 'poetry' is not a task; choose one of arithmetic" in proc.stderr


def test_votes_read_answers_as_the_checker_does():
    from cluster.evaluate import vote_key

    assert vote_key("so <answer> 8 5 </answer>") == "85"
    assert vote_key("it is 85") is None
    assert vote_key("it is 85", last_number=True) == "85"
    assert vote_key("\\boxed{84}, not 85", last_number=True) == "84"  # a marked answer wins
