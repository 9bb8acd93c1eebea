"""Config loading: YAML + dotted overrides, and errors that name the key, value and valid range."""

from pathlib import Path

import pytest

from cluster.config import Config, ConfigError, field_docs, load_config
from learner.config import LearnerConfig

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_overrides_are_typed_and_applied():
    cfg = load_config(None, ["learner.lr=1e-5", "algorithm.group_size=4", "learner.dtype=bfloat16",
                             "algorithm.normalize_std=false"])
    assert cfg.learner.lr == 1e-5  # YAML reads "1e-5" as a string: coerced by the field's type
    assert cfg.algorithm.group_size == 4
    assert cfg.learner.dtype == "bfloat16"
    assert cfg.algorithm.normalize_std is False
    assert cfg.samples_per_step == cfg.algorithm.prompts_per_step * 4


def test_default_yaml_is_the_built_in_default():
    assert load_config(CONFIGS / "default.yaml") == load_config()


RECIPES = ("r1.yaml",)
"""Recipe files (`r1ray pipeline`), checked by tests/test_recipe.py."""


@pytest.mark.parametrize("path", sorted(p for p in CONFIGS.glob("*.yaml") if p.name not in RECIPES),
                         ids=lambda p: p.name)
def test_every_example_config_loads(path):
    import yaml

    from cluster.config import to_dict
    from cluster.precision import resolve_dtype

    def leaves(tree, prefix=""):
        for key, value in tree.items():
            yield from leaves(value, f"{prefix}{key}.") if isinstance(value, dict) else [(prefix + key, value)]

    loaded = dict(leaves(to_dict(load_config(path))))
    for key, value in leaves(yaml.safe_load(path.read_text()) or {}):
        if (key, value) == ("learner.dtype", "auto"):  # the run sees this machine's choice
            value = resolve_dtype("auto", loaded["learner.num_gpus"])
        if key.startswith("algorithm.") and value == "auto":  # chosen from the others (test below)
            continue
        assert loaded[key] == value, key  # every value the file sets, as the run will see it


@pytest.mark.parametrize("overrides, chosen", [
    ([], dict(loss="grpo", aggregation="token", clip_low=0.2, clip_high=0.2, mismatch="none", old_logprobs="sampler")),
    (["algorithm.loss=gspo"], dict(aggregation="sequence", clip_low=3e-4, clip_high=4e-4)),
    (["algorithm.loss=cispo"], dict(aggregation="token", clip_low=1.0, clip_high=5.0)),
    (["algorithm.loss=gspo", "algorithm.clip_high=1e-3"], dict(clip_low=3e-4, clip_high=1e-3)),  # one side set
    (["algorithm.max_staleness=1"], dict(mismatch="tis", old_logprobs="learner")),
    (["algorithm.mismatch=mis_token"], dict(old_logprobs="learner", mismatch_low=0.5, mismatch_high=2.0)),
    (["algorithm.mismatch=geo_mask"], dict(mismatch_low=0.99, mismatch_high=1.01)),
    (["algorithm.max_staleness=1", "algorithm.mismatch=none"], dict(mismatch="none", old_logprobs="sampler")),
])
def test_the_algorithms_auto_and_null_fields_are_chosen_from_the_others(overrides, chosen, tmp_path):
    import yaml

    from cluster.config import to_dict

    algo = load_config(None, overrides).algorithm
    assert {k: getattr(algo, k) for k in chosen} == chosen
    # The run's config.yaml records the choice, and loads back to the same config.
    saved = tmp_path / "config.yaml"
    saved.write_text(yaml.safe_dump(to_dict(load_config(None, overrides))))
    assert load_config(saved) == load_config(None, overrides)


@pytest.mark.parametrize("overrides, message", [
    (["algorithm.loss=gspo", "algorithm.aggregation=token"],
     "algorithm.loss=gspo clips one ratio per sequence and averages over sequences; algorithm.aggregation=token"),
    (["algorithm.loss=cispo", "algorithm.dual_clip=3"],
     "algorithm.loss=cispo clips the importance weight, its only clip range; algorithm.dual_clip=3 would add"),
    (["algorithm.kl_beta=0.04", "algorithm.kl_reference=none"],
     "algorithm.kl_beta=0.04 estimates a KL to a reference model, but algorithm.kl_reference=none has none"),
    (["algorithm.mismatch=tis", "algorithm.old_logprobs=sampler"],
     "algorithm.mismatch=tis weights tokens by pi_old / pi_sampler, which algorithm.old_logprobs=sampler"),
    (["algorithm.dual_clip=0.5"], "algorithm.dual_clip=0.5 must be 0 (off) or above 1"),
    (["algorithm.kl_beta=0.04", "algorithm.kl_in=reward", "rollout.top_p=0.9"],
     "algorithm.kl_in=reward takes the KL from the sampler's log-probs, which rollout.top_p=0.9"),
])
def test_combinations_that_make_no_sense_stop_at_load_naming_both_keys(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_overrides_win_over_the_file(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("learner:\n  lr: 0.1\n  zero_stage: 3\n")
    cfg = load_config(f, ["learner.lr=0.2"])
    assert (cfg.learner.lr, cfg.learner.zero_stage) == (0.2, 3)


@pytest.mark.parametrize("override, message", [
    ("learner.lrr=1", "unknown config key learner.lrr; valid keys in learner: num_ranks"),
    ("lerner.lr=1", "unknown config key lerner"),
    ("learner.lr=-1", "learner.lr=-1.0 is out of range; valid: (0.0, inf]"),
    ("learner.zero_stage=4", "learner.zero_stage=4 is not valid; choose one of 1, 2, 3"),
    ("learner.dtype=float16", "learner.dtype='float16' is not valid; choose one of 'auto', 'float32', 'bfloat16'"),
    ("algorithm.steps=1.5", "algorithm.steps=1.5: expected an integer"),
    ("algorithm.steps=many", "algorithm.steps='many': expected a number"),
    ("algorithm.normalize_std=maybe", "algorithm.normalize_std='maybe': expected true or false"),
    ("rollout.top_p=1.5", "rollout.top_p=1.5 is out of range; valid: (0.0, 1.0]"),
    ("task.arithmetic.min_digits=3", "task.arithmetic.min_digits=3 must be <= task.arithmetic.max_digits=2"),
    ("task.arithmetic.weight=0", "every task weight is 0; give at least one task a weight above 0"),
    ("task.math.weight=1", "task.math.weight=1 needs task.math.path"),
    ("task.code.weight=1 task.code.timeout_s=10", "task.code.timeout_s=10 must be below rewards.timeout_s=10"),
    ("task.arithmetic.weight=0 task.knights.weight=1", "cold_start.steps=100 needs a task with reference traces"),
    ("rewards.overlong_buffer=33", "rewards.overlong_buffer=33 must be <= rollout.max_new_tokens=32"),
    ("task.answer=last_number task.countdown.weight=1", "task.answer=last_number applies to the arithmetic task only"),
    ("task.template=jinja", "task.template='jinja' is not valid; choose one of 'r1', 'chat'"),
    ("model.hidden_size=96", "model.hidden_size=96 / model.num_heads=4 must be a whole multiple of 32"),
    ("learner", "override 'learner': expected key=value"),
    ("rollout.engine=sglang", "rollout.engine='sglang' is not valid; choose one of 'vllm', 'transformers'"),
    ("rollout.prompt_too_long=drop", "choose one of 'error', 'truncate_left', 'skip'"),
    ("sync.transport=nccl", "sync.transport='nccl' is not valid; choose one of 'object_store', 'broadcast'"),
    ("sync.bucket_mb=0", "sync.bucket_mb=0.0 is out of range; valid: (0.0, inf]"),
    # A clip_low of 1 would let the ratio fall to 0: refused when the config loads, not at step 1.
    ("algorithm.clip_low=1.5", "algorithm.clip_low=1.5 is out of range; valid: [0.0, 1.0]"),
    ("algorithm.kl_reference=/no/such/model", "algorithm.kl_reference='/no/such/model' is neither rl_start, none nor"),
    ("algorithm.loss=ppo", "algorithm.loss='ppo' is not valid; choose one of 'grpo', 'gspo', 'cispo'"),
    ("algorithm.mismatch_high=0.9", "algorithm.mismatch_high=0.9 is out of range; valid: [1.0, inf]"),
    ("cluster.colocate=true rollout.num_engines=2 algorithm.max_staleness=1",
     "cluster.colocate=true needs rollout.num_engines=2 equal to learner.num_ranks=1 (one engine beside each "
     "rank); algorithm.max_staleness=0 (an engine cannot generate while its device trains)"),
    ("task.arithmetic.direct_traces=0.9 task.arithmetic.checked_traces=0.2",
     "task.arithmetic.direct_traces=0.9 + task.arithmetic.checked_traces=0.2 is above 1"),
    ("sync.transport=cuda_ipc", "sync.transport=cuda_ipc needs cluster.colocate=true, learner.num_gpus=1 and "
                                "learner.zero_stage 1 or 2 (got colocate=False, num_gpus=0, zero_stage=2)"),
    # On CPU an engine's shards are processes (tests/test_weight_sync.py); on GPUs, one GPU each.
    ("rollout.tensor_parallel_size=2 rollout.num_gpus=1", "rollout.tensor_parallel_size=2 needs "
                                                          "rollout.num_gpus >= 2 per engine (got 1)"),
])
def test_bad_values_name_the_key_and_the_valid_range(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, override.split())
    assert message in str(err.value)


def test_tensor_parallel_needs_the_vllm_engine():
    with pytest.raises(ConfigError, match="rollout.tensor_parallel_size > 1 needs rollout.engine=vllm"):
        load_config(None, ["rollout.engine=transformers", "rollout.num_gpus=2", "rollout.tensor_parallel_size=2"])


def test_group_given_a_scalar_is_an_error(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("learner: 3\n")
    with pytest.raises(ConfigError, match="learner: expected a mapping"):
        load_config(f)


def test_missing_file_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_config_is_frozen():
    cfg = Config()
    with pytest.raises(AttributeError):
        cfg.learner.lr = 1.0  # type: ignore[misc]


def test_every_field_has_a_docstring():
    import dataclasses
    import typing

    def check(cls: type) -> None:  # a nested group is documented by its own fields
        docs, hints = field_docs(cls), typing.get_type_hints(cls)
        missing = [f.name for f in dataclasses.fields(cls) if not docs.get(f.name)
                   and not dataclasses.is_dataclass(hints[f.name])]
        assert not missing, f"{cls.__name__} fields without a docstring: {missing}"
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(hints[f.name]):
                check(hints[f.name])

    check(Config)
    assert "learning rate" in field_docs(LearnerConfig)["lr"]


def test_an_existing_run_folder_is_never_reused(tmp_path):
    from cluster.train import _make_run_dir

    cfg = load_config(None, [f"cluster.runs_dir={tmp_path}", "logging.run_name=first"])
    run_dir = _make_run_dir(cfg)
    (run_dir / "metrics.jsonl").write_text('{"step": 1}\n')
    with pytest.raises(ConfigError, match="logging.run_name='first': the run folder .* already exists"):
        _make_run_dir(cfg)
    assert (run_dir / "metrics.jsonl").read_text() == '{"step": 1}\n'  # the earlier run is untouched
