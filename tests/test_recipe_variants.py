"""A variant of a recipe from the command line: `key=value` overrides of the recipe file, and
`--from RUN --redo STAGE --until STAGE` to rerun one stage of a finished run differently,
taking the stages before it as they are. Only data stages run here (no Ray, no model)."""

import json

import pytest
import yaml

from cluster.config import ConfigError
from recipes.recipe import load_recipe, run_recipe

STAGES = [
    {"name": "traces", "kind": "traces", "rows": 5},
    {"name": "general_data", "kind": "general", "rows": 6},
    {"name": "preferences", "kind": "pairs", "rows": 7},
]


@pytest.fixture
def recipe_file(tmp_path):
    path = tmp_path / "r.yaml"
    config = {"task": {"arithmetic": {"weight": 1.0, "max_digits": 1}},
              "cluster": {"runs_dir": str(tmp_path / "runs"), "cache_dir": str(tmp_path / "cache")},
              "logging": {"wandb_mode": "disabled"}}
    path.write_text(yaml.safe_dump({"name": "first", "config": config, "evaluate": {"prompts": 8}, "stages": STAGES}))
    return path


def _lines(path):
    return len(open(path).read().splitlines())


def _stand_in_base(folder):
    """A base-model row written by hand (a stand-in: evaluating a model needs engines)."""
    folder.mkdir(parents=True)
    (folder / "base.json").write_text(json.dumps({"stage": "base", "kind": "model", "output": "tiny",
                                                  "metrics": {}, "eval": {}, "minutes": 0.0}))


def test_overrides_change_the_name_the_config_the_evaluation_and_one_stage(recipe_file):
    recipe = load_recipe(recipe_file, ["name=second", "config.task.arithmetic.max_digits=2", "evaluate.k=4",
                                       "preferences.rows=9", "general_data.set.task.eval_prompts=3",
                                       "preferences.data=@traces"])
    assert recipe.name == "second" and recipe.folder.name == "second"
    assert recipe.config["task"]["arithmetic"] == {"weight": 1.0, "max_digits": 2}
    assert recipe.eval_k == 4
    assert [s.rows for s in recipe.stages] == [5, 6, 9]
    assert recipe.stages[1].set == {"task": {"eval_prompts": 3}}
    assert recipe.stages[2].data == "@traces"  # not YAML: the text as given
    assert load_recipe(recipe_file).stages[2].rows == 7  # the file is not changed


@pytest.mark.parametrize("override, message", [
    ("reward_model.data=@preferences", "override 'reward_model.data=@preferences': give name=..., "
                                       "config.<key>=..., evaluate.<key>=... or <stage>.<key>=... with a stage "
                                       "of traces, general_data, preferences"),
    ("traces=3", "override 'traces=3': give name=..."),
    ("evaluate.k=0", "evaluate.k=0: give a whole number of samples"),  # checked like the file's own keys
    ("traces.kind=bake", "kind 'bake' is not one of"),
])
def test_a_bad_override_names_itself_and_what_is_valid(recipe_file, override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
        load_recipe(recipe_file, [override])


def test_a_variant_takes_the_stages_before_redo_from_the_run_it_names_and_stops_at_until(recipe_file, tmp_path):
    runs = tmp_path / "runs"
    _stand_in_base(runs / "first")
    first = run_recipe(load_recipe(recipe_file))
    assert [r["status"] for r in first] == ["skipped (done)", "ran", "ran", "ran"]
    assert _lines(runs / "first" / "preferences" / "data.jsonl") == 7

    variant = load_recipe(recipe_file, ["name=second", "general_data.rows=4", "preferences.rows=3"])
    records = run_recipe(variant, redo="general_data", until="general_data", source=runs / "first")
    assert [(r["stage"], r["status"]) for r in records] == [
        ("base", f"taken from {runs / 'first'}"), ("traces", f"taken from {runs / 'first'}"), ("general_data", "ran")]
    assert records[1]["output"] == str(runs / "first" / "traces" / "data.jsonl")  # read where it is, not copied
    assert _lines(runs / "second" / "general_data" / "data.jsonl") == 4
    assert not (runs / "second" / "traces").exists() and not (runs / "second" / "preferences").exists()
    assert _lines(runs / "first" / "general_data" / "data.jsonl") == 6  # the run it came from is untouched

    # Again without --until: what this run did is kept, and what comes after it is its own,
    # never the other run's (which learned from a different general_data).
    records = run_recipe(variant, source=runs / "first")
    assert [r["status"] for r in records][2:] == ["skipped (done)", "ran"]
    assert _lines(runs / "second" / "preferences" / "data.jsonl") == 3


@pytest.mark.parametrize("kwargs, message", [
    ({"until": "nope"}, "--until 'nope' is not a stage; stages: traces, general_data, preferences"),
    ({"redo": "nope"}, "--redo 'nope' is not a stage"),
    ({"source": "/nowhere"}, "--from /nowhere: not a folder; give another run of this recipe, e.g. runs/first"),
])
def test_bad_flags_are_refused_before_anything_runs(recipe_file, tmp_path, kwargs, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        run_recipe(load_recipe(recipe_file), **kwargs)
    assert not (tmp_path / "runs" / "first").exists()
