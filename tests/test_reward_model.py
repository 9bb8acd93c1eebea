"""The preference model: Bradley-Terry loss by hand, pair files, normalisation, and a separable
toy set trained end to end (Ray + DeepSpeed ZeRO-2, two ranks) then served by the scorer actor.
"""

import json
import math
import random

import numpy as np
import pytest
import torch

from learner.reward_model import Pair, bradley_terry_loss, load_pairs, split_pairs
from recipes.reward_model import batch_order, read_pairs, train_reward_model
from rewards.data import DatasetError
from rewards.preference import CALIBRATION_FILE, PreferenceScorer, normalize

torch.set_num_threads(2)


# ---- the loss -----------------------------------------------------------------------------------

def test_bradley_terry_loss_by_hand():
    # Margins 2 and 0: -log sigmoid(2) = log(1 + e^-2) = 0.1269, -log sigmoid(0) = log 2 = 0.6931.
    loss, accuracy = bradley_terry_loss(torch.tensor([2.0, 0.0]), torch.tensor([0.0, 0.0]))
    assert loss.item() == pytest.approx((math.log(1 + math.exp(-2)) + math.log(2)) / 2, abs=1e-6)
    assert accuracy == 0.5  # a tie is not a win
    # A margin of -1000 costs 1000, not inf: logsigmoid is stable.
    loss, accuracy = bradley_terry_loss(torch.tensor([0.0]), torch.tensor([1000.0]))
    assert loss.item() == pytest.approx(1000.0) and accuracy == 0.0


def test_bradley_terry_gradient_raises_chosen_and_lowers_rejected():
    chosen, rejected = torch.tensor([0.5, -1.0], requires_grad=True), torch.tensor([0.0, 1.0], requires_grad=True)
    loss, _ = bradley_terry_loss(chosen, rejected)
    loss.backward()
    # d loss / d chosen_i = -sigmoid(rejected_i - chosen_i) / N: negative, so descent raises it.
    expected = -torch.sigmoid(torch.tensor([-0.5, 2.0])) / 2
    assert torch.allclose(chosen.grad, expected) and torch.allclose(rejected.grad, -expected)


def test_bradley_terry_matches_a_loop():
    rng = np.random.default_rng(0)
    c, r = rng.normal(size=7), rng.normal(size=7)
    loss, accuracy = bradley_terry_loss(torch.tensor(c), torch.tensor(r))
    reference = sum(math.log(1 + math.exp(-(ci - ri))) for ci, ri in zip(c, r)) / 7
    assert loss.item() == pytest.approx(reference) and accuracy == pytest.approx(np.mean(c > r))


# ---- pair files ---------------------------------------------------------------------------------

def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_load_pairs_ids_and_errors(tmp_path):
    path = _write_jsonl(tmp_path / "p.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b", "id": "x7"},
                                               {"prompt": "q", "chosen": "a", "rejected": "c"}])
    assert [p.id for p in load_pairs(path, "train-rm")] == ["x7", "p.jsonl:1"]
    bad = _write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b"},
                                                {"prompt": "q", "chosen": "a"}])
    with pytest.raises(DatasetError, match=r"train-rm: .*bad\.jsonl:2: field 'rejected' is missing"):
        load_pairs(bad, "train-rm")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DatasetError, match="empty.jsonl has no rows"):
        load_pairs(tmp_path / "empty.jsonl", "train-rm")


def test_split_pairs_keeps_each_prompt_on_one_side():
    pairs = [Pair(f"question {i % 40}", "a", f"b{i}", str(i)) for i in range(200)]
    train, held_out = split_pairs(pairs, 0.25)
    assert {p.prompt for p in train}.isdisjoint({p.prompt for p in held_out})
    assert len(train) + len(held_out) == 200 and 0 < len(held_out) < 100
    assert split_pairs(pairs, 0.25) == (train, held_out)  # deterministic
    with pytest.raises(DatasetError, match=r"left 0 to train and 5 held out|left 5 to train and 0 held out"):
        split_pairs([Pair("one prompt", "a", "b", str(i)) for i in range(5)], 0.5)


def test_pairs_on_held_out_prompts_are_dropped_before_the_split(tmp_path, capsys):
    rows = _toy_pairs(200)
    evaluated = {r["prompt"] for r in rows[::7]}  # questions the policy is evaluated on
    path = _write_jsonl(tmp_path / "pairs.jsonl", rows)
    train, held_out = read_pairs(path, "stage reward_model", lambda q: q in evaluated, 0.2)
    kept = [r["id"] for r in rows if r["prompt"] not in evaluated]
    assert sorted(p.id for p in train + held_out) == sorted(kept) and held_out
    assert capsys.readouterr().out == f"r1ray: stage reward_model: dropped {200 - len(kept)} held-out rows of {path}\n"


def test_batch_order():
    batches = batch_order(10, 4, 5, random.Random(0))  # 2 epochs of 10 pairs in 5 batches of 4
    assert [len(b) for b in batches] == [4] * 5
    flat = [i for b in batches for i in b]
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:]) == list(range(10))


# ---- normalisation ------------------------------------------------------------------------------

def test_normalize_rules():
    s = np.array([-2.0, 0.0, 3.0])
    assert normalize(s, "none", None).tolist() == [-2.0, 0.0, 3.0]
    assert normalize(s, "sigmoid", None) == pytest.approx(1 / (1 + np.exp(-s)))
    # (s - 1) / 2 = -1.5, -0.5, 1.0
    assert normalize(s, "calibrated", {"mean": 1.0, "std": 2.0}) == pytest.approx(
        1 / (1 + np.exp(-np.array([-1.5, -0.5, 1.0]))))
    assert normalize(np.array([1.0]), "calibrated", {"mean": 0.0, "std": 0.0}) == pytest.approx([1.0])  # std floored
    with pytest.raises(ValueError, match=CALIBRATION_FILE):
        normalize(s, "calibrated", None)
    with pytest.raises(ValueError, match="calibrated, sigmoid, none"):
        normalize(s, "softmax", None)


def test_a_clipped_preference_reward_gives_answers_above_the_clip_no_advantage_over_each_other():
    from learner.grpo import group_advantages

    s = np.array([-2.0, 0.0, 3.0])
    assert normalize(s, "none", None, clip=1.0).tolist() == [-2.0, 0.0, 1.0]
    assert normalize(s, "none", None, clip=0.0).tolist() == [-2.0, 0.0, 3.0]  # 0: no clip
    # Clipped after the calibration: sigmoid(-1.5), sigmoid(-0.5), then 0.5 for sigmoid(1.0).
    assert normalize(s, "calibrated", {"mean": 1.0, "std": 2.0}, clip=0.5) == pytest.approx(
        [1 / (1 + np.exp(1.5)), 1 / (1 + np.exp(0.5)), 0.5])
    # Two groups of a prompt's answers: all rated above the clip (no signal), and one below it.
    rewards = torch.tensor(normalize(np.array([1.0, 2.0, 3.0, 4.0, -3.0, 2.0, 3.0, 4.0]), "sigmoid", None,
                                     clip=0.7).tolist())
    adv = group_advantages(rewards, 4)
    assert adv[:4].tolist() == [0.0] * 4
    assert adv[4] < 0 and adv[5] == adv[6] == adv[7] > 0


# ---- the model ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def base_model(tmp_path_factory) -> str:
    from learner.models import TinyLlamaSpec, tiny_llama_path

    spec = TinyLlamaSpec(hidden_size=64, num_layers=2, num_heads=2, intermediate_size=128,
                         max_position_embeddings=128, seed=0)
    return str(tiny_llama_path(spec, tmp_path_factory.mktemp("cache")))


def test_score_is_read_at_the_last_real_token(base_model):
    """Right padding with pad id 0 ("<pad>"): a text's score is the same alone and padded in a
    batch, even when the text itself contains "<pad>" (HF reads the rightmost non-pad token)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from rewards.preference import encode, pad_right, sequence_scores, set_pad_token

    tokenizer = AutoTokenizer.from_pretrained(base_model)
    model = AutoModelForSequenceClassification.from_pretrained(base_model, num_labels=1).eval()
    assert set_pad_token(model, tokenizer) == tokenizer.pad_token_id == 0
    texts = ["User: hi<pad> there <answer>no</answer>",
             "User: a much longer question, with more words <answer>7</answer>"]
    seqs = encode(tokenizer, texts, 128)
    assert 0 in seqs[0].tolist()  # the pad id inside the text
    with torch.no_grad():
        together = sequence_scores(model, *pad_right(seqs, 0))
        alone = [sequence_scores(model, *pad_right([s], 0))[0] for s in seqs]
    assert torch.allclose(together, torch.stack(alone), atol=1e-5)
    assert encode(tokenizer, texts, 5)[1].tolist() == seqs[1][-5:].tolist()  # keeps the end


def test_scorer_refuses_a_folder_without_what_it_needs(base_model, tmp_path):
    with pytest.raises(FileNotFoundError, match="not a model folder"):
        PreferenceScorer(str(tmp_path), "sigmoid", 4, 64)
    with pytest.raises(FileNotFoundError, match=f"no {CALIBRATION_FILE}"):
        PreferenceScorer(base_model, "calibrated", 4, 64)


def _toy_pairs(n: int, seed: int = 0) -> list[dict]:
    """Separable pairs: the same random reasoning, answered yes (chosen) or no (rejected)."""
    rng = random.Random(seed)
    words = "the a of number sum check column carry add many few big small odd even".split()
    rows = []
    for i in range(n):
        think = " ".join(rng.choices(words, k=rng.randint(2, 8)))
        prompt = f"Is {rng.randint(0, 999)} {' '.join(rng.choices(words, k=rng.randint(1, 6)))}?"
        rows.append({"prompt": prompt, "chosen": f" {think} </think> <answer>yes</answer>",
                     "rejected": f" {think} </think> <answer>no</answer>", "id": f"toy{i}"})
    return rows


@pytest.fixture(scope="module")
def trained(ray_cluster, base_model, tmp_path_factory):
    """A reward model trained on 300 toy pairs by two ZeRO-2 ranks: (config, metrics, folder, data)."""
    from cluster.config import load_config

    tmp = tmp_path_factory.mktemp("rm")
    data = _write_jsonl(tmp / "pairs.jsonl", _toy_pairs(300))
    cfg = load_config(None, [
        "learner.num_ranks=2", "learner.num_cpus=1", "learner.threads=1", "learner.zero_stage=2",
        "learner.micro_batch_size=8", "reward_model.epochs=2", "reward_model.batch_size=16",
        "reward_model.lr=2e-3", "reward_model.eval_fraction=0.2", "rollout.max_model_len=128",
        "cluster.num_cpus=2", f"cluster.cache_dir={tmp}", "logging.wandb_mode=disabled",
        "logging.progress=false"])
    results = train_reward_model(cfg, str(data), tmp / "rm", base_model, held_out=lambda question: False)
    return cfg, results, tmp / "rm", data


@pytest.mark.slow
def test_training_separates_the_toy_pairs(trained):
    _, results, out, _ = trained
    assert results["rm/held_out_accuracy"] >= 0.95, results
    assert results["rm/train_loss"] < 0.5 * math.log(2), results  # it starts near log 2 (scores ~0)
    assert results["rm/steps"] == math.ceil(2 * (300 - results["rm/held_out_pairs"]) / 16)
    assert (out / "config.json").is_file() and list(out.glob("*.safetensors"))
    calibration = json.loads((out / CALIBRATION_FILE).read_text())
    assert calibration["held_out_accuracy"] == results["rm/held_out_accuracy"] and calibration["std"] > 0
    assert not list(out.parent.glob(".rm.partial-*"))  # the temporary folder was renamed


@pytest.mark.slow
def test_scorer_actor_prefers_chosen_and_ignores_batching(trained):
    import ray

    from cluster.prompts import prompt_format

    cfg, _, out, data = trained
    _, held_out = split_pairs(load_pairs(data, "test"), cfg.reward_model.eval_fraction)
    render = prompt_format(cfg, str(out)).render
    prompts = [render(p.prompt) for p in held_out]
    responses = [p.chosen for p in held_out] + [p.rejected for p in held_out]

    def scorer(batch_size, rule="calibrated"):
        return ray.remote(PreferenceScorer).options(num_cpus=0.5).remote(str(out), rule, batch_size, 128)

    by_7, by_1, raw_7 = scorer(7), scorer(1), scorer(7, "none")
    scores = np.array(ray.get(by_7.score.remote(prompts * 2, responses), timeout=300))  # [2H]
    chosen, rejected = scores[:len(held_out)], scores[len(held_out):]
    assert np.mean(chosen > rejected) >= 0.95 and ((scores > 0) & (scores < 1)).all()
    assert np.allclose(ray.get(by_1.score.remote(prompts * 2, responses), timeout=300), scores, atol=1e-4)
    # Input order is kept: reversed inputs give reversed scores.
    reversed_scores = ray.get(by_7.score.remote((prompts * 2)[::-1], responses[::-1]), timeout=300)
    assert np.allclose(reversed_scores, scores[::-1], atol=1e-5)
    # The scorer reads the text exactly as training did: its raw scores have the saved mean and std.
    raw = np.array(ray.get(raw_7.score.remote(prompts * 2, responses), timeout=300))
    calibration = json.loads((out / CALIBRATION_FILE).read_text())
    assert raw.mean() == pytest.approx(calibration["mean"], abs=1e-3)
    assert raw.std() == pytest.approx(calibration["std"], rel=1e-3)
    for actor in (by_7, by_1, raw_7):
        ray.kill(actor)


@pytest.mark.slow
def test_zero3_bf16_trains_and_saves_a_float32_folder(ray_cluster, base_model, tmp_path):
    """ZeRO-3 partitions the weights: held-out scoring and saving run on every rank."""
    from cluster.config import load_config
    from cluster.prompts import prompt_format

    data = _write_jsonl(tmp_path / "pairs.jsonl", _toy_pairs(200, seed=1))
    cfg = load_config(None, [
        "learner.num_ranks=2", "learner.num_cpus=1", "learner.threads=1", "learner.zero_stage=3",
        "learner.dtype=bfloat16", "learner.micro_batch_size=8", "reward_model.epochs=2",
        "reward_model.batch_size=16", "reward_model.lr=2e-3", "reward_model.eval_fraction=0.2",
        "rollout.max_model_len=128", "logging.wandb_mode=disabled", "logging.progress=false"])
    results = train_reward_model(cfg, str(data), tmp_path / "rm", base_model, held_out=lambda question: False)
    assert results["rm/held_out_accuracy"] >= 0.95, results
    _, held_out = split_pairs(load_pairs(data, "test"), cfg.reward_model.eval_fraction)
    prompts = [prompt_format(cfg, base_model).render(p.prompt) for p in held_out]
    scorer = PreferenceScorer(str(tmp_path / "rm"), "sigmoid", 16, 128)  # loads as float32
    chosen = np.array(scorer.score(prompts, [p.chosen for p in held_out]))
    rejected = np.array(scorer.score(prompts, [p.rejected for p in held_out]))
    assert np.mean(chosen > rejected) >= 0.95


@pytest.mark.slow
def test_a_dead_preference_scorer_is_replaced_and_the_answers_scored_again(trained):
    # The reward workers reach the scorer by its name, so after the driver replaces it (killed
    # as the OOM killer would) they score through the new one: the same scores, one fault.
    import os
    import signal

    from cluster.config import load_config
    from cluster.faults import Faults, RestartsExhausted, actor_pid
    from cluster.prompts import prompt_format
    from cluster.reward_pool import RewardPool
    from common.records import Sample
    from rewards.tasks import General, Problem

    _, _, out, data = trained
    pairs = load_pairs(data, "test")[:6]
    problems = {f"g{i}": Problem(f"g{i}", "general", p.prompt, None) for i, p in enumerate(pairs)}

    def start(*overrides) -> RewardPool:
        cfg = load_config(None, [f"rewards.preference_model={out}", "rewards.preference_normalize=sigmoid",
                                 "rollout.max_model_len=128", "logging.wandb_mode=disabled", *overrides])
        return RewardPool(cfg, {"general": General(tuple(problems.values()), ())},
                          prompt_format(cfg, str(out)).render, Faults.of(cfg))

    def scored(pool: RewardPool) -> list[float]:
        ids = np.arange(4, dtype=np.int32)
        samples = [Sample(pid, ids, ids, np.zeros(4, np.float32), text, "stop", 0)
                   for pid, p in zip(problems, pairs) for text in (p.chosen, p.rejected)]
        pool.score(samples, problems, timeout_s=300)
        return [s.reward_breakdown["preference"] for s in samples]

    pool = start("rewards.max_restarts=1")
    before = scored(pool)
    os.kill(actor_pid(pool.preference.actor), signal.SIGKILL)
    assert scored(pool) == before and pool.faults.counts["preference"] == 1
    assert np.mean(np.array(before[::2]) > np.array(before[1::2])) >= 5 / 6  # chosen above rejected
    os.kill(actor_pid(pool.preference.actor), signal.SIGKILL)  # one more than rewards.max_restarts=1
    with pytest.raises(RestartsExhausted, match=r"^preference died while scoring: .+; rewards.max_restarts=1"):
        scored(pool)
    pool.shutdown()
    # rewards.preference_clip caps the rewards: those above it tie, those below are unchanged.
    clip = float(np.median(before))
    pool = start(f"rewards.preference_clip={clip!r}")
    assert scored(pool) == [min(b, clip) for b in before] and sum(b > clip for b in before) == 6
    pool.shutdown()
