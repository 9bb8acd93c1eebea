"""Per-step metrics: R1-Zero's reflective-phrase rate, reward parts that only some tasks have
(the preference score), and the learner's FLOP count."""

import json
from pathlib import Path

import numpy as np
import pytest

from cluster.metrics import forward_only_passes, learn_flops, reflects, rollout_metrics, throughput_metrics
from common.records import Sample
from learner.config import AlgorithmConfig
from learner.models import flop_parameters


@pytest.mark.parametrize("response, expected", [
    ("7+8=15 wait, 7+8=15 4+3+1=8</think><answer>85</answer>", True),
    ("Let me check: 4+3=7</think><answer>7</answer>", True),
    ("I verify the sum</think><answer>7</answer>", True),
    ("the waiter adds 4+3</think><answer>7</answer>", False),  # whole words only
    ("4+3=7</think><answer>7</answer> wait", False),  # after the reasoning does not count
])
def test_reflective_phrases_are_found_in_the_reasoning_only(response, expected):
    assert reflects(response) is expected


def _sample(text, breakdown, n=4):
    return Sample("p", np.zeros(2, np.int32), np.zeros(n, np.int32), np.zeros(n, np.float32), text, "stop", 0,
                  reward=sum(breakdown.values()), reward_breakdown=breakdown)


def test_step_metrics_average_each_reward_part_over_the_samples_that_have_it():
    samples = [_sample("wait</think>", {"correct": 1.0, "format": 1.0}),
               _sample("x</think>", {"correct": 0.0, "format": 1.0, "preference": 0.8}, n=6),
               _sample("x</think>", {"correct": 0.0, "format": 0.0, "preference": 0.4}, n=8),
               _sample("x</think>", {"correct": 1.0, "format": 0.0})]
    m = rollout_metrics(samples, group_size=2)
    assert m["reward/correct"] == 0.5 and m["reward/preference"] == pytest.approx(0.6)
    assert m["rollout/reflection_rate"] == 0.25 and m["response_length/mean"] == 5.5


def _answer(prompt_len, answer_len, finish="stop"):
    return Sample("p", np.zeros(prompt_len, np.int32), np.zeros(answer_len, np.int32), np.zeros(answer_len, np.float32),
                  "x", finish, 0)


def test_learner_flops_count_the_body_on_every_token_and_the_head_on_answers_only():
    # Prompts of 3 and 5 tokens, answers of 4 and 2: 14 tokens, 6 of them answers.
    samples = [_answer(3, 4), _answer(5, 2, finish="length")]
    timings = {"generate": 1.0, "learn": 0.5}
    # Body 1000 and head 100 parameters, one forward-only pass (the reference):
    # (6 + 2) x (1000 x 14 + 100 x 6) = 8 x 14,600 = 116,800 FLOP in 0.5 s = 233,600 FLOP/s.
    # (6 x all 1100 parameters x 14 tokens / 0.5 s = 184,800 FLOP/s, the count this replaces.)
    m = throughput_metrics(samples, timings, body_params=1000, head_params=100, forward_only=1)
    assert m["throughput/learn_gflops"] * 1e9 == pytest.approx(233_600)
    assert m["rollout/prompt_tokens"] == 8 and m["rollout/response_tokens"] == 6
    assert m["throughput/learn_tokens_per_s"] == 28 and m["throughput/generate_tokens_per_s"] == 6
    # The truncated answer left out of the loss: the head skips its 2 tokens, the body does not:
    # 8 x (1000 x 14 + 100 x 4) = 115,200 FLOP in 0.5 s.
    masked = throughput_metrics(samples, timings, 1000, 100, forward_only=1, mask_truncated=True)
    assert masked["throughput/learn_gflops"] * 1e9 == pytest.approx(230_400)
    # No reference, one trained pass: 6 x 14,600 = 87,600 FLOP.
    assert learn_flops(14, 6, 1000, 100) == 87_600
    # A third sample generated (answer of 10 tokens) but left out of the batch: generation
    # made 16 tokens in 1 s; the learner's figures are the batch's.
    both = throughput_metrics(samples, timings, 1000, 100, forward_only=1, generated=[*samples, _answer(3, 10)])
    assert both["throughput/generate_tokens_per_s"] == 16
    assert both["throughput/learn_gflops"] == m["throughput/learn_gflops"]


@pytest.mark.parametrize("changes, passes", [
    ({}, 0),
    ({"kl_beta": 0.04}, 1),  # the frozen reference
    ({"updates_per_step": 2}, 0),  # old log-probs from the engine
    ({"updates_per_step": 2, "old_logprobs": "learner"}, 1),
    ({"updates_per_step": 2, "mismatch": "mis_token"}, 1),  # a correction takes pi_old from the learner
    ({"kl_beta": 0.04, "kl_in": "reward"}, 1),  # the reference's pass, before the advantages
    ({"updates_per_step": 2, "max_staleness": 1, "kl_beta": 0.04}, 2),
    ({"updates_per_step": 1, "max_staleness": 1}, 0),  # one update: the trained pass is the old policy
])
def test_forward_only_passes_follow_the_learners_rule(changes, passes):
    assert forward_only_passes(AlgorithmConfig(**{"updates_per_step": 1, **changes})) == passes


@pytest.mark.parametrize("tied, stored_head", [(False, True), (True, False), (True, True)])
def test_flop_parameters_split_body_and_head_and_count_a_tied_head(tmp_path, tied, stored_head):
    import torch
    from safetensors.torch import save_file

    # Vocabulary 10, hidden 4: embedding 40, one layer 4x4 = 16, a norm 4, head 10x4 = 40.
    weights = {"model.embed_tokens.weight": torch.zeros(10, 4), "model.layers.0.proj.weight": torch.zeros(4, 4),
               "model.norm.weight": torch.zeros(4)}
    if stored_head:
        weights["lm_head.weight"] = torch.zeros(10, 4)
    save_file(weights, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"tie_word_embeddings": tied}))
    assert flop_parameters(tmp_path) == (20, 40)


def test_flop_parameters_of_the_tiny_model(tiny_model):
    from learner.models import count_parameters

    body, head = flop_parameters(tiny_model)
    config = json.loads((Path(tiny_model) / "config.json").read_text())
    assert head == config["vocab_size"] * config["hidden_size"]  # untied: its own lm_head
    assert body + 2 * head == count_parameters(tiny_model)  # + the input embedding, same shape
