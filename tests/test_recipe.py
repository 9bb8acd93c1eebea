"""`r1ray pipeline`: a tiny R1 recipe with every stage kind, end to end on real Ray, DeepSpeed and
engines; a rerun skips what is done; bad input stops with the stage and the path.

The stages' engines are the transformers one except the distillation's, which is vLLM: a stage
starts engines of its own for each evaluation and each sampling (twelve here), and a vLLM
engine takes twice as long to start (~25 s against ~11 s on these machines). Both engines
sit behind the same rollout pool, so a stage's code is the same with either (vLLM in the
loop: tests/test_e2e.py)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from recipes.recipe import load_recipe

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent

# 1-digit additions: a 0.3M-parameter model learns them from a few hundred traces in seconds,
# so the later stages have a policy that is sometimes right.
CONFIG = {
    "model": {"path": "tiny", "hidden_size": 64, "num_layers": 2, "num_heads": 2, "intermediate_size": 256},
    "task": {"arithmetic": {"weight": 1.0, "max_digits": 1}, "eval_prompts": 0},
    "cold_start": {"steps": 0},
    "algorithm": {"steps": 2, "prompts_per_step": 4, "group_size": 4, "updates_per_step": 1},
    "rollout": {"engine": "transformers", "max_new_tokens": 16, "max_model_len": 64, "num_cpus": 0.5},
    "learner": {"num_cpus": 0.5, "threads": 1, "dtype": "float32"},  # the same numbers on every CPU
    "sft": {"lr": 3.0e-3, "tokens_per_step": 512, "epochs": 6},
    "checkpoint": {"every": 0},
    "logging": {"wandb_mode": "disabled", "progress": False},
}


def _recipe(tmp_path, stages, evaluate=None, name="tiny-r1"):
    config = {**CONFIG, "cluster": {"runs_dir": str(tmp_path / "runs"), "cache_dir": str(tmp_path / "cache")}}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"name": name, "config": config, "evaluate": evaluate or {"prompts": 8},
                                    "stages": stages}))
    return path


def _pipeline(path, *args, timeout=1200, env=None):
    return subprocess.run([sys.executable, "-m", "r1ray", "pipeline", str(path), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})


STAGES = [
    {"name": "traces", "kind": "traces", "rows": 600},
    {"name": "general_data", "kind": "general", "rows": 300},
    {"name": "preferences", "kind": "pairs", "rows": 300},
    {"name": "cold_start", "kind": "sft", "data": "@traces"},
    {"name": "reasoning_rl", "kind": "rl", "model": "@cold_start", "set": {"rewards": {"language_weight": 0.1}}},
    {"name": "rejection", "kind": "rejection", "model": "@reasoning_rl",
     "set": {"rejection": {"prompts": 48, "k": 4}}},
    # Four general rows per reasoning row: the SFT model learns enough sorting to be right
    # sometimes, so its own answers make pairs, as in configs/r1.yaml.
    {"name": "sft", "kind": "sft", "data": "@rejection",
     "set": {"sft": {"mix_path": "@general_data", "mix_ratio": 4, "epochs": 12}}},
    {"name": "policy_pairs", "kind": "policy_pairs", "model": "@sft", "data": "@preferences",
     "set": {"task": {"general": {"weight": 0.5, "path": "@general_data"}}, "rejection": {"prompts": 64, "k": 4},
             "rollout": {"max_new_tokens": 24}}},  # a sorted answer is 18 tokens
    {"name": "reward_model", "kind": "reward_model", "data": "@policy_pairs", "set": {"reward_model": {"epochs": 1}}},
    {"name": "final_rl", "kind": "rl", "model": "@sft",
     "set": {"task": {"general": {"weight": 0.5, "path": "@general_data"}},
             "rewards": {"preference_model": "@reward_model"}}},
    {"name": "distill", "kind": "distill", "model": "@cold_start",
     "student": {"path": "tiny", "hidden_size": 64, "num_layers": 1, "num_heads": 2, "intermediate_size": 128},
     "set": {"task": {"eval_prompts": 8}, "rejection": {"prompts": 256, "k": 4}, "rollout": {"engine": "vllm"}}},
]


def test_every_stage_runs_feeds_the_next_and_is_skipped_once_done(tmp_path):
    path = _recipe(tmp_path, STAGES, {"prompts": 8, "set": {"task": {"general": {"weight": 0.5,
                                                                                  "path": "@general_data"}}}})
    run = _pipeline(path)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    folder = tmp_path / "runs" / "tiny-r1"
    records = {r["stage"]: r for r in json.loads((folder / "summary.json").read_text())}
    assert list(records) == ["base"] + [s["name"] for s in STAGES]
    for stage in STAGES:
        assert Path(records[stage["name"]]["output"]).exists(), stage["name"]
    # Each model stage is evaluated on both tasks; cold start taught the policy something.
    for name in ("base", "cold_start", "reasoning_rl", "sft", "final_rl", "distill"):
        assert {"pass@1/greedy/arithmetic", "pass@1/greedy/general"} <= set(records[name]["eval"]), name
    assert records["cold_start"]["eval"]["pass@1/greedy/arithmetic"] > records["base"]["eval"]["pass@1/greedy/arithmetic"]
    # Rejection sampling writes SFT rows with their provenance; only right answers are kept.
    rows = [json.loads(line) for line in (folder / "rejection" / "data.jsonl").read_text().splitlines()]
    assert rows and all(r["scores"]["correct"] == 1.0 and r["scores"]["format"] == 1.0 for r in rows)
    assert {"id", "prompt_id", "task", "prompt", "response", "model", "model_step", "scores"} <= set(rows[0])
    assert rows[0]["model"].endswith("reasoning_rl/model") and rows[0]["model_step"] == 2
    assert len({(r["prompt_id"], r["response"]) for r in rows}) == len(rows)  # deduplicated
    # The reward model learned the synthetic pairs and the SFT model's own answers, right over
    # wrong by the reference; those are train prompts.
    pairs = [json.loads(line) for line in (folder / "policy_pairs" / "data.jsonl").read_text().splitlines()]
    given = [json.loads(line) for line in (folder / "preferences" / "data.jsonl").read_text().splitlines()]
    policy = [p for p in pairs if p.get("source") == "policy"]
    assert pairs[:len(given)] == given and len(policy) == len(pairs) - len(given) == records["policy_pairs"]["metrics"][
        "pairs/policy"] > 0
    from rewards.format import clean, final_answer

    general = {r["prompt"]: r["answer"] for r in
               (json.loads(line) for line in (folder / "general_data" / "data.jsonl").read_text().splitlines())}
    for p in policy:
        assert final_answer(clean(p["chosen"])).strip() == general[p["prompt"]] \
            != (final_answer(clean(p["rejected"])) or "").strip()
    # The final RL scored general prompts with the reward model, arithmetic with rules.
    metrics = [json.loads(line) for line in (folder / "final_rl" / "metrics.jsonl").read_text().splitlines()]
    judged = [m["reward/preference"] for m in metrics if "reward/preference" in m]  # steps that drew general prompts
    assert judged and all(0.0 < p < 1.0 for p in judged)
    # The reported held-out accuracy is the one saved with the model for calibration.
    from rewards.preference import CALIBRATION_FILE

    rm = records["reward_model"]
    saved = json.loads((Path(rm["output"]) / CALIBRATION_FILE).read_text())
    assert rm["metrics"]["rm/held_out_accuracy"] == saved["held_out_accuracy"]
    assert rm["metrics"]["rm/held_out_pairs"] == saved["pairs"]
    # Distillation raised the student's accuracy toward the teacher's.
    d = records["distill"]["metrics"]
    assert d["student_before/pass@1/greedy"] < d["student/pass@1/greedy"] <= d["teacher/pass@1/greedy"] + 0.25
    _check_no_stage_trained_on_held_out_questions(folder.resolve(), run.stdout)
    # Done stages are skipped: a second run trains nothing and prints the same table.
    again = _pipeline(path, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert again.stdout.count("done before, skipped") == len(STAGES)
    assert "r1ray pipeline tiny-r1" in again.stdout


def _check_no_stage_trained_on_held_out_questions(folder, stdout):
    """Each stage that reads training data said how many held-out rows it dropped: the general
    prompts evaluated on (task.general's tenth of @general_data) are gone from the SFT mix and
    the reward model's pairs; the data the stages wrote holds no held-out question."""
    from cluster.config import load_config
    from rewards.tasks import build_mixture, in_eval_bucket

    def rows(stage, name="data.jsonl"):
        return [json.loads(line) for line in (folder / stage / name).read_text().splitlines()]

    general = rows("general_data")
    evaluated = {r["prompt"] for r in general if in_eval_bucket(r["prompt"])}
    addition = build_mixture(load_config(None, ["task.arithmetic.max_digits=1"]).task)
    drops = {"cold_start": ("traces", 0), "sft": ("rejection", 0),
             "sft (sft.mix_path)": ("general_data", sum(r["prompt"] in evaluated for r in general)),
             "reward_model": ("policy_pairs", sum(r["prompt"] in evaluated for r in rows("policy_pairs"))),
             "distill: student SFT": ("distill", 0)}
    assert drops["sft (sft.mix_path)"][1] > 0 and drops["reward_model"][1] > 0
    for stage, (source, n) in drops.items():
        name = "traces.jsonl" if source == "distill" else "data.jsonl"
        assert f"r1ray: stage {stage}: dropped {n} held-out rows of {folder / source / name}\n" in stdout, stage
    assert f"r1ray: final_rl (task.general): dropped 0 held-out rows of {folder / 'general_data' / 'data.jsonl'}\n" \
        in stdout
    policy = [r for r in rows("policy_pairs") if r.get("source") == "policy"]
    for written in rows("rejection") + rows("distill", "traces.jsonl") + policy:  # train prompts only
        assert not addition.held_out(written["prompt"]) and written["prompt"] not in evaluated


def test_a_missing_input_stops_with_the_stage_and_the_path(tmp_path):
    path = _recipe(tmp_path, [{"name": "cold_start", "kind": "sft", "data": str(tmp_path / "nope.jsonl")}])
    run = _pipeline(path, timeout=300)
    assert run.returncode == 2
    assert f"stage cold_start: its input {tmp_path / 'nope.jsonl'} is missing" in run.stderr


def test_an_sft_row_without_a_field_names_file_line_and_field(tmp_path):
    data = tmp_path / "traces.jsonl"
    data.write_text('{"prompt": "1+2=?", "response": "3</think><answer>3</answer>"}\n{"prompt": "2+2=?"}\n')
    run = _pipeline(_recipe(tmp_path, [{"name": "cold_start", "kind": "sft", "data": str(data)}]), timeout=300,
                    env={"RAY_TMPDIR": str(tmp_path / "ray")})
    assert run.returncode == 2
    assert f"stage cold_start: {data}:2: field 'response' is missing" in run.stderr
    assert not (tmp_path / "ray").exists()  # found before a Ray session was started


def test_rejection_sampling_that_keeps_nothing_says_so_with_the_statistics(tmp_path):
    # An untrained model never answers in the format: nothing passes, and no file is written.
    path = _recipe(tmp_path, [{"name": "rejection", "kind": "rejection", "set": {"rejection": {"prompts": 8, "k": 2}}}])
    run = _pipeline(path, timeout=600)
    assert run.returncode == 1
    assert "stage rejection: rejection sampling kept no answer of 16" in run.stderr
    assert "arithmetic: kept 0/16 (0%), 0/8 prompts with one or more; rejected: wrong 16" in run.stderr
    assert not (tmp_path / "runs" / "tiny-r1" / "rejection" / "data.jsonl").exists()


@pytest.mark.parametrize("stages, message", [
    ([{"name": "a", "kind": "sft", "data": "@b"}], "stage 'a' refers to @b, which is not an earlier stage"),
    ([{"name": "a", "kind": "bake"}], "kind 'bake' is not one of"),
    ([{"name": "a", "kind": "sft"}], "stage 'a' (sft) needs data"),
    ([{"name": "a", "kind": "traces", "rows": 1}, {"name": "a", "kind": "traces", "rows": 1}], "used twice"),
])
def test_a_bad_recipe_is_refused_before_anything_runs(tmp_path, stages, message):
    from cluster.config import ConfigError

    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_recipe(_recipe(tmp_path, stages))


@pytest.mark.parametrize("evaluate, message", [
    ({"prompts": 8, "k": 0}, "evaluate.k=0: give a whole number of samples, 1 or more"),
    ({"prompts": 8, "k": 2.5}, "evaluate.k=2.5: give a whole number"),
    ({"prompts": 8, "samples": 4}, "evaluate has unknown key 'samples'; valid: prompts, k, set"),
])
def test_a_bad_evaluation_is_refused_before_anything_runs(tmp_path, evaluate, message):
    from cluster.config import ConfigError

    stages = [{"name": "a", "kind": "traces", "rows": 1}]
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_recipe(_recipe(tmp_path, stages, evaluate))
    assert load_recipe(_recipe(tmp_path, stages, {"prompts": 8, "k": 4})).eval_k == 4


def test_the_shipped_recipes_load():
    recipe = load_recipe(ROOT / "configs" / "r1.yaml")
    kinds = [s.kind for s in recipe.stages]
    assert kinds.index("sft") < kinds.index("rl") < kinds.index("rejection") < kinds.index("distill")
    assert {"traces", "general", "pairs", "sft", "rl", "rejection", "policy_pairs", "reward_model", "distill"} == set(kinds)


def _cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "r1ray", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def test_distill_and_train_rm_commands_name_what_is_wrong(tmp_path):
    run = _cli("distill", "--teacher", str(tmp_path), "--student", "tiny", "--task", "poetry")
    assert run.returncode == 2 and "--task 'poetry' is not a task; choose one of arithmetic" in run.stderr
    run = _cli("distill", "--teacher", str(tmp_path / "none"), "--student", "tiny", "--task", "arithmetic")
    assert run.returncode == 2 and f"model.path={str(tmp_path / 'none')!r} is not a Hugging Face model folder" in run.stderr
    run = _cli("train-rm", "--data", str(tmp_path / "pairs.jsonl"), "--out", str(tmp_path / "rm"),
               f"cluster.cache_dir={tmp_path / 'cache'}", "logging.wandb_mode=disabled")
    assert run.returncode == 2 and f"train-rm: {tmp_path / 'pairs.jsonl'} does not exist" in run.stderr
