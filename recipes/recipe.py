"""`r1ray pipeline FILE`: a recipe's named stages in order, each one's output feeding the next.

    r1ray pipeline configs/r1.yaml              # runs what is not done yet, then the summary
    r1ray pipeline configs/r1.yaml --redo final_rl   # runs that stage (and the ones after) again
    r1ray pipeline configs/r1.yaml name=r1-no-stop final_rl.set.eval.stop_drop=0 \
        --from runs/r1-mini --redo final_rl --until final_rl   # a variant of one stage, the
                                                               # stages before it taken as they are

A recipe file:
    name: r1-mini              # its folder: <config.cluster.runs_dir>/<name>/<stage name>/
    config: {...}              # the config every stage starts from (the keys of a train config)
    evaluate: {prompts: 100, k: 4, set: {...}}   # held-out accuracy after each model stage: greedy, and
                                           # pass@1 over k samples (k > 1)
    stages:
      - {name: cold_start, kind: sft, data: "@traces", set: {sft: {epochs: 2}}}
A string "@name" anywhere in a stage or in `evaluate.set` stands for stage `name`'s output (a
model folder or a JSONL file); `model` is the model a stage starts from (default: the
config's). `set` holds config keys for this stage only. `key=value` arguments change the file's tree:
`name=...`, `config.<key>=...`, `evaluate.<key>=...` or `<stage>.<key>=...` (e.g.
`reward_model.data=@preferences`).

Stage kinds and what each writes in its folder (`KINDS` below declares each kind once):
    traces        data.jsonl    reference reasoning traces of the tasks that write them (`rows`)
    general       data.jsonl    the toy general data (rewards/sorting.py; `rows`)
    pairs         data.jsonl    preference pairs for it (`rows`)
    sft           model/        SFT on `data` (+ sft.mix_path at sft.mix_ratio)       recipes/sft.py
    rl            model/        GRPO, a normal run folder with checkpoints           cluster/train.py
    rejection     data.jsonl    rejection-sampled answers of `model`                  recipes/rejection.py
    policy_pairs  data.jsonl    `model`'s own answers paired, right over wrong (+ `data`) recipes/pairs.py
    reward_model  model/        a Bradley-Terry reward model on `data` pairs          recipes/reward_model.py
    distill       student/      `model`'s verified traces learned by `student`       recipes/distill.py
A stage is done when its folder has done.json (written last): done stages are skipped. An
unfinished rl stage resumes from its newest checkpoint; other stages start again (minutes).
The stages share one Ray session, started by the first one that starts actors (a local
cluster costs ~8 s); each stage releases its own actors.

No stage trains on a question the pipeline evaluates on: each stage that reads training data
(all but traces, general and pairs) gets the run's held-out split, the eval splits of the
`evaluate` mixture and of its own mixture (`held_out_split`), and drops what is in it. So
`evaluate` may refer only to data stages that run before the first such stage.
"""

from __future__ import annotations

import copy
import json
import random
import shutil
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from cluster.config import Config, ConfigError, apply_overrides, config_from_tree
from rewards.tasks import HeldOut


class StageError(RuntimeError):
    """A stage cannot run: its input is missing or empty; the message names stage and path."""


@dataclass(frozen=True)
class Stage:
    name: str
    kind: str
    model: str = ""
    """"@stage" or a folder; empty: the recipe config's model."""
    data: str = ""
    """"@stage" or a JSONL file: SFT rows, or preference pairs for reward_model."""
    student: dict = field(default_factory=dict)
    """distill: the student's `model` config group; its path may be "@stage"."""
    rows: int = 0
    """traces, general, pairs: rows to write."""
    set: dict = field(default_factory=dict)
    """Config keys for this stage only (nested like the config file)."""


@dataclass(frozen=True)
class Recipe:
    name: str
    config: dict
    stages: list[Stage]
    eval_prompts: int
    eval_set: dict
    folder: Path
    eval_k: int = 1
    """Samples per held-out prompt beside the greedy answer (`evaluate.k`): above 1, the table
    also shows pass@1 over them at `rollout.temperature`, the paper's measure."""


def load_recipe(path: str | Path, overrides: typing.Sequence[str] = ()) -> Recipe:
    """Parse a recipe file, apply `key=value` overrides to it, and check it: kinds, unique
    names, references to earlier stages only."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"recipe {path} does not exist")
    tree = yaml.safe_load(path.read_text()) or {}
    _override(tree, overrides, path)
    unknown = sorted(set(tree) - {"name", "config", "evaluate", "stages"})
    if unknown:
        raise ConfigError(f"{path}: unknown key {unknown[0]!r}; valid: name, config, evaluate, stages")
    if not tree.get("stages"):
        raise ConfigError(f"{path}: no stages")
    stages, seen = [], []
    for i, raw in enumerate(tree["stages"]):
        if not isinstance(raw, dict) or "name" not in raw or "kind" not in raw:
            raise ConfigError(f"{path}: stage {i + 1} needs a name and a kind, got {raw!r}")
        try:
            stage = Stage(**raw)
        except TypeError:
            valid = ", ".join(Stage.__dataclass_fields__)
            raise ConfigError(f"{path}: stage {raw['name']!r} has an unknown key; valid: {valid}") from None
        if stage.kind not in KINDS:
            raise ConfigError(f"{path}: stage {stage.name!r}: kind {stage.kind!r} is not one of {', '.join(KINDS)}")
        if stage.name == "base" or not stage.name.replace("_", "").replace("-", "").isalnum():
            raise ConfigError(f"{path}: stage name {stage.name!r}: use letters, digits, - and _ (not base)")
        if stage.name in seen:
            raise ConfigError(f"{path}: stage name {stage.name!r} is used twice")
        for ref in _references(raw):
            if ref not in seen:
                raise ConfigError(f"{path}: stage {stage.name!r} refers to @{ref}, which is not an earlier stage")
        if KINDS[stage.kind].needs_data and not stage.data:
            raise ConfigError(f"{path}: stage {stage.name!r} ({stage.kind}) needs data: a JSONL file or @stage")
        seen.append(stage.name)
        stages.append(stage)
    evaluate = tree.get("evaluate") or {}
    if sorted(set(evaluate) - {"prompts", "k", "set"}):
        raise ConfigError(f"{path}: evaluate has unknown key {sorted(set(evaluate) - {'prompts', 'k', 'set'})[0]!r}; "
                          "valid: prompts, k, set")
    if not isinstance(evaluate.get("k", 1), int) or evaluate.get("k", 1) < 1:
        raise ConfigError(f"{path}: evaluate.k={evaluate['k']!r}: give a whole number of samples, 1 or more")
    trains = next((s for s in stages if KINDS[s.kind].trains), None)
    for ref in _references(evaluate):
        if ref not in seen:
            raise ConfigError(f"{path}: evaluate refers to @{ref}, which is not a stage")
        if trains and seen.index(ref) > stages.index(trains):  # its held-out split is needed from there on
            raise ConfigError(f"{path}: evaluate refers to @{ref}, which runs after stage {trains.name!r} "
                              f"({trains.kind}) trains; what is evaluated on must exist before any stage trains")
    config = tree.get("config") or {}
    if _references(config):
        raise ConfigError(f"{path}: config refers to @{_references(config)[0]}; stage outputs go in a stage's "
                          "set or in evaluate.set")
    base = config_from_tree(config)  # checks the shared config once
    name = tree.get("name") or path.stem
    return Recipe(name, config, stages, int(evaluate.get("prompts", 100)), evaluate.get("set") or {},
                  Path(base.cluster.runs_dir).expanduser().resolve() / name, evaluate.get("k", 1))


def _override(tree: dict, overrides: typing.Sequence[str], path: Path) -> None:
    """`name=`, `config.*=`, `evaluate.*=` set the file's keys; `<stage>.*=` that stage's."""
    stages = {raw.get("name"): raw for raw in tree.get("stages") or [] if isinstance(raw, dict)}
    for item in overrides:
        head, _, rest = item.partition(".")
        if head.partition("=")[0] in ("name", "config", "evaluate"):
            apply_overrides(tree, [item])
        elif head in stages and rest:
            apply_overrides(stages[head], [rest])
        else:
            raise ConfigError(f"{path}: override {item!r}: give name=..., config.<key>=..., evaluate.<key>=... "
                              f"or <stage>.<key>=... with a stage of {', '.join(map(str, stages))}")


def run_recipe(recipe: Recipe, redo: str | None = None, until: str | None = None,
               source: str | Path | None = None) -> list[dict]:
    """Run the stages not done (from `redo` on, all of them) up to `until` (default: the last);
    returns each stage's record. With `source` (another run of the recipe), the stages done
    there are taken from there, up to the first that is done here, `redo` or not done there:
    from that one on, every stage is this run's own."""
    names = [s.name for s in recipe.stages]
    for flag, name in (("--redo", redo), ("--until", until)):
        if name and name not in names:
            raise ConfigError(f"{flag} {name!r} is not a stage; stages: {', '.join(names)}")
    if source and not Path(source).is_dir():
        raise ConfigError(f"--from {source}: not a folder; give another run of this recipe, e.g. runs/{recipe.name}")
    recipe.folder.mkdir(parents=True, exist_ok=True)
    outputs: dict[str, str] = {}
    records = []
    last = names.index(until) if until else len(names) - 1
    taking = True  # stages come from `source` until the first one that is this run's own
    for i, stage in enumerate(recipe.stages[:last + 1]):
        folder = recipe.folder / stage.name
        done = folder / "done.json"
        again = redo is not None and names.index(redo) <= i
        if again and done.exists():
            done.unlink()
        taken = Path(source) / stage.name / "done.json" if source else None
        taking = taking and not again and not done.exists() and taken is not None and taken.exists()
        if taking:
            record = json.loads(taken.read_text()) | {"status": f"taken from {source}"}
            print(f"r1ray: stage {i + 1}/{len(names)} {stage.name}: taken from {source}", flush=True)
        elif done.exists():
            record = json.loads(done.read_text()) | {"status": "skipped (done)"}
            print(f"r1ray: stage {i + 1}/{len(names)} {stage.name}: done before, skipped", flush=True)
        else:
            print(f"r1ray: stage {i + 1}/{len(names)} {stage.name} ({stage.kind})", flush=True)
            record = _run_stage(recipe, stage, folder, outputs)
            done.write_text(json.dumps(record, indent=2))
            record["status"] = "ran"
        outputs[stage.name] = record["output"]
        records.append(record)
    records.insert(0, _base_record(recipe, outputs, source))  # evaluated last: it may read stages' data
    print_summary(recipe, records)
    return records


def _run_stage(recipe: Recipe, stage: Stage, folder: Path, outputs: dict[str, str]) -> dict:
    started = time.time()
    kind = KINDS[stage.kind]
    cfg = _stage_config(recipe, stage, outputs)
    job = Job(cfg, stage, folder / kind.output,
              model=_input(stage, stage.model, outputs) if stage.model else _model_path(cfg),
              data=_input(stage, stage.data, outputs) if stage.data else "", outputs=outputs,
              held_out=held_out_split(recipe, cfg, outputs) if kind.trains else None,
              reported=reported_split(recipe, outputs) if kind.trains else None)
    if not kind.resumes:  # a stage that did not finish starts again
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
    record = {"stage": stage.name, "kind": stage.kind, "output": str(job.output), "metrics": kind.run(job), "eval": {}}
    if kind.policy:
        record["eval"] = evaluate_policy(recipe, str(job.output), outputs)
    record["minutes"] = (time.time() - started) / 60
    return record


# ---- the stage kinds ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Job:
    """What a stage's runner is given: its config, its inputs resolved, where its output goes,
    and the questions it must never train on (None for stages that write data from nothing)."""

    cfg: Config
    stage: Stage
    output: Path
    model: str
    data: str
    outputs: dict[str, str]
    held_out: HeldOut | None
    reported: HeldOut | None = None
    """The questions the pipeline's table reports on: an RL stage's own evaluation, which may
    decide when it stops (`eval.stop_drop`), uses other held-out ones."""

    @property
    def what(self) -> str:
        return f"stage {self.stage.name}"


def _traces_stage(job: Job) -> dict[str, float]:
    return _write(job.output, _traces(job.cfg, job.stage, job.what))


def _general_stage(job: Job) -> dict[str, float]:
    from rewards import sorting

    return _write(job.output, sorting.sft_rows(random.Random(job.cfg.algorithm.seed), _rows(job.stage)))


def _pairs_stage(job: Job) -> dict[str, float]:
    from rewards import sorting

    return _write(job.output, sorting.preference_pairs(random.Random(job.cfg.algorithm.seed + 1), _rows(job.stage)))


def _policy_pairs_stage(job: Job) -> dict[str, float]:
    from recipes.pairs import policy_pairs

    return policy_pairs(job.cfg, job.model, job.data, job.output, job.what, held_out=job.held_out)


def _sft_stage(job: Job) -> dict[str, float]:
    from recipes.sft import sft

    return sft(job.cfg, job.model, job.data, job.output, job.what, held_out=job.held_out)


def _rejection_stage(job: Job) -> dict[str, float]:
    from recipes.rejection import rejection_sample

    return rejection_sample(job.cfg, job.model, job.output, job.what, held_out=job.held_out)


def _reward_model_stage(job: Job) -> dict[str, float]:
    from recipes.reward_model import train_reward_model

    return train_reward_model(job.cfg, job.data, job.output, job.model, job.what, held_out=job.held_out)


def _distill_stage(job: Job) -> dict[str, float]:
    from cluster.config import to_dict
    from recipes.distill import distill

    if str(job.stage.student.get("path", "")).startswith("@"):  # an earlier stage's model
        student = _input(job.stage, job.stage.student["path"], job.outputs)
    else:  # a model group: "tiny" builds it, a folder is checked
        student = _model_path(config_from_tree(_merge(to_dict(job.cfg), {"model": job.stage.student})))
    return distill(job.cfg, job.model, student, job.output.parent, job.what, held_out=job.held_out)


def _rl_stage(job: Job) -> dict[str, float]:
    """GRPO from the stage's model in its folder (a run folder), resumed from its checkpoint if
    it has one, never on a held-out prompt."""
    import dataclasses

    from cluster import checkpoint
    from cluster.train import train

    cfg, folder = job.cfg, job.output.parent
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, path=job.model),
                              cluster=dataclasses.replace(cfg.cluster, runs_dir=str(folder.parent)),
                              logging=dataclasses.replace(cfg.logging, run_name=job.stage.name))
    resume = None
    if folder.exists():
        try:
            checkpoint.latest(folder)
            resume = folder
            print(f"r1ray: {job.what}: resuming from {folder}", flush=True)
        except checkpoint.CheckpointError:
            shutil.rmtree(folder)  # stopped before its first checkpoint
    return train(cfg, resume, job.held_out, job.reported)


@dataclass(frozen=True)
class Kind:
    """A stage kind, declared once: what it writes, what it needs, how it runs."""

    output: str
    """What it writes in its folder."""
    run: Callable[[Job], dict[str, float]]
    """Runs the stage; returns its metrics."""
    needs_data: bool = False
    """It needs `data` (a JSONL file or @stage)."""
    trains: bool = True
    """It starts actors and reads training data, so it is given the held-out split; false for
    stages that write data from nothing (no Ray session)."""
    policy: bool = False
    """Its output is a policy, evaluated after it runs."""
    resumes: bool = False
    """It continues from its own checkpoint when it did not finish; the others start again."""


KINDS = {
    "traces": Kind("data.jsonl", _traces_stage, trains=False),
    "general": Kind("data.jsonl", _general_stage, trains=False),
    "pairs": Kind("data.jsonl", _pairs_stage, trains=False),
    "sft": Kind("model", _sft_stage, needs_data=True, policy=True),
    "rl": Kind("model", _rl_stage, policy=True, resumes=True),
    "rejection": Kind("data.jsonl", _rejection_stage),
    "policy_pairs": Kind("data.jsonl", _policy_pairs_stage),
    "reward_model": Kind("model", _reward_model_stage, needs_data=True),
    "distill": Kind("student", _distill_stage, policy=True),
}
"""Every stage kind; the module's docstring says what each does."""


def evaluate_policy(recipe: Recipe, model: str, outputs: dict[str, str]) -> dict[str, float]:
    """Greedy held-out accuracy of `model` on the recipe's evaluation mixture (in the
    pipeline's Ray session)."""
    from cluster.evaluate import evaluate_model

    cfg, tasks, problems = _evaluation(recipe, outputs, model)
    got = evaluate_model(cfg, _model_path(cfg), tasks.tasks, problems, recipe.eval_k)
    if len(tasks.tasks) == 1:  # name the task in the key, as a mixture does
        (task,) = tasks.tasks
        got |= {f"{key}/{task}": value for key, value in list(got.items())}
    return got


def _evaluation(recipe: Recipe, outputs: dict[str, str], model: str = "tiny"):
    """(config, mixture, problems) of the pipeline's evaluation of `model`."""
    from rewards.tasks import build_mixture

    tree = _merge(_eval_tree(recipe, outputs), {"model": {"path": model}, "cold_start": {"steps": 0}})
    cfg = config_from_tree(tree)
    tasks = build_mixture(cfg.task)
    return cfg, tasks, tasks.eval_problems(cfg.algorithm.seed, recipe.eval_prompts)


def reported_split(recipe: Recipe, outputs: dict[str, str]) -> HeldOut:
    """Whether a question is one the pipeline's table reports on (`evaluate_policy`'s problems)."""
    from rewards.tasks import canonical

    reported = frozenset(canonical(p.prompt) for p in _evaluation(recipe, outputs)[2])
    return lambda question: canonical(question) in reported


def held_out_split(recipe: Recipe, cfg: Config, outputs: dict[str, str]) -> HeldOut:
    """The held-out split of a stage with config `cfg`: whether a question is held out by the
    recipe's evaluation mixture (as `evaluate_policy` builds it) or by the stage's own."""
    from rewards.tasks import build_mixture

    evaluated = build_mixture(config_from_tree(_eval_tree(recipe, outputs)).task)
    own = build_mixture(cfg.task)
    return lambda question: evaluated.held_out(question) or own.held_out(question)


def print_summary(recipe: Recipe, records: list[dict]) -> None:
    """One row per stage: status, time, output, held-out accuracy per task, key metrics."""
    from rich.console import Console
    from rich.table import Table

    # Greedy accuracy per task ("acc"), then pass@1 over evaluate.k samples where measured.
    tasks = sorted({k.rsplit("/", 1)[1] for r in records for k in r.get("eval", {}) if k.count("/") == 2})
    keys = [(f"acc {t}", f"pass@1/greedy/{t}") for t in tasks]
    keys += [(f"pass@1 {t}", f"pass@1/{t}") for t in tasks if any(f"pass@1/{t}" in r.get("eval", {}) for r in records)]
    table = Table(title=f"r1ray pipeline {recipe.name}: {recipe.folder}")
    for column in ("stage", "kind", "status", "min", *[name for name, _ in keys], "notes"):
        table.add_column(column)
    for r in records:
        acc = [f"{r['eval'][key]:.3f}" if key in r.get("eval", {}) else "" for _, key in keys]
        table.add_row(r["stage"], r["kind"], r.get("status", ""), f"{r.get('minutes', 0):.1f}", *acc,
                      _notes(r.get("metrics", {})))
    Console(width=200).print(table)
    (recipe.folder / "summary.json").write_text(json.dumps(records, indent=2))


NOTES = {"rows": "rows", "sft/steps": "steps", "sft/loss_last": "loss", "rejection/kept": "kept",
         "rejection/acceptance": "acceptance", "rm/held_out_accuracy": "held-out pair acc",
         "teacher/pass@1/greedy": "teacher acc", "student_before/pass@1/greedy": "student before",
         "pairs/policy": "own pairs", "rl/stopped_early_at": "stopped at step", "rl/kept_step": "kept step"}
"""A stage's metrics in the summary's notes column, and their short names."""


def _notes(metrics: dict[str, float]) -> str:
    return ", ".join(f"{name} {metrics[k]:.3g}" for k, name in NOTES.items() if k in metrics and metrics[k] == metrics[k])


# ---- helpers -------------------------------------------------------------------------------------

def _eval_tree(recipe: Recipe, outputs: dict[str, str]) -> dict:
    """The evaluation's config tree: `evaluate.set` over the recipe's config."""
    return _merge(_resolve(recipe.config, outputs), _resolve(recipe.eval_set, outputs))


def _stage_config(recipe: Recipe, stage: Stage, outputs: dict[str, str]) -> Config:
    tree = _merge(_resolve(recipe.config, outputs), _resolve(stage.set, outputs))
    try:
        return config_from_tree(tree)
    except ConfigError as err:
        raise ConfigError(f"stage {stage.name}: {err}") from None


def _model_path(cfg: Config) -> str:
    from cluster.train import resolve_model

    return resolve_model(cfg)


def _input(stage: Stage, ref: str, outputs: dict[str, str]) -> str:
    """A stage's input path, checked to exist and not be empty."""
    path = Path(_resolve(ref, outputs)).expanduser()
    empty = path.is_file() and path.stat().st_size == 0 or path.is_dir() and not any(path.iterdir())
    if not path.exists() or empty:
        raise StageError(f"stage {stage.name}: its input {path} is {'empty' if path.exists() else 'missing'}")
    return str(path)


def _rows(stage: Stage) -> int:
    if stage.rows < 1:
        raise ConfigError(f"stage {stage.name} ({stage.kind}): rows={stage.rows}; give rows >= 1")
    return stage.rows


def _traces(cfg: Config, stage: Stage, what: str) -> list[dict]:
    from rewards.tasks import build_mixture

    tasks = build_mixture(cfg.task)
    names = tasks.with_traces()
    if not names:
        raise StageError(f"{what}: no task of the mixture writes reference traces (arithmetic does)")
    problems = tasks.sample(random.Random(cfg.algorithm.seed), _rows(stage), names=names)
    return [{"id": p.id, "prompt": p.prompt, "response": tasks.tasks[p.task].reference_trace(p)} for p in problems]


def _write(path: Path, rows: list[dict]) -> dict[str, float]:
    from rewards.data import write_jsonl

    write_jsonl(path, rows)
    return {"rows": float(len(rows))}


def _references(node: Any) -> list[str]:
    if isinstance(node, str):
        return [node[1:]] if node.startswith("@") else []
    if isinstance(node, dict):
        return [r for v in node.values() for r in _references(v)]
    if isinstance(node, list):
        return [r for v in node for r in _references(v)]
    return []


def _resolve(node: Any, outputs: dict[str, str]) -> Any:
    """`node` with every "@stage" string replaced by that stage's output path."""
    if isinstance(node, str) and node.startswith("@"):
        if node[1:] not in outputs:
            raise StageError(f"@{node[1:]} has no output yet: run the stage {node[1:]} first")
        return outputs[node[1:]]
    if isinstance(node, dict):
        return {k: _resolve(v, outputs) for k, v in node.items()}
    if isinstance(node, list):
        return [_resolve(v, outputs) for v in node]
    return node


def _merge(base: dict, extra: dict) -> dict:
    """`base` with `extra`'s keys set, nested groups merged."""
    out = copy.deepcopy(base)
    for key, value in extra.items():
        out[key] = _merge(out.get(key) or {}, value) if isinstance(value, dict) else value
    return out


def _base_record(recipe: Recipe, outputs: dict[str, str], source: str | Path | None = None) -> dict:
    """The starting model, evaluated once (the table's first row) or taken from `source`."""
    path = recipe.folder / "base.json"
    if path.exists():
        return json.loads(path.read_text()) | {"status": "skipped (done)"}
    if source and (Path(source) / "base.json").exists():
        return json.loads((Path(source) / "base.json").read_text()) | {"status": f"taken from {source}"}
    started = time.time()
    cfg = config_from_tree(recipe.config)
    record = {"stage": "base", "kind": "model", "output": _model_path(cfg), "metrics": {}}
    record["eval"] = evaluate_policy(recipe, record["output"], outputs)
    record["minutes"] = (time.time() - started) / 60
    path.write_text(json.dumps(record, indent=2))
    return record | {"status": "ran"}
