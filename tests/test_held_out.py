"""A pipeline stage's held-out split: the questions the pipeline evaluates on plus its own mixture's
eval split (no Ray; each stage's dropping of them is tested beside the stage, and the stages run
with it in tests/test_recipe.py)."""

import json
import random

import pytest
import yaml

from cluster.config import ConfigError
from recipes.recipe import _evaluation, _stage_config, held_out_split, load_recipe, reported_split
from rewards import sorting
from rewards.tasks import build_mixture, in_eval_bucket


def _recipe(tmp_path, stages, evaluate):
    path = tmp_path / "r.yaml"
    config = {"task": {"arithmetic": {"weight": 1.0, "max_digits": 1}}, "cluster": {"runs_dir": str(tmp_path)}}
    path.write_text(yaml.safe_dump({"name": "r", "config": config, "evaluate": evaluate, "stages": stages}))
    return load_recipe(path)


def test_a_stage_holds_out_the_pipelines_evaluation_and_its_own_eval_split(tmp_path):
    rows = sorting.sft_rows(random.Random(0), 300)
    general = tmp_path / "general.jsonl"
    general.write_text("".join(json.dumps(r) + "\n" for r in rows))
    stages = [{"name": "general_data", "kind": "general", "rows": 300},
              {"name": "sft", "kind": "sft", "data": "@general_data",
               "set": {"task": {"countdown": {"weight": 1.0}}}}]  # a task only this stage has
    recipe = _recipe(tmp_path, stages, {"set": {"task": {"general": {"weight": 0.5, "path": "@general_data"}}}})
    outputs = {"general_data": str(general)}
    stage_cfg = _stage_config(recipe, recipe.stages[1], outputs)
    held = held_out_split(recipe, stage_cfg, outputs)

    evaluated = {r["prompt"] for r in rows if in_eval_bucket(r["prompt"])}  # task.general's rule
    assert 10 < len(evaluated) < 60
    assert [r["prompt"] for r in rows if held(r["prompt"])] == [r["prompt"] for r in rows if r["prompt"] in evaluated]
    stage = build_mixture(stage_cfg.task)
    for name in ("arithmetic", "countdown"):
        assert all(held(p.prompt) for p in stage.tasks[name].problems(0, 8)), name
        assert not any(held(p.prompt) for p in stage.sample(random.Random(0), 200, names=[name])), name


def test_evaluate_may_not_read_what_a_training_stage_precedes(tmp_path):
    stages = [{"name": "cold_start", "kind": "sft", "data": str(tmp_path / "t.jsonl")},
              {"name": "general_data", "kind": "general", "rows": 30}]
    with pytest.raises(ConfigError, match="evaluate refers to @general_data, which runs after stage 'cold_start'"):
        _recipe(tmp_path, stages, {"set": {"task": {"general": {"weight": 0.5, "path": "@general_data"}}}})


def test_the_r1_zero_miniature_never_trains_on_its_held_out_sums():
    from pathlib import Path

    from cluster.config import load_config

    cfg = load_config(Path(__file__).parents[1] / "configs/r1-zero-mini.yaml")
    tasks = build_mixture(cfg.task)
    held = {p.prompt for p in tasks.eval_problems(cfg.algorithm.seed, cfg.task.eval_prompts)}
    assert len(held) == cfg.task.eval_prompts
    # what the cold start writes traces for, and what RL draws: the same train split
    drawn = tasks.sample(random.Random(0), 20_000, names=tasks.with_traces())
    assert not held & {p.prompt for p in drawn}
    assert all(tasks.held_out(q) for q in held) and not any(tasks.held_out(p.prompt) for p in drawn[:2000])


def test_the_r1_recipes_rl_stages_validate_on_held_out_questions_the_table_does_not_report(tmp_path):
    # What final RL's early stop reads must not be what the pipeline's table reports: the
    # stage's own evaluation (cluster/train.py, avoid=reported) is drawn past the table's.
    from collections import Counter
    from pathlib import Path

    recipe = load_recipe(Path(__file__).parents[1] / "configs/r1.yaml")
    general = tmp_path / "general.jsonl"
    general.write_text("".join(json.dumps(r) + "\n" for r in sorting.sft_rows(random.Random(0), 2000)))
    outputs = {s.name: str(general if s.name == "general_data" else tmp_path / s.name) for s in recipe.stages}
    problems = _evaluation(recipe, outputs)[2]
    table = {p.prompt for p in problems}
    assert len(problems) == recipe.eval_prompts
    reported = reported_split(recipe, outputs)
    assert all(map(reported, table))
    for name, shares in [("reasoning_rl", {"arithmetic": 200}), ("final_rl", {"arithmetic": 320, "general": 80})]:
        cfg = _stage_config(recipe, next(s for s in recipe.stages if s.name == name), outputs)
        tasks = build_mixture(cfg.task)
        own = tasks.eval_problems(cfg.algorithm.seed, cfg.task.eval_prompts, avoid=reported)
        assert Counter(p.task for p in own) == shares and cfg.eval.every > 0, name
        assert not table & {p.prompt for p in own} and all(tasks.held_out(p.prompt) for p in own), name
